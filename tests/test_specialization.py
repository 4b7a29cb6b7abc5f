"""Expert specialisation from routing counts: hand-wired routers, hand-derived numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mapex_analysis.measure.specialization import (
    RoutingCounts,
    collect_routing,
    mutual_information_bits,
    normalized_routing_entropy,
    own_group_share,
    routing_frequency,
    specialization_metrics,
)

MODS = ("rgb", "sar", "ele")


def test_one_hot_router_mi_equals_modality_entropy() -> None:
    # rgb -> expert 0, sar -> expert 1, ele -> expert 2; token shares p(m) = (.25, .5, .25):
    # H(M) = -(2 * .25 log2 .25 + .5 log2 .5) = 1 + .5 = 1.5 bits, and MI = H(M).
    counts = np.array([[10, 0, 0], [0, 20, 0], [0, 0, 10]])
    rep = specialization_metrics([RoutingCounts(counts, MODS, MODS)])
    (ly,) = rep.layers
    assert ly.modality_entropy_bits == pytest.approx(1.5, abs=1e-12)
    assert ly.mutual_information_bits == pytest.approx(1.5, abs=1e-12)
    np.testing.assert_array_equal(ly.entropy, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(ly.own_group_share, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(ly.frequency, np.eye(3))


def test_uniform_router_has_zero_mi_and_entropy_one() -> None:
    counts = torch.tensor([[5, 5, 5, 5], [10, 10, 10, 10]])  # torch counts accepted too
    assert mutual_information_bits(counts) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(normalized_routing_entropy(counts), [1.0, 1.0], atol=1e-12)
    groups = ("rgb", "rgb", "sar", "sar")
    # half of each modality's tokens land on its own two experts
    np.testing.assert_allclose(own_group_share(counts, ("rgb", "sar"), groups), [0.5, 0.5])


def test_partial_specialisation_hand_derived() -> None:
    # joint p = [[.375, .125], [.125, .375]]: H(M) = H(E) = 1 bit,
    # H(M,E) = -2(.375 log2 .375) - 2(.125 log2 .125) = 1.0612781 + .75 = 1.8112781,
    # MI = 2 - 1.8112781 = 0.1887219 bits. Per modality H(.75, .25)/log 2 = 0.8112781.
    counts = np.array([[3, 1], [1, 3]])
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert mutual_information_bits(counts) == pytest.approx(2.0 - (1.0 + h), abs=1e-12)
    assert mutual_information_bits(counts) == pytest.approx(0.1887219, abs=1e-7)
    np.testing.assert_allclose(normalized_routing_entropy(counts), [h, h], atol=1e-12)
    np.testing.assert_allclose(
        own_group_share(counts, ("rgb", "sar"), ("rgb", "sar")), [0.75, 0.75]
    )
    np.testing.assert_allclose(routing_frequency(counts), [[0.75, 0.25], [0.25, 0.75]])


def test_absent_modality_and_pruned_group_are_nan() -> None:
    # ele sent no tokens; sar owns no routed expert (pruned away)
    counts = np.array([[4, 0], [2, 2], [0, 0]])
    freq = routing_frequency(counts)
    assert np.isnan(freq[2]).all()
    np.testing.assert_allclose(freq[:2].sum(axis=1), [1.0, 1.0])
    share = own_group_share(counts, MODS, ("rgb", "ele"))
    assert share[0] == 1.0 and np.isnan(share[1]) and np.isnan(share[2])
    # single routed expert: entropy / log 1 is undefined
    assert np.isnan(normalized_routing_entropy(np.array([[3], [2]]))).all()


def test_report_skips_dense_blocks_and_emits_tidy_rows() -> None:
    counts = np.array([[10, 0, 0], [0, 20, 0], [0, 0, 10]])
    stats = [None, RoutingCounts(counts, MODS, MODS), None, RoutingCounts(counts.T, MODS, MODS)]
    rep = specialization_metrics(stats)
    assert [ly.layer for ly in rep.layers] == [1, 3]
    rows = rep.rows()
    # per layer: 3x3 frequencies + 3 modalities x 2 per-modality measures + 2 layer measures = 17
    assert len(rows) == 2 * 17
    mi = [r for r in rows if r["metric"] == "mutual_information"]
    assert [r["unit"] for r in mi] == ["bits", "bits"]
    assert mi[0]["value"] == pytest.approx(1.5)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no layer has routing statistics"):
        specialization_metrics([None, None])
    with pytest.raises(ValueError, match=r"\(M, E\) matrix"):
        mutual_information_bits(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="all zero"):
        mutual_information_bits(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="do not match 2 modalities x 3 expert groups"):
        own_group_share(np.ones((2, 2)), ("rgb", "sar"), ("rgb", "sar", "ele"))


class HandWiredRouter(torch.nn.Module):
    """Test double of the MoE token-model contract with a hand-wired router: ``mode="one_hot"``
    sends modality i's tokens to expert i; ``mode="uniform"`` sends token j to expert j mod E.
    Block 0 has no MoE (``None`` stats), block 1 routes."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.modalities = ("rgb", "sar")

    def tokenize(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [torch.full((len(x[m]), 4), i) for i, m in enumerate(self.modalities) if m in x]
        mi = torch.cat(idx, dim=1)  # 4 tokens per modality
        return torch.zeros(*mi.shape, 2), mi

    def encode(self, tokens: torch.Tensor, modality_index: torch.Tensor, *, return_routing: bool):
        from types import SimpleNamespace

        b, n = modality_index.shape
        expert = modality_index if self.mode == "one_hot" else torch.arange(n).expand(b, n) % 2
        counts = torch.zeros(2, 2, dtype=torch.long)
        counts.index_put_((modality_index.ravel(), expert.ravel()), torch.ones(b * n).long(), True)
        stats = SimpleNamespace(
            counts=counts, modalities=self.modalities, expert_groups=("rgb", "sar")
        )
        return tokens, SimpleNamespace(aux_loss=torch.tensor(0.0), stats=[None, stats])


def test_collect_routing_sums_batches_of_a_hand_wired_router() -> None:
    data = {"rgb": np.zeros((5, 3, 8, 8)), "sar": np.zeros((5, 2, 8, 8))}
    stats = collect_routing(
        HandWiredRouter("one_hot"), data, modalities=["rgb", "sar"], batch_size=2
    )
    assert stats[0] is None
    # 5 samples x 4 tokens per modality = 20 tokens each, summed over batches of 2, 2, 1
    np.testing.assert_array_equal(stats[1].counts, [[20, 0], [0, 20]])
    rep = specialization_metrics(stats)
    assert rep.layers[0].mutual_information_bits == pytest.approx(1.0)  # H(M) = 1 bit
    np.testing.assert_array_equal(rep.layers[0].own_group_share, [1.0, 1.0])
    uni = collect_routing(HandWiredRouter("uniform"), data, modalities=["rgb", "sar"])
    np.testing.assert_array_equal(uni[1].counts, [[10, 10], [10, 10]])
    assert specialization_metrics(uni).layers[0].mutual_information_bits == pytest.approx(0.0)
    np.testing.assert_allclose(specialization_metrics(uni).layers[0].entropy, [1.0, 1.0])
    with pytest.raises(KeyError, match="modality 'ele' is not in the data; available: rgb, sar"):
        collect_routing(HandWiredRouter("uniform"), data, modalities=["ele"])


def test_mapex_deterministic_router_is_fully_specialised() -> None:
    from mapex_analysis.data import SynthEO
    from mapex_analysis.factory import create_model

    model = create_model("mapex_test", router="deterministic")
    data = SynthEO("landcover", "train", n=6, img_size=16, cache=False).arrays()
    stats = collect_routing(model, data, modalities=["rgb", "sar", "ele"], batch_size=4)
    rep = specialization_metrics(stats)
    assert [ly.layer for ly in rep.layers] == [0, 1]  # mapex_test: MoE in both blocks
    for ly in rep.layers:
        # 6 scenes x (16/8)^2 = 4 patch tokens = 24 tokens per fed modality, all on own expert
        assert ly.counts.sum() == 3 * 24
        assert ly.modalities == model.modalities
        i = [ly.modalities.index(m) for m in ("rgb", "sar", "ele")]
        assert ly.counts[i, i].tolist() == [24, 24, 24]
        # equal thirds: MI = H(M) = log2(3) bits
        assert ly.mutual_information_bits == pytest.approx(math.log2(3), abs=1e-12)
        np.testing.assert_array_equal(ly.entropy[i], [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(ly.own_group_share[i], [1.0, 1.0, 1.0])
        assert np.isnan(ly.own_group_share[ly.modalities.index("nir")])  # not fed


def test_study_routing_recorded_by_the_feature_pass_equals_its_own_pass(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eval cell's specialisation rows come from the routing its test-split feature pass
    recorded; with features from the cache (no pass) the measure runs one of its own. Both give
    the same rows, and only the second calls :func:`collect_routing`."""
    import pandas as pd
    from fixtures.studies import write_smoke

    from mapex_analysis.study import cells as cells_mod
    from mapex_analysis.study.context import StudyContext
    from mapex_analysis.study.grid import plan_grid
    from mapex_analysis.study.measures import specialization as spec_mod
    from mapex_analysis.study.schema import load_study

    calls: list[int] = []
    real = spec_mod.collect_routing
    monkeypatch.setattr(spec_mod, "collect_routing",
                        lambda *a, **k: calls.append(1) or real(*a, **k))  # fmt: skip
    study = load_study(write_smoke(tmp_path))
    ctx = StudyContext(study)
    cell = next(c for c in plan_grid(study) if c.kind == "eval" and c.model == "mapex"
                and c.variant.kind == "base" and c.task == study.tasks[0])  # fmt: skip

    def routing_rows() -> pd.DataFrame:
        rows = pd.DataFrame(cells_mod.cell_rows(ctx, cell))
        return rows[rows["protocol"] == "routing"].reset_index(drop=True)

    recorded = routing_rows()  # features extracted: the pass records the routing
    assert calls == []
    own_pass = routing_rows()  # features from the cache: a pass of its own
    assert calls == [1]
    assert len(recorded) > 10 and set(recorded["metric"]) >= {"mutual_information",
                                                              "params_active_routed"}  # fmt: skip
    pd.testing.assert_frame_equal(recorded, own_pass)


def test_routing_recorder_counts_equal_collect_routing() -> None:
    from mapex_analysis.data import SynthEO
    from mapex_analysis.eval.features import extract_features
    from mapex_analysis.factory import create_model
    from mapex_analysis.measure.specialization import RoutingRecorder

    torch.manual_seed(0)
    model = create_model("mapex_test").eval()
    data = SynthEO("landcover", "test", n=20, img_size=16, cache=False).arrays()
    mods = ["rgb", "sar"]
    with RoutingRecorder(model) as rec:
        extract_features(model, data, modalities=mods, batch_size=8)
    assert rec.counts(19) is None  # not the number of samples that passed
    got = rec.counts(20)
    ref = collect_routing(model, data, modalities=mods, batch_size=20)
    assert got is not None and len(got) == len(ref) == 2
    for a, b in zip(got, ref, strict=True):
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.counts, b.counts)
        assert a.modalities == b.modalities and a.expert_groups == b.expert_groups
    # top-1: every patch token of every scene is counted once per layer (16 px / patch 8)
    assert int(got[0].counts.sum()) == 20 * 2 * 4
    extract_features(model, data, modalities=mods)  # after the block: nothing is recorded
    assert rec.counts(20) is not None and int(rec.counts(20)[0].counts.sum()) == 160
