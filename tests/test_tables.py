"""The seed-style tables and what feeds them: the U-Net baseline, per-model tasks, fine-tuning
only of the table rows, slimming widths that give identical models planned once."""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

import pytest
import torch
from fixtures.inputs import modality_batch

from mapex_analysis.data import SynthEO
from mapex_analysis.eval.finetune import finetune
from mapex_analysis.factory import create_model
from mapex_analysis.ops.slim import slim_signature, slim_width
from mapex_analysis.report.html import render_report
from mapex_analysis.report.paper import PAPER_TABLES
from mapex_analysis.study.context import build_base
from mapex_analysis.study.grid import collapsed_widths, distinct_widths, plan_grid, slim_key_of
from mapex_analysis.study.results import read_results
from mapex_analysis.study.runner import COLLAPSED_FILE, run_study
from mapex_analysis.study.schema import StudyError, parse_study

SIX = ("rgb", "red_edge", "nir", "swir", "sar", "ele")


def test_unet_takes_any_modality_subset_and_a_missing_modality_costs_nothing() -> None:
    torch.manual_seed(0)
    net = create_model("unet_tiny").eval()
    assert sum(p.numel() for p in net.parameters()) == 975_520
    x = modality_batch(SIX, 32, B=2)
    assert net.forward_dense(x).shape == (2, 16, 32, 32)
    assert net(x).shape == (2, 16)
    rgb = {"rgb": x["rgb"]}
    before = net.forward_dense(rgb)
    with torch.no_grad():
        net.stem["sar"].weight.add_(1.0)  # a modality not fed changes nothing
    assert torch.equal(net.forward_dense(rgb), before)
    with pytest.raises(ValueError, match="takes rgb, red_edge"):
        net.forward_dense({})


def test_unet_fine_tunes_on_segmentation_per_pixel() -> None:
    train = SynthEO("segmentation", "train", seed=0, n=96, img_size=32)
    test = SynthEO("segmentation", "test", seed=0, n=48, img_size=32)
    torch.manual_seed(0)
    net = create_model("unet_tiny")
    res = finetune(net, train, test, modalities=["rgb", "swir"], epochs=2, batch_size=32)
    assert res.metric == "miou" and 0.0 <= res.value <= 1.0
    x = {m: torch.as_tensor(test.arrays()[m][:3]) for m in ("rgb", "swir")}
    logits = res.model(x)
    assert logits.shape == (3, train.task.num_classes, 32, 32)  # per pixel, no upsampling
    # training lowered the loss (the head sits on the decoder's per-pixel features)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def _study(tmp_path: Path, **extra: object) -> dict:
    return {
        "name": "tab",
        "models": {
            "m": {"source": "mapex_test", "role": "mapex", "protocols": ["knn", "finetune"],
                  "slim_widths": [0.5]},
            "u": {"source": "unet_tiny", "role": "supervised", "protocols": ["finetune"],
                  "operators": [], "kwargs": {"img_size": 16}, "tasks": ["segmentation"]},
        },
        "data": {"n_train": 24, "n_test": 16, "img_size": 16, "batch_size": 16},
        "tasks": ["landcover", "segmentation"],
        "operators": {"prune": {"sets": [["sar"]]}, "slim": {"widths": [0.5]}},
        "finetune": {"epochs": 1, "batch_size": 8},
        "measurements": ["params"],
        "output_dir": str(tmp_path),
        **extra,
    }  # fmt: skip


def test_model_tasks_restrict_its_cells_and_are_validated(tmp_path: Path) -> None:
    study = parse_study(_study(tmp_path))
    cells = plan_grid(study, {"m": SIX, "u": SIX}, {"m": True, "u": True})
    assert {c.task for c in cells if c.model == "u" and c.kind == "eval"} == {"segmentation"}
    assert {c.task for c in cells if c.model == "m" and c.kind == "eval"} == {
        "landcover",
        "segmentation",
    }
    doc = _study(tmp_path)
    doc["models"]["u"]["tasks"] = ["flood"]
    with pytest.raises(StudyError, match=r"models\.u\.tasks: flood is not among the study's"):
        parse_study(doc)


