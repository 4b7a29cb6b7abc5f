"""MoE layer: sparse dispatch vs a dense reference, gradients, routing statistics, aux loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
    """Every expert on every token, then keep the gated top-k: the slow definition.

    Written from the definition, not from ``moe.route``: deterministic tokens may only use
    their modality's group; top-k by logit; gate ``sigmoid(logit)`` (learned routers) or ``1``
    (deterministic); CLS tokens (index -1) take the shared experts only.
    """
    B, N, D = x.shape
    flat, fidx, fpos = x.reshape(-1, D), idx.reshape(-1), pos.reshape(-1, D)
    logits = moe.router(flat, fidx, MODS, fpos)  # (T, E)
    routed = fidx >= 0
    if moe.router.kind == "deterministic":
        groups = [MODS.index(g) for g in moe.expert_groups]
        allowed = torch.tensor(groups).unsqueeze(0) == fidx.unsqueeze(1)  # (T, E)
        logits = logits.masked_fill(~allowed, float("-inf"))
    top_logit, top_idx = logits.topk(moe.top_k, dim=-1)
    if moe.router.kind == "deterministic":
        gate = torch.ones_like(top_logit)
    else:
        gate = torch.sigmoid(top_logit)
    gate = gate * routed.unsqueeze(-1)
    all_out = torch.stack([e(flat) for e in moe.experts], dim=1)  # (T, E, D)
    gates = torch.zeros(flat.shape[0], moe.num_experts).scatter(1, top_idx, gate)
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


def test_deterministic_router_with_one_expert_per_modality_has_gate_one() -> None:
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=1, router="deterministic")
    with torch.no_grad():  # logits far from 0: a sigmoid or softmax gate would not be 1
        moe.router.proj.weight.normal_(std=1.0)
        moe.router.proj.bias.normal_(std=3.0)
    x, idx, pos = _inputs()
    flat, fidx = x.reshape(-1, 16), idx.reshape(-1)
    r = moe.route(flat, fidx, MODS, pos.reshape(-1, 16))
    n_routed = 2 * 11  # 2 rows x 11 modality tokens (token 0 is CLS)
    assert r.top_gate.shape == (24, 1)
    assert int(r.routed.sum()) == n_routed
    assert torch.equal(r.top_gate[r.routed], torch.ones(n_routed, 1))
    assert float(r.top_gate[~r.routed].abs().sum()) == 0.0
    assert torch.equal(r.top_idx[r.routed, 0], fidx[r.routed])  # modality m -> expert m
    # so a modality token's output is exactly its modality's expert plus the shared expert
    out = moe(x, idx, MODS, pos).out.reshape(-1, 16)
    tok = r.routed.nonzero().squeeze(1)
    expected = torch.stack(
        [moe.experts[int(fidx[t])](flat[t]) + moe.shared_experts[0](flat[t]) for t in tok]
    )
    torch.testing.assert_close(out[tok], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("router", ["modality", "pos_embed"])
def test_learned_router_gate_is_the_sigmoid_of_the_selected_logit(router: str) -> None:
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=2, top_k=2, router=router)
    x, idx, pos = _inputs(B=2, N=12)
    flat, fidx, fpos = x.reshape(-1, 16), idx.reshape(-1), pos.reshape(-1, 16)
    with torch.no_grad():
        r = moe.route(flat, fidx, MODS, fpos)
        logits = moe.router(flat, fidx, MODS, fpos)
    assert r.top_idx.shape == r.top_gate.shape == (24, 2)
    assert torch.equal(r.top_idx[r.routed], logits.topk(2, dim=-1).indices[r.routed])
    expected = torch.sigmoid(logits.gather(1, r.top_idx)) * r.routed.unsqueeze(-1)
    torch.testing.assert_close(r.top_gate, expected, atol=1e-7, rtol=0)
    assert float(r.top_gate[~r.routed].abs().sum()) == 0.0  # CLS: no routed expert


def test_aux_loss_is_the_switch_formula_over_softmax_probabilities() -> None:
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=2, top_k=2, router="modality")
    x, idx, pos = _inputs(B=3, N=10)
    res = moe(x, idx, MODS, pos)
    with torch.no_grad():
        r = moe.route(x.reshape(-1, 16), idx.reshape(-1), MODS, pos.reshape(-1, 16))
    # f_e: share of the 3 * 9 * 2 = 54 assignments; P_e: mean softmax probability over the
    # 27 routed tokens; aux = E * sum_e f_e * P_e
    assert int(res.stats.counts.sum()) == 54
    f = res.stats.counts.sum(0).float() / 54
    p = r.probs[r.routed].mean(0)
    assert r.probs[r.routed].sum(1).sub(1).abs().max().item() < 1e-6  # rows are softmaxes
    assert res.aux_loss.item() == pytest.approx(6 * float((f * p).sum()), rel=1e-6)


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
    with pytest.raises(ValueError, match=r"router has no prior for modalities \['nir'\]"):
        moe(torch.randn(1, 2, 8), torch.tensor([[0, 1]]), ("rgb", "nir"))


def test_modality_router_logits_are_the_projection_plus_the_modality_prior() -> None:
    # the definition: proj(x) + b[m], b[m] starting at prior_init on m's own group, 0 elsewhere;
    # no prior for CLS (index -1)
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=2, router="modality", prior_init=3.0)
    assert moe.router.prior["sar"].tolist() == [0.0, 0.0, 3.0, 3.0, 0.0, 0.0]
    x, idx, _ = _inputs()
    flat, fidx = x.reshape(-1, 16), idx.reshape(-1)
    prior = torch.stack([moe.router.prior[m] for m in MODS] + [torch.zeros(6)])
    expected = (
        torch.nn.functional.linear(flat, moe.router.proj.weight, moe.router.proj.bias) + prior[fidx]
    )
    got = moe.router(flat, fidx, MODS)
    assert got.shape == (24, 6)
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    got.sum().backward()
    assert all(float(moe.router.prior[m].grad.abs().sum()) > 0 for m in MODS)


def test_pos_embed_router_sees_only_the_position_embedding() -> None:
    # same positions, different tokens and modalities: same logits (no modality signal)
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=2, router="pos_embed")
    x, idx, pos = _inputs()
    flat, fpos = x.reshape(-1, 16), pos.reshape(-1, 16)
    a = moe.router(flat, idx.reshape(-1), MODS, fpos)
    b = moe.router(torch.randn_like(flat), (idx.reshape(-1) + 1) % 3, MODS, fpos)
    assert torch.equal(a, b)
    assert len(moe.router.prior) == 0
    with pytest.raises(ValueError, match="pos_embed router needs the tokens' position"):
        moe.router(flat, idx.reshape(-1), MODS, None)


def test_mutual_information_loss_is_minus_the_mi_of_the_router_distribution() -> None:
    from mapex_analysis.models.moe import mutual_information_loss

    # two modalities, each token puts all its mass on its own expert: MI = H(M) = log 2
    probs_t = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])  # (E=2, T=4)
    idx = torch.tensor([0, 0, 1, 1])
    routed = torch.ones(4, dtype=torch.bool)
    assert mutual_information_loss(probs_t, idx, routed, 2).item() == pytest.approx(
        -torch.log(torch.tensor(2.0)).item(), abs=1e-6
    )
    # routing that ignores the modality: MI = 0
    uniform = torch.full((2, 4), 0.5)
    assert mutual_information_loss(uniform, idx, routed, 2).item() == pytest.approx(0.0, abs=1e-6)
    # unrouted tokens do not count
    assert mutual_information_loss(probs_t, idx, torch.zeros(4, dtype=torch.bool), 2).item() == 0


def test_deterministic_router_has_zero_mi_loss_and_learned_routers_a_gradient() -> None:
    torch.manual_seed(0)
    x, idx, pos = _inputs(B=3, N=20)
    det = MoEMLP(16, 24, MODS, experts_per_modality=2, router="deterministic")
    assert det(x, idx, MODS, pos).mi_loss.item() == 0.0
    mod = MoEMLP(16, 24, MODS, experts_per_modality=2, router="modality")
    res = mod(x, idx, MODS, pos)
    assert -1.1 < res.mi_loss.item() < 0.0  # own-group prior: MI > 0, at most log 3 nats
    res.mi_loss.backward()
    assert float(mod.router.prior["rgb"].grad.abs().sum()) > 0


@pytest.mark.parametrize("router", ["modality", "pos_embed", "deterministic"])
def test_without_aux_the_output_and_statistics_are_unchanged(router: str) -> None:
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=2, top_k=1, router=router)
    x, idx, pos = _inputs(B=3, N=20)
    full = moe(x, idx, MODS, pos)
    lean = moe(x, idx, MODS, pos, with_aux=False)
    assert lean.aux_loss is None and full.aux_loss is not None
    assert torch.equal(lean.out, full.out)
    assert torch.equal(lean.stats.counts, full.stats.counts)


def test_mi_loss_is_taken_over_expert_groups() -> None:
    # a prior so large that all softmax mass stays on the own group (split over its 2
    # experts): the modality-group MI is then H(M), whatever the split inside the group
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=2, router="modality", prior_init=50.0)
    x, idx, pos = _inputs(B=1, N=12)  # modalities of the 11 routed tokens: 3 x 0, 4 x 1, 4 x 2
    p = torch.tensor([3.0, 4.0, 4.0]) / 11
    h_m = float(-(p * p.log()).sum())
    assert moe(x, idx, MODS, pos).mi_loss.item() == pytest.approx(-h_m, abs=1e-5)
    # rgb tokens on expert 0 and sar tokens on expert 1: different experts of one group, so
    # the group-level MI only tells ele apart: H(G) of (rgb + sar, ele) = (7, 4) / 11
    with torch.no_grad():
        for m, e in (("rgb", 0), ("sar", 1), ("ele", 4)):
            moe.router.prior[m].zero_()
            moe.router.prior[m][e] = 50.0
    q = torch.tensor([7.0, 4.0]) / 11
    assert moe(x, idx, MODS, pos).mi_loss.item() == pytest.approx(
        float((q * q.log()).sum()), abs=1e-5
    )
    # without a prior, at initialisation routing barely depends on the modality
    flat = MoEMLP(16, 24, MODS, experts_per_modality=2, router="modality", prior_init=0.0)
    assert -0.1 < flat(x, idx, MODS, pos).mi_loss.item() <= 0.0


@pytest.mark.parametrize(("router", "per_mod", "shared"),
                         [("modality", 2, 1), ("pos_embed", 1, 2), ("deterministic", 2, 1)])  # fmt: skip
def test_fused_inference_dispatch_equals_the_definition(
    router: str, per_mod: int, shared: int
) -> None:
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=per_mod, shared_experts=shared, router=router)
    moe.eval()
    x, idx, pos = _inputs()
    with torch.no_grad():
        assert moe._fusable()  # eval, no gradients, top-1, a shared expert, plain timm Mlps
        fused = moe(x, idx, MODS, pos).out
        ref = _dense_reference(moe, x, idx, pos)
    assert torch.allclose(fused, ref, atol=1e-5), (fused - ref).abs().max()
    # the module path (gradients on) gives the same output; CLS tokens (index -1) included
    assert torch.allclose(moe(x, idx, MODS, pos).out.detach(), fused, atol=1e-5)
    # a changed weight is picked up (the stacked weights are cached by storage and version)
    with torch.no_grad():
        moe.shared_experts[0].fc2.bias.add_(1.0)
        moved = moe(x, idx, MODS, pos).out
    assert torch.allclose(moved, fused + 1.0, atol=1e-5)


def test_fused_weights_are_stacked_once_and_rebuilt_when_an_expert_changes() -> None:
    torch.manual_seed(0)
    moe = MoEMLP(16, 24, MODS, experts_per_modality=2, router="modality").eval()
    x, idx, pos = _inputs()
    with torch.no_grad():
        plan = moe._fused_plan()
        assert plan is not None and moe._fused_plan() is plan  # reused while nothing changed
        moe(x, idx, MODS, pos)
        assert moe._fused_plan() is plan
        # a replaced expert layer (what slimming does) is picked up: new stacked weights
        moe.experts[1].fc1 = nn.Linear(16, 24)
        rebuilt = moe._fused_plan()
        assert rebuilt is not None and rebuilt is not plan
        assert rebuilt.experts[1][0].shape == (48, 16)  # shared + expert 1 fc1 rows
        torch.testing.assert_close(rebuilt.experts[1][0][24:], moe.experts[1].fc1.weight)
        out = moe(x, idx, MODS, pos).out
        ref = _dense_reference(moe, x, idx, pos)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    # a hidden norm makes the layer unfusable (the module path runs it)
    moe.experts[0].norm = nn.LayerNorm(24)
    with torch.no_grad():
        assert moe._fused_plan() is None


def test_fused_dispatch_is_only_taken_at_inference_with_top_1() -> None:
    moe = MoEMLP(16, 24, MODS, experts_per_modality=2, top_k=1)
    with torch.no_grad():
        assert not moe._fusable()  # training mode
        moe.eval()
        assert moe._fusable()
    assert not moe._fusable()  # gradients enabled
    top2 = MoEMLP(16, 24, MODS, experts_per_modality=2, top_k=2).eval()
    no_shared = MoEMLP(16, 24, MODS, shared_experts=0).eval()
    with torch.no_grad():
        assert not top2._fusable() and not no_shared._fusable()
