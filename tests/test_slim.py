"""Post-hoc uniform width slimming (mapex_analysis.ops.slim)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
from timm.layers import Attention, Mlp
from torch import nn

from mapex_analysis.ops import SLIM_WIDTHS, apply_plan, slim_width
from mapex_analysis.ops.slim import SLIM_MODES, SLIM_ORDERS, SlimPlan, kept_width

# vit_tiny: D = 192, 3 heads of d_k = 64, MLP hidden d_h = 768; 32 px / patch 8 -> 16 + 1 tokens.
D, HEADS, D_K, D_H = 192, 3, 64, 768


def _vit(depth: int = 2, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=depth,
        num_classes=0,
        **kwargs,
    )
    return model.eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return _vit()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def _set_fused(model: nn.Module, fused: bool) -> None:
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = fused


def _zeroed_reference(model: nn.Module, report: dict) -> nn.Module:
    """The unslimmed model with the dropped dims zeroed and the scale replaced.

    Dropped Q and K dims contribute 0 to q.k, dropped V dims give 0 outputs (and their proj
    columns are zeroed), dropped hidden units give GELU(0) = 0 into zeroed fc2 columns; the
    manual attention path uses ``scale = d_k' ** -0.5`` as the paper prescribes.
    """
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for layer in report["layers"]:
            m = mods[layer["module"]]
            if layer["kind"] == "attn":
                h, d, k = layer["num_heads"], layer["head_dim"], layer["kept_head_dim"]
                keep = torch.zeros(h * d, dtype=torch.bool)
                for head, dims in enumerate(layer["kept"]):
                    keep[[head * d + j for j in dims]] = True
                drop_qkv = (~keep).repeat(3)
                m.qkv.weight[drop_qkv] = 0.0
                if m.qkv.bias is not None:
                    m.qkv.bias[drop_qkv] = 0.0
                m.proj.weight[:, ~keep] = 0.0
                m.scale = k**-0.5
                m.fused_attn = False  # SDPA would use the full d_k ** -0.5
            else:
                keep = torch.zeros(layer["hidden"], dtype=torch.bool)
                keep[layer["kept"]] = True
                m.fc1.weight[~keep] = 0.0
                m.fc1.bias[~keep] = 0.0
                m.fc2.weight[:, ~keep] = 0.0
    return ref


def _dofa() -> nn.Module:
    from torchgeo.models.dofa import DOFA

    torch.manual_seed(0)
    return DOFA(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0).eval()


def _scale_mae() -> nn.Module:
    from torchgeo.models.scale_mae import ScaleMAE

    torch.manual_seed(0)
    model = ScaleMAE(
        img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4, num_classes=0
    )
    return model.eval()


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------


def test_slim_widths_is_the_papers_31_width_grid() -> None:
    # {1, 2, 2.5, 3.33, 4, 5, 6, 6.67, 7.5, 8} x {1e-3, 1e-2, 1e-1} = 30 widths, plus 1.0.
    assert len(SLIM_WIDTHS) == 31
    assert SLIM_WIDTHS[0] == 0.001 and SLIM_WIDTHS[-1] == 1.0
    assert list(SLIM_WIDTHS) == sorted(SLIM_WIDTHS)
    assert {0.00333, 0.0667, 0.25, 0.75, 0.8} <= set(SLIM_WIDTHS)


@pytest.mark.parametrize(
    ("d", "s", "expected"),
    [
        (64, 0.001, 1),  # floor(0.064) = 0 -> at least 1
        (64, 0.25, 16),
        (100, 0.29, 29),  # 0.29 * 100 = 28.999999999999996 in binary: must not floor to 28
        (3072, 0.1, 307),  # floor(307.2)
        (768, 0.00333, 2),  # floor(2.557)
        (64, 1.0, 64),
    ],
)
def test_kept_width_is_max_1_floor_s_d(d: int, s: float, expected: int) -> None:
    assert kept_width(d, s) == expected


@pytest.mark.parametrize("builder", ["vit", "dofa", "scale_mae"])
def test_s_one_is_bit_identical(builder: str, x: torch.Tensor) -> None:
    model = {"vit": _vit, "dofa": _dofa, "scale_mae": _scale_mae}[builder]()
    slim = slim_width(model, 1.0)
    with torch.no_grad():
        if builder == "dofa":
            waves = [0.665, 0.56, 0.49]  # B04, B03, B02 in µm
            a, b = model(x, waves), slim(x, waves)
        else:
            a, b = model(x), slim(x)
    assert torch.equal(a, b)
    assert _n(slim) == _n(model)
    assert slim is not model


@pytest.mark.parametrize("mode", SLIM_MODES)
@pytest.mark.parametrize("order", SLIM_ORDERS)
def test_slimmed_equals_zeroed_reference(
    vit: nn.Module, x: torch.Tensor, mode: str, order: str
) -> None:
    s = 0.3  # d_k' = floor(19.2) = 19, d_h' = floor(230.4) = 230
    slim = slim_width(vit, s, mode=mode, order=order, seed=3)
    report = slim.op_report
    attn = [la for la in report["layers"] if la["kind"] == "attn"]
    mlp = [la for la in report["layers"] if la["kind"] == "mlp"]
    assert len(attn) == (2 if "attn" in mode else 0)
    assert len(mlp) == (2 if "mlp" in mode else 0)
    for la in attn:
        assert la["kept_head_dim"] == 19 and [len(h) for h in la["kept"]] == [19] * HEADS
    for la in mlp:
        assert la["kept_hidden"] == 230 and len(la["kept"]) == 230
    ref = _zeroed_reference(vit, report)
    with torch.no_grad():
        out_fused = slim(x)
        _set_fused(slim, False)
        out_manual = slim(x)
        expected = ref(x)
    assert out_fused.shape == (2, D)
    torch.testing.assert_close(out_fused, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_manual, out_fused, atol=1e-5, rtol=0)


def test_slimmed_shapes_and_derived_attributes(vit: nn.Module) -> None:
    slim = slim_width(vit, 0.25)  # d_k' = 16, d_h' = 192
    attn, mlp = slim.blocks[0].attn, slim.blocks[0].mlp
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (HEADS, 16, 48)
    assert attn.scale == 16**-0.5
    assert tuple(attn.qkv.weight.shape) == (3 * 48, D) and tuple(attn.qkv.bias.shape) == (144,)
    assert tuple(attn.proj.weight.shape) == (D, 48)
    assert tuple(mlp.fc1.weight.shape) == (192, D) and tuple(mlp.fc2.weight.shape) == (D, 192)
    # embedding width, norms and patch embedding untouched
    assert tuple(slim.patch_embed.proj.weight.shape) == (D, 3, 8, 8)
    assert slim.embed_dim == D and len(slim.blocks) == 2
    # the source model is untouched
    assert vit.blocks[0].attn.head_dim == D_K and tuple(vit.blocks[0].mlp.fc1.weight.shape) == (
        D_H,
        D,
    )


def test_params_and_macs_never_increase_as_s_decreases(vit: nn.Module, x: torch.Tensor) -> None:
    from mapex_analysis.measure.macs import count_macs

    widths = [1.0, 0.5, 0.25, 0.1, 0.01, 0.001]
    params = [_n(slim_width(vit, s)) for s in widths]
    macs = [count_macs(slim_width(vit, s), x[:1], cross_check=False).total for s in widths]
    assert all(a >= b for a, b in zip(params, params[1:]))
    assert all(a >= b for a, b in zip(macs, macs[1:]))
    assert params[0] > params[-1] and macs[0] > macs[-1]
    # Per block at s = 1: qkv 192*576 + 576 = 111168, proj 192*192 + 192 = 37056,
    # fc1 192*768 + 768 = 148224, fc2 768*192 + 192 = 147648 -> 444096.
    # At s = 0.5 (d_k' = 32, attn_dim 96, d_h' = 384): qkv 192*288 + 288 = 55584,
    # proj 96*192 + 192 = 18624, fc1 192*384 + 384 = 74112, fc2 384*192 + 192 = 73920 -> 222240.
    # 2 blocks save 2 * (444096 - 222240) = 443712 parameters.
    assert params[0] - params[1] == 443712


@pytest.mark.parametrize("s", [0.9, 0.5, 0.3333, 0.1, 0.01])
def test_mlp_mode_scales_hidden_params_exactly(vit: nn.Module, s: float) -> None:
    slim = slim_width(vit, s, mode="mlp")
    k = math.floor(s * D_H)
    for blk_full, blk in zip(vit.blocks, slim.blocks):
        # hidden-unit parameters: fc1 rows + fc1 bias + fc2 columns = d_h * (2D + 1)
        hid = blk.mlp.fc1.weight.numel() + blk.mlp.fc1.bias.numel() + blk.mlp.fc2.weight.numel()
        full = D_H * (2 * D + 1)
        assert hid * D_H == full * k  # exactly k / d_h of the full hidden parameters
        assert blk.mlp.fc2.bias.numel() == D  # output bias does not depend on d_h
        assert _n(blk.attn) == _n(blk_full.attn)  # attention untouched in mode "mlp"


def test_magnitude_keeps_the_largest_norm_dims(vit: nn.Module) -> None:
    model = copy.deepcopy(vit)
    with torch.no_grad():
        blk = model.blocks[0]
        blk.mlp.fc1.weight[5] *= 100.0
        blk.mlp.fc2.weight[:, 5] *= 100.0
        # head 1, dim 7: boost its q, k, v rows (offsets 0, 192, 384) and proj column
        for off in (0, D, 2 * D):
            blk.attn.qkv.weight[off + 1 * D_K + 7] *= 100.0
        blk.attn.proj.weight[:, D_K + 7] *= 100.0
    slim = slim_width(model, 0.001, order="magnitude")  # keeps 1 dim per head / 1 hidden unit
    layers = {la["module"]: la for la in slim.op_report["layers"]}
    assert layers["blocks.0.mlp"]["kept"] == [5]
    assert layers["blocks.0.attn"]["kept"][1] == [7]


def test_random_order_is_seeded(vit: nn.Module) -> None:
    def kept(seed: int) -> list:
        return slim_width(vit, 0.5, order="random", seed=seed).op_report["layers"][0]["kept"]

    assert kept(0) == kept(0)
    assert kept(0) != kept(1)
    assert all(dims == sorted(dims) and len(set(dims)) == 32 for dims in kept(0))


def test_qk_norm_heads_share_dims_and_paths_agree(x: torch.Tensor) -> None:
    model = _vit(qk_norm=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.normalized_shape == (D_K,):
                m.weight.normal_()
    slim = slim_width(model, 0.5, order="magnitude")
    la = slim.op_report["layers"][0]
    assert la["kept"][0] == la["kept"][1] == la["kept"][2]
    attn = slim.blocks[0].attn
    assert attn.q_norm.normalized_shape == (32,) and tuple(attn.k_norm.weight.shape) == (32,)
    with torch.no_grad():
        fused = slim(x)
        _set_fused(slim, False)
        manual = slim(x)
    torch.testing.assert_close(manual, fused, atol=1e-5, rtol=0)


def test_op_report_and_applied_ops_are_json_and_compose(vit: nn.Module) -> None:
    once = slim_width(vit, 0.5, order="last")
    twice = slim_width(once, 0.5, mode="mlp")
    assert once.applied_ops == [
        {"op": "slim_width", "s": 0.5, "mode": "attn+mlp", "order": "last", "seed": 0}
    ]
    assert [p["s"] for p in twice.applied_ops] == [0.5, 0.5]
    # 0.5 then 0.5 on the MLP: 768 -> 384 -> 192 hidden; attention stays at 32
    assert twice.blocks[0].mlp.fc1.out_features == 192 and twice.blocks[0].attn.head_dim == 32
    report = json.loads(json.dumps(once.op_report))
    assert report["layers"][0]["kept"][0] == list(range(32, 64))
    assert report["params_before"] == _n(vit) and report["params_after"] == _n(once)
    assert len(twice.op_reports) == 2


def test_apply_plan_structural_only_rebuilds_shapes(vit: nn.Module, x: torch.Tensor) -> None:
    slim = slim_width(vit, 0.25, order="magnitude")
    rebuilt = apply_plan(_vit(), slim.applied_ops[0], structural_only=True)
    own = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in slim.state_dict().items()}
    rebuilt.load_state_dict(slim.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), slim(x))
    assert rebuilt.applied_ops == slim.applied_ops  # the recorded order is kept, not "first"
    # replaying the full plan on the same weights reproduces the magnitude choice
    again = apply_plan(vit, slim.applied_ops[0])
    assert again.op_report["layers"] == slim.op_report["layers"]


def test_inplace_modifies_the_given_model() -> None:
    model = _vit(depth=1)
    out = slim_width(model, 0.5, inplace=True)
    assert out is model and model.blocks[0].attn.head_dim == 32


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"s": 0.0}, r"s=0\.0 is outside \(0, 1\]"),
        ({"s": 1.5}, r"s=1\.5 is outside \(0, 1\]"),
        ({"s": -0.1}, r"s=-0\.1 is outside"),
        ({"s": float("nan")}, r"got nan"),
        ({"s": "0.5"}, r"got '0\.5'"),
        (
            {"s": 0.5, "mode": "ffn"},
            r"unknown slim mode 'ffn'; valid modes: \['attn\+mlp', 'attn', 'mlp'\]",
        ),
        (
            {"s": 0.5, "order": "top"},
            r"unknown slim order 'top'; valid orders: \['first', 'last', 'random', 'magnitude'\]",
        ),
    ],
)
def test_bad_arguments_raise_value_error(vit: nn.Module, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        slim_width(vit, **kwargs)


def test_model_without_timm_blocks_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"ConvNet has no timm\.layers\.Attention"):
        slim_width(ConvNet(), 0.5)
    mlp_only = nn.Sequential(Mlp(8, 16))
    with pytest.raises(TypeError, match=r"Sequential has no timm\.layers\.Attention"):
        slim_width(mlp_only, 0.5, mode="attn")
    assert slim_width(mlp_only, 0.5, mode="mlp")[0].fc1.out_features == 8


def test_bad_plans_raise_value_error(vit: nn.Module) -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown operator 'quantize' in plan; valid operators: \['prune_experts', 'slim_width'\]",
    ):
        apply_plan(vit, {"op": "quantize"})
    with pytest.raises(ValueError, match=r"unknown keys \['width'\]"):
        apply_plan(vit, {"op": "slim_width", "s": 0.5, "width": 3})
    with pytest.raises(ValueError, match=r"lacks the width factor 's'"):
        SlimPlan.from_dict({"op": "slim_width"})


# --- MAPEX and registered token models ------------------------------------------------------


def _mapex() -> nn.Module:
    from mapex_analysis import create_model

    torch.manual_seed(0)
    return create_model("mapex_test").eval()


def _modality_batch(model: nn.Module) -> dict:
    from mapex_analysis.measure.cost import example_inputs

    return example_inputs(model, batch_size=2, seed=0)


def test_mapex_s_one_is_bit_identical() -> None:
    model = _mapex()
    x = _modality_batch(model)
    slim = slim_width(model, 1.0)
    with torch.no_grad():
        assert torch.equal(slim(x), model(x))
    assert _n(slim) == _n(model)


@pytest.mark.parametrize("order", ["first", "magnitude"])
def test_mapex_every_expert_is_slimmed_and_matches_reference(order: str) -> None:
    model = _mapex()
    x = _modality_batch(model)
    slim = slim_width(model, 0.25, order=order)  # mapex_test: d_k 16 -> 4, expert hidden 32 -> 8
    mlps = [la for la in slim.op_report["layers"] if la["kind"] == "mlp"]
    # 2 blocks x (6 routed + 1 shared) experts
    assert len(mlps) == 14 and {la["kept_hidden"] for la in mlps} == {8}
    moe = slim.blocks[1].mlp
    assert moe.experts[5].fc1.out_features == 8 and moe.shared_experts[0].fc2.in_features == 8
    assert moe.router.proj.out_features == 6  # routing untouched
    with torch.no_grad():
        out = slim(x)
        expected = _zeroed_reference(model, slim.op_report)(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_slimmed_token_vit_saves_and_reloads(tmp_path) -> None:
    from mapex_analysis import create_model, load_model, save_model

    torch.manual_seed(0)
    model = create_model("vit_mae_test").eval()
    slim = slim_width(model, 0.3, mode="attn", order="random", seed=5)
    save_model(slim, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    x = _modality_batch(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), slim(x))
    assert loaded.applied_ops == slim.applied_ops
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == {
        k: tuple(v.shape) for k, v in slim.state_dict().items()
    }