def test_finetune_runs_on_table_rows_only(tmp_path: Path) -> None:
    study = parse_study(_study(tmp_path))
    run_study(study)
    df = read_results(study.study_dir)
    ft = df[df["protocol"] == "finetune"]
    knn = df[df["protocol"] == "knn"]
    # m: base@all, base@sar, prune[sar] fine-tuned on both tasks; its slimmed variant only
    # frozen; u: on segmentation only
    assert sorted(set(ft.loc[ft["model"] == "m", "variant"])) == ["base", "prune[sar]"]
    assert "slim[0.5,attn+mlp,first]" in set(knn["variant"])
    assert set(ft.loc[ft["model"] == "u", "task"]) == {"segmentation"}
    assert set(ft.loc[ft["model"] == "u", "metric"]) == {"miou"}
    # finetune.variants: [slim] fine-tunes the slimmed variant only
    other = parse_study(_study(tmp_path, name="tab2", finetune={"epochs": 1, "variants": ["slim"]}))
    run_study(other)
    ft2 = read_results(other.study_dir).query("protocol == 'finetune' and model == 'm'")
    assert set(ft2["variant"]) == {"slim[0.5,attn+mlp,first]"}


def test_widths_that_give_the_same_model_are_planned_once(tmp_path: Path) -> None:
    model = create_model("vit_mae_test").eval()  # 2 blocks: head dim 16, MLP hidden 64
    key = slim_key_of(model)
    assert key is not None
    # (dims per head of each block's attention, then hidden units of each MLP)
    assert slim_signature(model, 0.045) == slim_signature(model, 0.04) == (1, 1, 2, 2)
    assert slim_signature(model, 0.01) == slim_signature(model, 0.001) == (1, 1, 1, 1)
    widths = [0.5, 0.05, 0.045, 0.04, 0.01, 0.001]
    kept, dropped = distinct_widths(widths, "attn+mlp", "first", key)
    sigs = {w: slim_signature(model, w) for w in widths}
    # every dropped width has the signature of the width it maps to, which is wider and kept
    for w, rep in dropped.items():
        assert sigs[w] == sigs[rep] and rep > w and rep in kept
    assert kept == [0.5, 0.05, 0.045, 0.01] and dropped == {0.04: 0.045, 0.001: 0.01}
    # "the same model": the dropped and the kept width slim to identical outputs
    x = modality_batch(SIX, 16)
    for w, rep in dropped.items():
        assert torch.equal(slim_width(model, w)(x), slim_width(model, rep)(x))
    # a random order draws per width: nothing collapses
    assert distinct_widths(widths, "attn+mlp", "random", key) == (widths, {})


def test_collapsed_widths_are_recorded(tmp_path: Path) -> None:
    doc = _study(tmp_path, protocols=[], measurements=["params"], tasks=[])
    doc["models"] = {
        "d": {
            "source": "vit_mae_test",
            "role": "dense",
            "operators": ["slim"],
            "slim_widths": [0.5, 0.01, 0.005],
        }
    }  # (1, 1, 1, 1) twice
    doc.pop("operators")
    doc["operators"] = {"slim": {"widths": [0.5]}}
    study = parse_study(doc)
    run_study(study)
    saved = json.loads((study.study_dir / COLLAPSED_FILE).read_text())
    keys = {"d": slim_key_of(build_base(study.models["d"]))}
    assert saved == collapsed_widths(study, keys) == {"d": {"attn+mlp,first": {"0.005": 0.01}}}
    widths = set(read_results(study.study_dir)["width"].dropna())
    assert 0.005 not in widths and {0.5, 0.01} <= widths
    page = render_report(study.study_dir).read_text()
    assert "<li>d (attn+mlp,first): 0.005 = 0.01</li>" in page


def test_seed_style_table_shows_the_paper_next_to_the_study(tmp_path: Path) -> None:
    from test_report import write_table

    write_table(tmp_path)
    (tmp_path / "config.resolved.yaml").write_text("name: hand\nretention_target: 0.95\n")
    page = render_report(tmp_path).read_text()
    i = page.index("Per-modality results: landcover")
    section = page[i : page.index("</table>", i)]
    paper = PAPER_TABLES["landcover"]
    assert "the paper, real data: " + paper.title in section
    # the paper's SAR row, all seven values, in the paper's column order
    shown = re.findall(r"<td class='paper'>([0-9.]+)</td>", section)
    assert shown[:7] == [f"{v:.1f}" for v in paper.rows["sar"]]
    # the study's own numbers: m pruned to SAR (k-NN 60.0 %), d fed SAR (50.0 %)
    values = re.findall(r'data-value="([^"]+)" data-unit="fraction" data-query="([^"]+)"', section)
    got = {(json.loads(unescape(q))["model"], json.loads(unescape(q))["variant"],
            json.loads(unescape(q))["modalities"]): float(v) for v, q in values}  # fmt: skip
    assert got[("m", "prune[sar]", "sar")] == 0.60
    assert got[("d", "base", "sar")] == 0.50
    assert list(dict.fromkeys(k[0] for k in got)) == ["d", "m"]  # dense before MAPEX
