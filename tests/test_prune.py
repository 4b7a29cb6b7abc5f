"""Modality-aware expert pruning (mapex_analysis.ops.prune)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mapex_analysis import create_model, load_model, prune_experts, save_model, slim_width
from mapex_analysis.measure.cost import example_inputs
from mapex_analysis.modalities import ModalityError
from mapex_analysis.ops import apply_plan
from mapex_analysis.ops.prune import _coverage_set, calibration_counts, moe_layers

ALL = ("rgb", "red_edge", "nir", "swir", "sar", "ele")


def _mapex(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return create_model("mapex_test", **kwargs).eval()


def _inputs(model: nn.Module, modalities=None, seed: int = 0, batch: int = 2) -> dict:
    return example_inputs(model, batch_size=batch, modalities=modalities, seed=seed)


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _masked_reference(model: nn.Module, pruned: nn.Module) -> nn.Module:
    """The unpruned model with the router logit of every removed expert set to -inf.

    ``logits = proj(h)``; a bias of -inf makes the removed experts' logits -inf, so top-k never
    selects them (a slot left with a -inf logit, when fewer than k experts remain, is not
    dispatched) and the gates of the others, which depend only on their own logits, stay.
    """
    ref = copy.deepcopy(model)
    layers = moe_layers(ref)
    with torch.no_grad():
        for row in pruned.op_report["layers"]:
            proj = layers[row["module"]].router.proj
            proj.bias[row["removed"]] = float("-inf")
    return ref


@pytest.fixture(scope="module")
def mapex() -> nn.Module:
    return _mapex()


def test_static_keeps_the_modality_groups_and_shared_experts(mapex: nn.Module) -> None:
    pruned = prune_experts(mapex, ["sar"])
    assert pruned.modalities == ("sar",)
    assert list(pruned.patch_embed.keys()) == ["sar"]
    assert list(pruned.modality_embed.keys()) == ["sar"]
    for name, moe in moe_layers(pruned).items():
        assert moe.expert_groups == ["sar"], name
        assert len(moe.experts) == 1 and len(moe.shared_experts) == 1
        assert moe.router.proj.out_features == 1
        assert list(moe.router.prior.keys()) == ["sar"]
        assert moe.router.prior["sar"].shape == (1,)  # sliced to the kept expert
    report = pruned.op_report
    # mapex_test: 6 modalities x 1 expert; "sar" is group index 4 in every layer
    assert report["kept_experts"] == {"blocks.0.mlp": [4], "blocks.1.mlp": [4]}
    assert report["dropped_modalities"] == ["rgb", "red_edge", "nir", "swir", "ele"]
    assert report["traffic_to_removed"] is None  # no calibration given
    assert mapex.modalities == ALL  # the source is untouched
    with pytest.raises(ModalityError, match=r"unknown modality 'rgb'; valid modalities: sar"):
        pruned(_inputs(mapex, ["rgb"]))


@pytest.mark.parametrize(
    ("router", "top_k", "keep"),
    [
        ("modality", 1, ["sar", "rgb"]),
        ("modality", 2, ["swir"]),
        ("pos_embed", 2, ["nir", "ele", "sar"]),
        ("deterministic", 2, ["sar"]),
    ],
)
def test_removing_experts_equals_masking_their_router_logits(
    router: str, top_k: int, keep: list[str]
) -> None:
    # prior_init=0: without the own-group prior, tokens reach other groups at initialisation,
    # so removing those experts changes the output (the mask matters)
    extra = {"prior_init": 0.0} if router == "modality" else {}
    model = _mapex(router=router, experts_per_modality=2, top_k=top_k, **extra)
    x = _inputs(model, keep, seed=1)
    pruned = prune_experts(model, keep)
    n_kept = 2 * len(keep)
    assert [len(m.experts) for m in moe_layers(pruned).values()] == [n_kept, n_kept]
    ref = _masked_reference(model, pruned)
    with torch.no_grad():
        out, expected, unmasked = pruned(x), ref(x), model(x)
    assert out.shape == (2, 32)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    if router == "deterministic":  # other groups' logits were masked already: no change
        assert torch.equal(out, unmasked)
    else:
        assert not torch.allclose(out, unmasked, atol=1e-6)  # the mask mattered


def test_routing_pruning_that_cuts_traffic_still_equals_masking() -> None:
    model = _mapex(experts_per_modality=2, top_k=2)
    keep = ["rgb", "sar"]
    calib = [_inputs(model, keep, seed=s, batch=4) for s in range(2)]
    pruned = prune_experts(model, keep, strategy="routing", calibration=calib, coverage=0.5)
    traffic = pruned.op_report["traffic_to_removed"]
    # 2 batches x 4 scenes x 2 modalities x 4 patches = 64 routed tokens per layer, top-2:
    # 128 assignments per layer, 256 over both layers.
    assert traffic["assignments"] == 256
    assert traffic["overall"] > 0.0  # removed experts did carry calibration traffic
    for row in pruned.op_report["layers"]:
        counts = torch.tensor(row["calibration_counts"])
        assert int(counts.sum()) == 128
        assert row["traffic_to_removed"] == int(counts[row["removed"]].sum()) / 128
        assert int(counts[row["kept"]].sum()) >= 0.5 * 128  # the kept set covers 50 %
    x = _inputs(model, keep, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(x), _masked_reference(model, pruned)(x), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize(
    ("router", "per_mod", "top_k"),
    [("modality", 1, 1), ("pos_embed", 2, 2), ("deterministic", 2, 1), ("modality", 2, 2)],
)
def test_removing_experts_no_calibration_token_reached_leaves_outputs_unchanged(
    router: str, per_mod: int, top_k: int
) -> None:
    model = _mapex(router=router, experts_per_modality=per_mod, top_k=top_k)
    keep, forced = ["rgb", "sar"], 1  # expert 1: rgb's second expert, or red_edge's
    with torch.no_grad():  # make sure every layer has an expert no token reaches
        for moe in moe_layers(model).values():
            moe.router.proj.bias[forced] = -1e4
    calib = [_inputs(model, keep, seed=s, batch=4) for s in (1, 2)]
    pruned = prune_experts(model, keep, strategy="routing", calibration=calib, coverage=1.0)
    report = pruned.op_report
    # coverage 1.0 removes exactly the experts without calibration traffic
    assert report["traffic_to_removed"]["overall"] == 0.0
    assert set(report["traffic_to_removed"]["per_layer"].values()) == {0.0}
    # 2 batches x 4 scenes x 2 modalities x 4 patches = 64 routed tokens per layer, top-k
    assert report["traffic_to_removed"]["assignments"] == 2 * 64 * top_k
    for row in report["layers"]:
        assert row["removed"] == [e for e, c in enumerate(row["calibration_counts"]) if c == 0]
        assert forced in row["removed"]
    layers = moe_layers(model)
    captured: dict[str, tuple] = {}
    hooks = [
        moe.register_forward_pre_hook(lambda _m, args, name=name: captured.__setitem__(name, args))
        for name, moe in layers.items()
    ]
    removed_mass = 0.0
    try:
        with torch.no_grad():
            for x in calib:
                feats, info = model.forward_features(x, return_routing=True)
                # the routing statistics agree: no token reached a removed expert
                for i, row in enumerate(report["layers"]):
                    assert int(info.stats[i].counts[:, row["removed"]].sum()) == 0
                # ... so every token's output is unchanged, on the fed modalities
                torch.testing.assert_close(pruned.forward_features(x), feats, atol=1e-6, rtol=0)
                for row in report["layers"]:
                    h, idx, mods, pos = captured[row["module"]]
                    D = h.shape[-1]
                    r = layers[row["module"]].route(
                        h.reshape(-1, D),
                        idx.reshape(-1),
                        mods,
                        None if pos is None else pos.reshape(-1, D),
                    )
                    mass = r.probs[r.routed][:, row["removed"]].sum(1).max().item()
                    removed_mass = max(removed_mass, mass)
    finally:
        for h in hooks:
            h.remove()
    if router == "deterministic":
        # its probabilities stay on the token's own group, where the removed expert has a
        # logit of -1e4: no mass on any removed expert
        assert removed_mass == 0.0
    else:
        # the removed experts held softmax mass: a Switch gate softmax(z)[e] over all experts
        # would have rescaled every kept gate when they were removed
        assert removed_mass > 1e-3


@pytest.mark.parametrize(
    ("counts", "coverage", "expected"),
    [
        # total 16, need 14.4: 0 (4) + 5 (4) + 1 (3) + 2 (2) + 4 (2) = 15 (ties: lower index)
        ([4, 3, 2, 1, 2, 4], 0.9, [0, 1, 2, 4, 5]),
        # total 16, need 8: experts 2 (10) alone
        ([2, 0, 10, 2, 0, 2], 0.5, [2]),
        # coverage 1.0 keeps every expert that carried traffic, never an unused one
        ([2, 0, 10, 2, 0, 2], 1.0, [0, 2, 3, 5]),
        ([0, 0, 0], 1.0, []),
    ],
)
def test_coverage_set_is_the_smallest_covering_set(
    counts: list[int], coverage: float, expected: list[int]
) -> None:
    assert _coverage_set(torch.tensor(counts), coverage) == expected


def test_pruning_to_all_modalities_is_the_identity(mapex: nn.Module) -> None:
    x = _inputs(mapex)
    static = prune_experts(mapex, list(ALL), coverage=1.0)
    calib = [_inputs(mapex, seed=3, batch=64)]
    routing = prune_experts(mapex, list(ALL), strategy="routing", calibration=calib, coverage=1.0)
    # the own-group prior at initialisation sends every modality's 64 x 4 = 256 tokens to its
    # own expert in both layers, so every expert carried traffic and coverage 1.0 keeps all
    assert [r["calibration_counts"] for r in routing.op_report["layers"]] == [[256] * 6] * 2
    assert routing.op_report["traffic_to_removed"]["overall"] == 0.0
    assert routing.op_report["kept_experts"] == {f"blocks.{i}.mlp": list(range(6)) for i in (0, 1)}
    with torch.no_grad():
        a = mapex(x)
        assert torch.equal(static(x), a)
        assert torch.equal(routing(x), a)
    assert _n(static) == _n(mapex) == _n(routing)


def test_mapex_base_static_to_one_modality_drops_37_to_62_percent() -> None:
    with torch.device("meta"):
        base = create_model("mapex_base")
    pruned = prune_experts(base, ["sar"])
    before, after = _n(base), _n(pruned)
    # Per block (D = hidden = 768): 5 experts x (2 x (768*768 + 768)) = 5,905,920, their router
    # rows 5 x 769 = 3,845, router priors: 5 dropped modalities x 6 + 1 kept x 5 removed = 35
    # -> 5,909,800; x 12 blocks = 70,917,600. Patch embeddings of rgb, red_edge, nir, swir,
    # ele: 11 bands x 16*16*768 + 5 x 768 = 2,166,528; modality embeddings 5 x 768 = 3,840.
    assert before - after == 70_917_600 + 2_166_528 + 3_840 == 73_087_968
    assert 0.37 <= 1 - after / before <= 0.62  # 130,227,960 -> 57,139,992: 56.1 % fewer
    assert pruned.op_report["params_before"] == before


def test_calibration_counts_count_the_kept_modalities_tokens(mapex: nn.Module) -> None:
    calib = [_inputs(mapex, seed=0, batch=3)]  # all six modalities, plus a label key
    calib[0]["label"] = torch.zeros(3, dtype=torch.long)
    counts = calibration_counts(mapex, calib, ["nir", "ele"])
    # 3 scenes x 2 modalities x 4 patches = 24 routed tokens, top-1 -> 24 per layer
    assert {k: int(v.sum()) for k, v in counts.items()} == {"blocks.0.mlp": 24, "blocks.1.mlp": 24}
    # a single batch dict is one batch, not an iterable of its keys
    single = calibration_counts(mapex, calib[0], ["nir", "ele"])
    assert all(torch.equal(single[k], counts[k]) for k in counts)
    with pytest.raises(ValueError, match=r"calibration batch is a modality dict .* got str"):
        calibration_counts(mapex, ["sar"], ["sar"])


def test_prune_then_slim_saves_reloads_and_matches(mapex: nn.Module, tmp_path: Path) -> None:
    keep = ["rgb", "sar"]
    calib = [_inputs(mapex, keep, seed=2, batch=4)]
    pruned = prune_experts(mapex, keep, strategy="routing", calibration=calib, coverage=0.8)
    both = slim_width(pruned, 0.5, order="magnitude")
    assert [p["op"] for p in both.applied_ops] == ["prune_experts", "slim_width"]
    # every expert hidden 32 -> 16, attention head dim 16 -> 8
    for moe in moe_layers(both).values():
        assert {e.fc1.out_features for e in [*moe.experts, *moe.shared_experts]} == {16}
    assert both.blocks[0].attn.head_dim == 8
    save_model(both, tmp_path / "ckpt")
    spec = json.loads((tmp_path / "ckpt" / "spec.json").read_text())
    assert spec["ops"] == both.applied_ops
    loaded = load_model(tmp_path / "ckpt")
    x = _inputs(mapex, keep, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), both(x))
    assert _n(loaded) == _n(both) < _n(mapex)
    assert loaded.modalities == ("rgb", "sar")


def test_apply_plan_replays_a_pruning_plan(mapex: nn.Module) -> None:
    calib = [_inputs(mapex, ["swir"], seed=4)]
    pruned = prune_experts(mapex, "swir", strategy="routing", calibration=calib, coverage=0.6)
    replay = apply_plan(mapex, pruned.applied_ops[0])
    x = _inputs(mapex, ["swir"], seed=6)
    with torch.no_grad():
        assert torch.equal(replay(x), pruned(x))
    assert replay.op_report["kept_experts"] == pruned.op_report["kept_experts"]


def test_bad_arguments(mapex: nn.Module) -> None:
    with pytest.raises(ModalityError, match=r"no modality 'hyperspectral'; valid modalities: rgb"):
        prune_experts(mapex, ["sar", "hyperspectral"])
    with pytest.raises(ModalityError, match=r"empty modality list"):
        prune_experts(mapex, [])
    with pytest.raises(ValueError, match=r"unknown pruning strategy 'greedy'; valid strategies"):
        prune_experts(mapex, ["sar"], strategy="greedy")
    for cov in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"coverage must be a share in \(0, 1\], got {cov}"):
            prune_experts(mapex, ["sar"], coverage=cov)
    with pytest.raises(ValueError, match=r"strategy 'routing' needs calibration"):
        prune_experts(mapex, ["sar"], strategy="routing")
    with pytest.raises(ValueError, match=r"calibration yielded no batch"):
        prune_experts(mapex, ["sar"], strategy="routing", calibration=[])
    with pytest.raises(ValueError, match=r"batch 0 lacks the pruned-to modalities \['sar'\]"):
        prune_experts(mapex, ["sar"], strategy="routing", calibration=[_inputs(mapex, ["rgb"])])
    # static pruning with calibration checks it too (it reports traffic_to_removed)
    with pytest.raises(ValueError, match=r"batch 1 lacks the pruned-to modalities \['sar'\]"):
        prune_experts(mapex, ["rgb", "sar"], calibration=[_inputs(mapex, ["rgb", "sar"]),
                                                         _inputs(mapex, ["rgb"])])  # fmt: skip
    with pytest.raises(ModalityError, match=r"MAPEX has no modality 'hsi'; valid modalities: rgb"):
        prune_experts(mapex, ["hsi"])
    dense = create_model("vit_mae_test")
    with pytest.raises(TypeError, match=r"GroupChannelViT has no mixture-of-experts layer"):
        prune_experts(dense, ["sar"])
    plan = prune_experts(mapex, ["sar"]).applied_ops[0]
    with pytest.raises(ValueError, match=r"must be distinct indices in \[0, 6\); bad: \[9\]"):
        apply_plan(mapex, {**plan, "kept_experts": {"blocks.0.mlp": [9], "blocks.1.mlp": [4]}})


def test_own_group_prior_makes_static_pruning_lossless_at_initialisation() -> None:
    # a fresh modality router: every token starts on its own group, so static pruning removes
    # experts that carried no calibration traffic and the outputs are unchanged
    model = _mapex(router="modality", experts_per_modality=2)
    calib = [_inputs(model, ["nir"], seed=2, batch=8)]
    pruned = prune_experts(model, ["nir"], calibration=calib)
    assert pruned.op_report["traffic_to_removed"]["overall"] == 0.0
    x = _inputs(model, ["nir"], seed=5)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-6, rtol=0)


def test_mapex_base_pruned_to_one_modality_runs_without_the_others() -> None:
    torch.manual_seed(0)
    base = create_model("mapex_base").eval()
    pruned = prune_experts(base, ["sar"])
    others = ["rgb", "red_edge", "nir", "swir", "ele"]
    keys = list(pruned.state_dict())
    assert not [k for k in keys if any(f".{m}" in k for m in others)], keys[:5]
    assert pruned.modalities == ("sar",)
    with torch.no_grad():
        out = pruned(example_inputs(pruned, batch_size=1, modalities=["sar"]))
    assert out.shape == (1, 768)
