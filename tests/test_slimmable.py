"""Slimmable training: shared-weight sub-networks equal slim_width; the sandwich step's gradients."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from fixtures.inputs import modality_batch
from timm.layers import Mlp
from torch import nn

from mapex_analysis.factory import create_model
from mapex_analysis.ops.slim import slim_width
from mapex_analysis.ops.slimmable import SlimmableNetwork, sandwich_step, sandwich_widths

WIDTHS = (0.5, 0.25, 0.1, 0.03)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, num_classes=0).eval()  # fmt: skip


@pytest.mark.parametrize("s", WIDTHS)
def test_dense_subnetwork_equals_slim_width(s: float) -> None:
    model = _vit()
    net = SlimmableNetwork(model)
    x = torch.randn(2, 3, 32, 32)
    ref = slim_width(model, s)(x)
    out = net(x, width=s)
    assert out.shape == ref.shape == (2, 192)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


def test_mapex_subnetwork_slims_every_expert_like_slim_width() -> None:
    model = create_model("mapex_test").eval()
    net = SlimmableNetwork(model)
    x = modality_batch(["rgb", "sar"], 16, seed=1)
    for s in (0.5, 0.25):
        ref = slim_width(model, s)(x)
        assert torch.allclose(net(x, width=s), ref, atol=1e-6, rtol=0)
        params = net.tensors_at(s)
        slim = slim_width(model, s)
        sliced = dict(slim.named_parameters()) | dict(slim.named_buffers())
        assert set(params) <= set(sliced) and len(params) > 0
        experts = [n for n in params if "experts" in n]
        assert experts, "no expert weight among the sub-network's tensors"
        for n in experts:
            assert params[n].shape == sliced[n].shape


def test_full_width_is_the_ordinary_model_bit_for_bit() -> None:
    model = _vit()
    net = SlimmableNetwork(model)
    x = torch.randn(2, 3, 32, 32)
    plain = _vit()
    plain.load_state_dict(net.model.state_dict(), strict=True)
    assert torch.equal(net(x, width=1.0), plain(x))
    assert set(net.model.state_dict()) == set(plain.state_dict())  # no slimmable extras


class _Tiny(nn.Module):
    """One timm Mlp with identity activation: y = W2 (W1 x + b1) + b2 (hand-checkable)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = Mlp(2, hidden_features=4, out_features=2, act_layer=nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def test_sandwich_gradients_reach_shared_weights_once_per_width() -> None:
    torch.manual_seed(0)
    tiny = _Tiny()
    net = SlimmableNetwork(tiny, mode="mlp")
    x = torch.tensor([[1.0, 2.0]])
    res = sandwich_step(net, x, [1.0, 0.5, 0.25], task_loss=lambda y: y.sum(),
                        distill_loss=lambda y, t: y.sum())  # fmt: skip
    w1, w2 = tiny.mlp.fc1.weight.detach(), tiny.mlp.fc2.weight.detach()
    # d(sum y)/d W1[j] = (sum_i W2[i, j]) x for every hidden unit j a width keeps:
    # unit 0 is kept by widths 1, 0.5 and 0.25 (3 gradients), unit 1 by 1 and 0.5 (2), units
    # 2-3 by the full width only (1)
    per_unit = torch.tensor([3.0, 2.0, 1.0, 1.0])
    expect_w1 = (per_unit * w2.sum(0)).unsqueeze(1) * x
    assert torch.allclose(tiny.mlp.fc1.weight.grad, expect_w1, atol=1e-6)
    assert torch.allclose(tiny.mlp.fc1.bias.grad, per_unit * w2.sum(0), atol=1e-6)
    h = w1 @ x[0] + tiny.mlp.fc1.bias.detach()
    expect_w2 = (per_unit * h).expand(2, 4)
    assert torch.allclose(tiny.mlp.fc2.weight.grad, expect_w2, atol=1e-6)
    assert torch.allclose(tiny.mlp.fc2.bias.grad, torch.full((2,), 3.0))  # every width
    assert list(res.losses) == [1.0, 0.5, 0.25]
    assert res.losses[0.25] == pytest.approx(float(slim_width(tiny, 0.25, mode="mlp")(x).sum()))


def test_sandwich_widths_and_errors() -> None:
    rng = np.random.default_rng(0)
    grid = [1.0, 0.75, 0.5, 0.25, 0.1]
    w = sandwich_widths(grid, 2, rng)
    assert w[0] == 1.0 and w[-1] == 0.1 and len(w) == 4 and len(set(w)) == 4
    assert set(w[1:-1]) <= {0.75, 0.5, 0.25}
    assert sandwich_widths([0.5], 3, rng) == [1.0, 0.5]
    net = SlimmableNetwork(_Tiny(), mode="mlp")
    with pytest.raises(ValueError, match="starts with the full width 1.0"):
        sandwich_step(net, torch.zeros(1, 2), [0.5], lambda y: y.sum(), lambda y, t: y.sum())
    with pytest.raises(ValueError, match=r"width must be in \(0, 1\]"):
        net(torch.zeros(1, 2), width=1.5)
