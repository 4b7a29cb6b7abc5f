"""Report: retention / relative MACs / Pareto front from a hand-made table, and the HTML page."""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mapex_analysis.report import modality_findings, render_report
from mapex_analysis.report.figures import (
    binned_retention,
    collapse_duplicate_widths,
    compute_bin,
    pareto_front,
    probe_summary,
)
from mapex_analysis.study.results import read_results, write_cell

# (model, role, variant, operator, prune, width, modalities, MACs, k-NN accuracy)
ROWS = [
    ("m", "mapex", "base", "none", "", 1.0, "rgb+sar", 1000, 0.80),
    ("m", "mapex", "base", "none", "", 1.0, "sar", 400, 0.60),
    ("m", "mapex", "prune[sar]", "prune", "sar", 1.0, "sar", 380, 0.60),
    ("m", "mapex", "prune[sar]+slim[0.5,attn+mlp,first]", "prune+slim", "sar", 0.5, "sar", 200,
     0.58),
    ("m", "mapex", "slim[0.5,attn+mlp,first]", "slim", "", 0.5, "rgb+sar", 600, 0.70),
    ("d", "dense", "base", "none", "", 1.0, "rgb+sar", 900, 0.75),
    ("d", "dense", "base", "none", "", 1.0, "sar", 350, 0.50),
    ("d", "dense", "slim[0.5,attn+mlp,first]", "slim", "", 0.5, "rgb+sar", 500, 0.74),
]  # fmt: skip


def write_table(folder: Path) -> None:
    """A two-model study table written as cell files (one per row pair)."""
    for i, (model, role, variant, op, prune, width, mods, macs, acc) in enumerate(ROWS):
        common = dict(study="hand", model=model, role=role, variant=variant, operator=op,
                      prune=prune, width=width, modalities=mods)  # fmt: skip
        write_cell(folder, f"c{i}", [
            common | dict(protocol="cost", metric="macs", value=float(macs), unit="MACs"),
            common | dict(protocol="cost", metric="params_total", value=1e4 * width,
                          unit="parameters"),
            common | dict(task="landcover", seed=0, protocol="knn", metric="accuracy",
                          value=acc, unit="fraction"),
        ])  # fmt: skip


@pytest.fixture
def table(tmp_path: Path) -> pd.DataFrame:
    write_table(tmp_path)
    (tmp_path / "config.resolved.yaml").write_text("name: hand\nretention_target: 0.95\n")
    return read_results(tmp_path)


def test_summary_retention_and_relative_macs(table: pd.DataFrame) -> None:
    s = probe_summary(table).set_index(["model", "variant", "modalities"])
    ps = s.loc[("m", "prune[sar]+slim[0.5,attn+mlp,first]", "sar")]
    assert ps["retention"] == pytest.approx(0.58 / 0.60)  # vs m base fed sar = 0.9667
    assert ps["rel_macs"] == pytest.approx(200 / 1000)  # vs m base fed rgb+sar
    assert s.loc[("d", "slim[0.5,attn+mlp,first]", "rgb+sar"), "rel_macs"] == pytest.approx(
        500 / 900
    )
    assert s.loc[("m", "slim[0.5,attn+mlp,first]", "rgb+sar"), "retention"] == pytest.approx(
        0.70 / 0.80
    )


def test_pareto_front_by_hand(table: pd.DataFrame) -> None:
    s = probe_summary(table)
    front = pareto_front(s, "rel_macs", "value")
    # Sorted by cost: (0.2, .58) (0.38, .60) [(0.389, .50), (0.4, .60) dominated]
    # (0.556, .74) [(0.6, .70) dominated] (1.0, .80) [(1.0, .75) dominated].
    assert front["rel_macs"].round(3).tolist() == [0.2, 0.38, 0.556, 1.0]
    assert front["value"].tolist() == [0.58, 0.60, 0.74, 0.80]


def test_findings_name_the_cheapest_operator(table: pd.DataFrame) -> None:
    lines = modality_findings(probe_summary(table), 0.95)
    assert len(lines) == 2  # (m, sar) and (d, sar)
    m_line = next(x for x in lines if ", m on sar" in x)
    assert "prune+slim reaches 95% retention" in m_line
    assert "200 MACs/sample" in m_line and "20.0% of its MACs" in m_line
    d_line = next(x for x in lines if ", d on sar" in x)
    assert "no operator (the full model)" in d_line
    # At a 99 % target the prune+slim variant (96.7 %) no longer qualifies; prune (100 %) does.
    strict = modality_findings(probe_summary(table), 0.99)
    assert "prune reaches 99% retention" in next(x for x in strict if ", m on sar" in x)


