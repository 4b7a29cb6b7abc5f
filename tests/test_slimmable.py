"""Slimmable training: shared-weight sub-networks equal slim_width; the sandwich step's gradients."""

from __future__ import annotations

from pathlib import Path

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

REPO = Path(__file__).resolve().parents[1]
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
    res = sandwich_step(lambda s: net(x, width=s), [1.0, 0.5, 0.25],
                        task_loss=lambda y: y.sum(), distill_loss=lambda y, t: y.sum())  # fmt: skip
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
        sandwich_step(lambda s: net(torch.zeros(1, 2), width=s), [0.5], lambda y: y.sum(),
                      lambda y, t: y.sum())  # fmt: skip
    with pytest.raises(ValueError, match=r"width must be in \(0, 1\]"):
        net(torch.zeros(1, 2), width=1.5)


def test_summed_sandwich_gives_the_same_gradient_as_one_backward_per_width() -> None:
    grads = []
    for backward in (True, False):
        torch.manual_seed(0)
        tiny = _Tiny()
        net = SlimmableNetwork(tiny, mode="mlp")
        x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
        res = sandwich_step(lambda s, net=net, x=x: net(x, width=s), [1.0, 0.75, 0.25],
                            task_loss=lambda y: (y**2).mean(),
                            distill_loss=lambda y, t: ((y - t) ** 2).mean(), backward=backward)  # fmt: skip
        if not backward:
            assert res.total is not None
            res.total.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in tiny.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-7)
    assert float(grads[0].abs().sum()) > 0


def _pretrain_config(tmp_path, **over: object):
    from mapex_analysis.train.pretrain import parse_pretrain_config

    cfg = {"name": "t", "model": "vit_mae_test", "batch_size": 8, "max_steps": 3,
           "warmup_steps": 1, "accelerator": "cpu", "devices": 1,
           "data": {"n": 16, "img_size": 16, "cache_dir": str(tmp_path / "cache")},
           "output_dir": str(tmp_path / "out"), "run_dir": str(tmp_path / "runs")}  # fmt: skip
    cfg.update(over)
    return parse_pretrain_config(cfg)


@pytest.mark.parametrize("objective", ["mae", "contrastive"])
@pytest.mark.parametrize("model", ["vit_mae_test", "mapex_test"])
def test_slimmable_pretraining_trains_every_width_and_saves_a_plain_encoder(
    tmp_path, objective: str, model: str
) -> None:
    from mapex_analysis.checkpoint import load_model
    from mapex_analysis.train.pretrain import PretrainModule, pretrain

    cfg = _pretrain_config(tmp_path, model=model, objective=objective,
                           slimmable={"widths": [0.5, 0.25], "n_random": 1})  # fmt: skip
    res = pretrain(cfg, progress_bar=False)
    assert res.steps == 3 and np.isfinite(res.final_loss)
    card = (res.checkpoint_dir / "README.md").read_text()
    assert "Slimmable training (sandwich rule): widths [0.5, 0.25]" in card
    plain = load_model(res.checkpoint_dir)
    assert type(plain).__name__ == type(res.encoder).__name__  # an ordinary encoder
    # one step of the module: the losses of widths 1, 0.5 and 0.25 are each computed
    module = PretrainModule(create_model(model), cfg)
    batch = modality_batch(list(module.encoder.modalities), 16, B=4)
    logged: dict[str, float] = {}
    module.log = lambda k, v, **kw: logged.__setitem__(k, float(v))  # type: ignore[method-assign]
    total = module.training_step(batch, 0)
    total.backward()
    assert "train/distill_smallest" in logged and logged["train/total"] > logged["train/loss"]
    grads = [p.grad for p in module.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_mae_widths_see_the_same_mask(tmp_path) -> None:
    from mapex_analysis.train.pretrain import PretrainModule

    cfg = _pretrain_config(tmp_path, slimmable={"widths": [0.25], "n_random": 0})
    module = PretrainModule(create_model("vit_mae_test"), cfg)
    batch = modality_batch(list(module.encoder.modalities), 16, B=2)
    masks = []
    orig = module.net.forward

    def spy(*a, **k):
        out = orig(*a, **k)
        masks.append(out.mask)
        return out

    module.net.forward = spy  # type: ignore[method-assign]
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    module.training_step(batch, 0)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])


def test_contrastive_views_and_loss() -> None:
    from mapex_analysis.models.contrastive import modality_views, nt_xent

    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = modality_views(["rgb", "nir", "sar", "ele"], rng)
        assert a and b and not set(a) & set(b) and set(a) | set(b) == {"rgb", "nir", "sar", "ele"}
    with pytest.raises(ValueError, match="need >= 2 modalities"):
        modality_views(["rgb"], rng)
    z = torch.eye(8)
    # matched views: each row's logit 1/t against 0 for the others
    t = 0.5
    expect = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 7))
    assert float(nt_xent(z, z, t)) == pytest.approx(expect, rel=1e-5)
    assert float(nt_xent(z, z.roll(1, 0), t)) > float(nt_xent(z, z, t))


@pytest.mark.parametrize("name", ["vit_mae_tiny_slimmable", "vit_contrastive_tiny_slimmable"])
def test_committed_slimmable_checkpoints(name: str) -> None:
    from mapex_analysis.checkpoint import load_model
    from mapex_analysis.train.pretrain import load_config

    cfg = load_config(REPO / "studies" / "pretrain" / f"{name}.yaml")
    assert cfg.slimmable is not None and cfg.max_steps == 1000
    trained = load_model(REPO / "models" / name).eval()
    # s = 1: the weights in the plain architecture give the same forward, bit for bit
    plain = create_model(cfg.model, **cfg.model_kwargs).eval()
    plain.load_state_dict(trained.state_dict(), strict=True)
    x = modality_batch(list(plain.modalities), 32, B=4, seed=3)
    net = SlimmableNetwork(trained)
    with torch.no_grad():
        assert torch.equal(net(x, width=1.0), plain(x))
        # every trained width: the sub-network is slim_width of the same weights
        for s in cfg.slimmable.widths:
            assert torch.allclose(net(x, width=s), slim_width(trained, s)(x), atol=1e-6, rtol=0)
