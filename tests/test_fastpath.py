"""AlignedLinear: the padded CPU inference GEMM that width slimming builds for odd widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mapex_analysis.measure.macs import count_macs
from mapex_analysis.models.fastpath import AlignedLinear, module_dispatch, needs_alignment
from mapex_analysis.ops import slim_width


def _aligned(i: int = 96, o: int = 154) -> AlignedLinear:
    torch.manual_seed(0)
    layer = AlignedLinear(i, o).eval()
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def test_needs_alignment() -> None:
    assert [needs_alignment(n) for n in (9, 11, 12, 16, 108, 154, 160, 1151)] == [
        False, False, True, False, True, True, False, True,
    ]  # fmt: skip


def test_aligned_linear_equals_linear_on_the_padded_gemm() -> None:
    layer = _aligned()
    x = torch.randn(3, 50, 96)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (3, 50, 154) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)
    # the GEMM ran on 160 rows: 154 of the layer's, then 6 of zeros
    padded = layer._padded
    assert padded is not None
    wp, bp = padded[3], padded[4]
    assert wp.shape == (160, 96) and bp is not None and bp.shape == (160,)
    assert torch.equal(wp[:154], layer.weight) and not wp[154:].any() and not bp[154:].any()
    # same parameters and state dict as nn.Linear
    assert list(layer.state_dict()) == ["weight", "bias"]
    plain = nn.Linear(96, 154)
    plain.load_state_dict(layer.state_dict())


def test_padded_weights_are_reused_and_rebuilt_when_a_parameter_changes() -> None:
    layer = _aligned()
    x = torch.randn(20, 96)
    with torch.no_grad():
        layer(x)
        first = layer._padded[3]  # type: ignore[index]
        layer(x)
        assert layer._padded[3] is first  # type: ignore[index]  # nothing changed: reused
        layer.weight.mul_(2.0)  # in place: the version changes
        y = layer(x)
    assert layer._padded[3] is not first  # type: ignore[index]
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)
    layer.bias = nn.Parameter(torch.ones(154))  # replaced
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)


def test_training_gradients_and_module_dispatch_take_the_plain_path() -> None:
    layer = _aligned()
    x = torch.randn(20, 96)
    y = layer(x)  # gradients on: plain nn.Linear
    y.sum().backward()
    assert layer._padded is None and layer.weight.grad is not None
    assert layer.weight.grad.shape == (154, 96)
    with torch.no_grad(), module_dispatch():
        layer(x)
    assert layer._padded is None
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer._padded is None


def test_macs_count_the_layer_not_the_padding() -> None:
    model = nn.Sequential(_aligned()).eval()
    report = count_macs(model, torch.randn(1, 10, 96), cross_check=True)
    assert report.total == 10 * 96 * 154


def test_slim_width_builds_aligned_layers_for_odd_widths_with_the_same_outputs() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0,
        num_classes=0,
    ).eval()  # fmt: skip
    slim = slim_width(vit, 0.1).eval()  # hidden 256 -> 25, qkv 3 x 4 heads x 1 dim
    fc1, qkv, proj = slim.blocks[0].mlp.fc1, slim.blocks[0].attn.qkv, slim.blocks[0].attn.proj
    assert fc1.out_features == 25 and type(fc1) is AlignedLinear
    assert qkv.out_features == 12 and type(qkv) is AlignedLinear
    assert proj.out_features == 64 and type(proj) is nn.Linear  # its inputs are sliced
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fast = slim(x)
        with module_dispatch():
            plain = slim(x)
    assert fc1._padded is not None and fc1._padded[3].shape == (32, 64)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("out", [12, 108, 154])
def test_padded_gemm_matches_for_widths_slimming_produces(out: int) -> None:
    layer = _aligned(384, out)
    x = torch.randn(256, 384)
    with torch.inference_mode():
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)


def _flash_head_dims(model: nn.Module, x: torch.Tensor) -> list[int]:
    """The head width of every CPU flash-attention call of one forward pass."""
    with torch.profiler.profile(record_shapes=True) as prof:
        model(x)
    return [
        e.input_shapes[0][-1]
        for e in prof.events()
        if e.name == "aten::_scaled_dot_product_flash_attention_for_cpu"
    ]


def _vit(img_size: int) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0,
    ).eval()  # fmt: skip


def test_slimmed_attention_with_few_dims_per_head_runs_padded_to_16() -> None:
    slim = slim_width(_vit(80), 0.25).eval()  # head dim 16 -> 4; 100 patches + CLS
    assert slim.blocks[0].attn.head_dim == 4 and slim.blocks[0].attn.__dict__["_pads_heads"]
    x = torch.randn(2, 3, 80, 80)
    depth = torch._C._len_torch_function_stack()
    with torch.no_grad():
        assert _flash_head_dims(slim, x) == [16, 16]
        fast = slim(x)
        with module_dispatch():
            assert _flash_head_dims(slim, x) == [4, 4]
            plain = slim(x)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    assert torch._C._len_torch_function_stack() == depth  # the mode was left every time
    # the count is of the model, not of the padding
    unpadded = slim_width(_vit(80), 0.25).eval()
    for block in unpadded.blocks:
        block.attn._forward_pre_hooks.clear()
        block.attn._forward_hooks.clear()
    assert count_macs(slim, x[:1]).total == count_macs(unpadded, x[:1]).total


def test_padded_heads_only_where_it_pays_and_never_with_gradients() -> None:
    short = slim_width(_vit(32), 0.25).eval()  # 17 tokens: below MIN_PADDED_TOKENS
    with torch.no_grad():
        assert _flash_head_dims(short, torch.randn(2, 3, 32, 32)) == [4, 4]
    slim = slim_width(_vit(80), 0.25).eval()
    x = torch.randn(2, 3, 80, 80)
    assert _flash_head_dims(slim, x) == [4, 4]  # gradients on
    depth = torch._C._len_torch_function_stack()
    with torch.no_grad(), pytest.raises(RuntimeError):
        slim(torch.randn(2, 5, 80, 80))  # wrong band count: the patch conv raises
    with torch.no_grad():
        slim.blocks[0].attn(torch.randn(2, 101, 64))
        with pytest.raises(RuntimeError):
            slim.blocks[0].attn(torch.randn(2, 101, 63))  # raises inside the padded forward
    assert torch._C._len_torch_function_stack() == depth
    assert "_padded_heads_mode" not in slim.blocks[0].attn.__dict__
