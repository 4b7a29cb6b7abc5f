"""MoE layer: sparse dispatch vs a dense reference, gradients, routing statistics, aux loss."""

from __future__ import annotations

import pytest
import torch

from mapex_analysis.models.moe import MoEMLP, Router

MODS = ("rgb", "sar", "ele")


def _inputs(B: int = 2, N: int = 12, D: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    # tokens cycle through modalities 0, 1, 2; token 0 of every row is a CLS token (-1)
    idx = (torch.arange(N) % len(MODS)).expand(B, N).clone()
    idx[:, 0] = -1
    pos = torch.randn(B, N, D, generator=g)
    return x, idx, pos


def _dense_reference(moe: MoEMLP, x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor):
    """Every expert on every token, then keep the gate-weighted top-k: the slow definition."""
    B, N, D = x.shape
    flat, fidx, fpos = x.reshape(-1, D), idx.reshape(-1), pos.reshape(-1, D)
    r = moe.route(flat, fidx, MODS, fpos)
    all_out = torch.stack([e(flat) for e in moe.experts], dim=1)  # (T, E, D)
    gates = torch.zeros(flat.shape[0], moe.num_experts).scatter(1, r.top_idx, r.top_gate)
    out = (all_out * gates.unsqueeze(-1)).sum(1)
    for s in moe.shared_experts:
        out = out + s(flat)
    return out.reshape(B, N, D)


@pytest.mark.parametrize(
    ("router", "per_mod", "top_k"),
    [("modality", 1, 1), ("pos_embed", 2, 2), ("deterministic", 2, 1), ("modality", 2, 3)],
)
def test_sparse_dispatch_equals_dense_reference(router: str, per_mod: int, top_k: int) -> None:
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=per_mod, top_k=top_k, router=router)
    x, idx, pos = _inputs()
    sparse = moe(x, idx, MODS, pos).out
    dense = _dense_reference(moe, x, idx, pos)
    assert sparse.shape == (2, 12, 16)
    assert torch.allclose(sparse, dense, atol=1e-5), (sparse - dense).abs().max()


def test_every_parameter_receives_a_gradient() -> None:
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=2, top_k=2, router="modality")
    # enough tokens that every expert is some token's top-2 choice
    x, idx, pos = _inputs(B=4, N=60)
    res = moe(x, idx, MODS, pos)
    (res.out.pow(2).mean() + 0.01 * res.aux_loss).backward()
    assert int((res.stats.counts.sum(0) > 0).sum()) == 6  # all 3 * 2 experts used
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
        assert float(p.grad.abs().sum()) > 0, name


def test_deterministic_router_statistics_are_one_hot() -> None:
    moe = MoEMLP(16, 24, MODS, experts_per_modality=1, router="deterministic")
    x, idx, pos = _inputs(B=2, N=12)
    res = moe(x, idx, MODS, pos)
    # per row: token 0 is CLS; tokens 3, 6, 9 are modality 0 (3 each row), tokens 1, 4, 7, 10
    # modality 1 (4), tokens 2, 5, 8, 11 modality 2 (4); two rows -> 6, 8, 8 tokens
    expected = torch.tensor([[6, 0, 0], [0, 8, 0], [0, 0, 8]])
    assert torch.equal(res.stats.counts, expected)
    assert res.stats.modalities == MODS
    assert res.stats.expert_groups == MODS


def test_deterministic_balanced_aux_loss_is_one() -> None:
    # two tokens of each modality, no CLS: f_e = P_e = 1/3 for E = 3 -> aux = 3 * 3 * 1/9 = 1
    moe = MoEMLP(8, 8, MODS, router="deterministic")
    x = torch.randn(1, 6, 8)
    idx = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert moe(x, idx, MODS).aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_counts_sum_to_tokens_times_top_k() -> None:
    moe = MoEMLP(16, 24, MODS, experts_per_modality=2, top_k=2, router="pos_embed")
    x, idx, pos = _inputs(B=3, N=10)
    # 3 rows x 9 modality tokens (one CLS each) x top-2 = 54 assignments
    assert int(moe(x, idx, MODS, pos).stats.counts.sum()) == 54


def test_cls_token_uses_shared_experts_only() -> None:
    moe = MoEMLP(16, 24, MODS, router="modality")
    x, idx, pos = _inputs()
    out = moe(x, idx, MODS, pos).out
    shared = moe.shared_experts[0](x[:, 0])
    assert torch.allclose(out[:, 0], shared, atol=1e-6)


def test_without_shared_experts_unrouted_tokens_get_zero() -> None:
    moe = MoEMLP(16, 24, MODS, shared_experts=0, router="deterministic")
    x, idx, pos = _inputs()
    assert float(moe(x, idx, MODS, pos).out[:, 0].detach().abs().max()) == 0.0


def test_unknown_router_lists_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match="unknown router 'learned'; valid routers: deterministic, pos_embed, modality",
    ):
        Router(8, 3, "learned")


def test_top_k_beyond_the_group_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"top_k=2 must be in \[1, 1\]"):
        MoEMLP(8, 8, MODS, experts_per_modality=1, top_k=2, router="deterministic")


def test_modality_router_rejects_unknown_modality_name() -> None:
    moe = MoEMLP(8, 8, MODS, router="modality")
    with pytest.raises(ValueError, match=r"router has no embedding for modalities \['nir'\]"):
        moe(torch.randn(1, 2, 8), torch.tensor([[0, 1]]), ("rgb", "nir"))