def test_html_numbers_equal_table(tmp_path: Path, table: pd.DataFrame) -> None:
    path = render_report(tmp_path)
    page = path.read_text()
    assert "<script src" not in page and "Plotly.newPlot" in page  # plotly inlined, offline
    cells = re.findall(r'data-value="([^"]+)" data-unit="[^"]+" data-query="([^"]+)"', page)
    # short answer: 1 (landcover, sar); the seed-style table and the every-protocol table:
    # 2 models x (sar, all, params) = 6 numbers each
    assert len(cells) == 13
    for value, query in cells:
        q = json.loads(unescape(query))
        agg = q.pop("agg", "mean")  # a cell says how it aggregates its rows (default: mean)
        sel = table
        for k, v in q.items():
            sel = sel[sel[k] == v]
        assert float(value) == pytest.approx(getattr(sel["value"], agg)(), rel=0, abs=0)
    assert ">60.0<" in page  # m pruned to sar: 0.60 shown in %
    # retention + Pareto + slimming by model (m and d are both slimmed); no latency etc. rows
    assert page.count('data-figure="1"') == 4  # + slimmed accuracy by model


def test_report_without_results_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no finished cells"):
        render_report(tmp_path)


def test_routing_tables_fall_back_to_model_labels_without_router_labels(tmp_path: Path) -> None:
    # a study whose MAPEX model declares no `router:` still gets its traffic and routing tables
    from mapex_analysis.report.routing import router_learned_sentences, traffic_table

    c = dict(study="r", model="mx", role="mapex", modalities="sar", protocol="cost")
    rows = [c | dict(variant="prune[sar]", operator="prune", metric="traffic_to_removed",
                     value=0.25, unit="fraction of calibration assignments")]  # fmt: skip
    r = dict(study="r", model="mx", role="mapex", variant="base", modalities="rgb+sar",
             task="landcover", seed=0, protocol="routing", layer=0)  # fmt: skip
    rows += [r | dict(metric="own_group_share", value=0.75, unit="fraction", subject="sar"),
             r | dict(metric="mutual_information", value=0.5, unit="bits"),
             r | dict(metric="modality_entropy", value=1.0, unit="bits")]  # fmt: skip
    write_cell(tmp_path, "x", rows)
    df = read_results(tmp_path)
    table = traffic_table(df)
    assert "<th>mx</th>" in table and 'data-value="0.25"' in table and ">25.0</td>" in table
    (sentence,) = router_learned_sentences(df)
    assert sentence.startswith("mx (router kind not declared in the study): measured:")
    assert "own group 75.0-75.0 %" in sentence and "25.00-25.00 %" in sentence


def test_no_empty_figure_is_emitted_and_the_gap_is_said(tmp_path: Path) -> None:
    from mapex_analysis.report import render_report
    from mapex_analysis.study.results import write_cell

    for i, (variant, op, width, macs) in enumerate(
        [("base", "none", 1.0, 1000.0), ("slim[0.5,attn+mlp,first]", "slim", 0.5, 600.0)]
    ):
        c = dict(study="e", model="m", role="mapex", variant=variant, operator=op, width=width,
                 modalities="rgb")  # fmt: skip
        rows = [c | dict(protocol="cost", metric="macs", value=macs, unit="MACs")]
        for task, protocols in (("landcover", ("knn", "linear")), ("segmentation", ("linear",))):
            for p in protocols:
                metric = "miou" if task == "segmentation" else "accuracy"
                rows.append(c | dict(task=task, seed=0, protocol=p, metric=metric,
                                     value=0.8 * width, unit="fraction"))  # fmt: skip
        write_cell(tmp_path, f"c{i}", rows)
    page = render_report(tmp_path).read_text()
    titles = re.findall(r"<h3>(Retention vs relative MACs: [^<]+|Pareto front: [^<]+)</h3>", page)
    assert titles == [
        "Retention vs relative MACs: landcover, knn",
        "Retention vs relative MACs: landcover, linear",
        "Retention vs relative MACs: segmentation, linear",
        "Pareto front: landcover, knn",
        "Pareto front: segmentation, linear",
    ]
    assert "no knn results on segmentation (k-NN is not run on segmentation tasks)" in page


def _with_intervals(folder: Path, seeds: dict[int, float]) -> pd.DataFrame:
    """m's base and pruned SAR rows with bootstrap intervals, over the given seeds
    (seed -> accuracy of the pruned model; the base model scores 0.60 +- 0.05)."""
    rows = []
    for seed, acc in seeds.items():
        for variant, op, value in (("base", "none", 0.60), ("prune[sar]", "prune", acc)):
            c = dict(study="ci", model="m", role="mapex", variant=variant, operator=op,
                     prune="sar" if op == "prune" else "", width=1.0, modalities="sar")  # fmt: skip
            rows += [c | dict(protocol="cost", metric="macs", value=400.0 if op == "none"
                              else 380.0, unit="MACs"),
                     c | dict(task="landcover", seed=seed, protocol="knn", metric="accuracy",
                              value=value, ci_low=value - 0.05, ci_high=value + 0.05,
                              unit="fraction")]  # fmt: skip
    write_cell(folder, "ci", rows)
    return read_results(folder)


def test_single_seed_intervals_are_bootstrap_and_delta_method(tmp_path: Path) -> None:
    s = probe_summary(_with_intervals(tmp_path, {0: 0.57})).set_index("variant")
    p = s.loc["prune[sar]"]
    assert (p["ci_low"], p["ci_high"]) == pytest.approx((0.52, 0.62))
    r = 0.57 / 0.60  # delta method: sqrt((0.05/0.6)^2 + (r*0.05/0.6)^2)
    half = ((0.05 / 0.6) ** 2 + (r * 0.05 / 0.6) ** 2) ** 0.5
    assert (p["ret_low"], p["ret_high"]) == pytest.approx((r - half, r + half))
    assert p["interval"] == "bootstrap over test scenes"
    assert (s.loc["base", "ret_low"], s.loc["base", "ret_high"]) == (1.0, 1.0)
    (line,) = modality_findings(probe_summary(_with_intervals(tmp_path, {0: 0.57})), 0.95)
    assert f"retention 0.950 (95 % CI {r - half:.3f}-{r + half:.3f}" in line
    assert "indistinguishable from 95%" in line


def test_seed_intervals_are_student_t_over_seeds(tmp_path: Path) -> None:
    s = probe_summary(_with_intervals(tmp_path, {0: 0.56, 1: 0.58, 2: 0.60}))
    p = s.set_index("variant").loc["prune[sar]"]
    half = 4.302652729911275 * 0.02 / 3**0.5  # t(0.975, 2) * SD / sqrt(n)
    assert (p["ci_low"], p["ci_high"]) == pytest.approx((0.58 - half, 0.58 + half))
    assert p["n_seeds"] == 3 and p["interval"] == "t over 3 seeds"
    rh = 4.302652729911275 * (0.02 / 0.6) / 3**0.5
    assert (p["ret_low"], p["ret_high"]) == pytest.approx((0.58 / 0.6 - rh, 0.58 / 0.6 + rh))
    page = render_report(tmp_path).read_text()
    low = re.search(r'data-value="0.58\d*" data-unit="fraction" data-query="[^"]+" '
                    r'data-low="([^"]+)" data-high="([^"]+)"', page)  # fmt: skip
    assert low is not None and float(low.group(1)) == pytest.approx(0.58 - half)
    assert "clearly below 95%" not in page and "indistinguishable from 95%" in page


def test_duplicate_widths_collapse_and_bins() -> None:
    assert [compute_bin(x) for x in (1.0, 0.95, 0.31, 0.1, 0.099, 0.004)] == pytest.approx(
        [1.0, 0.9, 0.3, 0.1, 0.01, 0.001]
    )
    g = pd.DataFrame({"modalities": ["sar"] * 4, "prune": [""] * 4,
                      "width": [0.5, 0.04, 0.03, 0.02], "macs": [50.0, 10.0, 10.0, 10.0],
                      "rel_macs": [0.5, 0.1, 0.1, 0.1], "retention": [0.9, 0.5, 0.5, 0.5]})  # fmt: skip
    c = collapse_duplicate_widths(g)
    assert len(c) == 2 and c.set_index("width").loc[0.04, "widths"] == "0.04,0.03,0.02"
    b = binned_retention(c)
    assert b["n"].tolist() == [1, 1] and "several widths" in b["label"].iloc[0]


def test_slimming_comparison_of_two_pretrainings(tmp_path: Path) -> None:
    from mapex_analysis.report.figures import slim_curves
    from mapex_analysis.report.html import slim_table

    # two twins, 3 seeds: "a" keeps 0.80 of 0.90 at s = 0.5; "b" keeps 0.88 of 0.90
    acc = {("a", 1.0): 0.90, ("a", 0.5): 0.80, ("b", 1.0): 0.90, ("b", 0.5): 0.88}
    rows = []
    for (model, w), v in acc.items():
        variant = "base" if w == 1.0 else f"slim[{w},attn+mlp,first]"
        c = dict(study="s", model=model, role="dense", variant=variant,
                 operator="none" if w == 1.0 else "slim", width=w, modalities="rgb+sar")  # fmt: skip
        rows.append(c | dict(protocol="cost", metric="macs", value=100.0 * w, unit="MACs"))
        for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
            rows.append(c | dict(task="landcover", seed=seed, protocol="knn", metric="accuracy",
                                 value=v + jitter * w, unit="fraction"))  # fmt: skip
    write_cell(tmp_path, "s", rows)
    s = probe_summary(read_results(tmp_path))
    c = slim_curves(s, "landcover", "knn").set_index(["model", "width"])
    assert c.loc[("a", 0.5), "retention"] == pytest.approx(
        np.mean([0.795 / 0.89, 0.8 / 0.9, 0.805 / 0.91])
    )
    assert c.loc[("b", 1.0), "retention"] == 1.0
    table = slim_table(s, "landcover", "knn")
    # legend + b's metric and retention at 0.5 (a's 0.795-0.805 vs b's 0.87-0.89)
    assert "<th>s = 0.5</th>" in table and table.count("<b>*</b>") == 3
    assert table.count("<b>*</b>") == slim_table(s, "landcover", "knn", {"b": "a"}).count(
        "<b>*</b>"
    )
    assert "<td class='l'>a</td>" in slim_table(s, "landcover", "knn", {"b": "a"})
    page = render_report(tmp_path).read_text()
    assert "Slimming retention by model: landcover, knn" in page
