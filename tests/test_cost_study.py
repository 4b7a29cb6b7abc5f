"""Cost-only studies (`protocols: []`, as studies/zoo_slim.yaml): no eval cells, every modality a
model takes, fixed-band adapters without input-restricted references, and relative compute that
decomposes exactly into the attention, MLP and other shares the rows report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from fixtures.report_check import assert_report_numbers_match_table

from mapex_analysis.cli import main
from mapex_analysis.factory import create_model
from mapex_analysis.ops.slim import _mlp_layers, kept_width, slimmable_modules

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cost_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    tmp = tmp_path_factory.mktemp("cost")
    doc = {
        "name": "cost_only",
        "models": {
            "vit": {"source": "timm_vit_test", "role": "dense", "operators": ["slim"]},
            "ssl4eo": {"source": "ssl4eo_test", "role": "dense", "operators": ["slim"]},
            "croma": {"source": "croma_test", "role": "dense", "operators": ["slim"]},
            "mapex": {"source": "mapex_test", "role": "mapex"},
        },
        "data": {"img_size": 16, "n_train": 16},
        "operators": {
            "prune": {"sets": [["sar"]], "calibration_samples": 16},
            "slim": {"widths": [0.5, 0.25], "modes": ["attn+mlp", "attn", "mlp"],
                     "apply_to": ["base", "pruned"]},
        },
        "protocols": [],
        "measurements": ["macs", "params"],
        "output_dir": str(tmp / "reports"),
    }  # fmt: skip
    path = tmp / "cost.yaml"
    path.write_text(yaml.safe_dump(doc))
    dry = CliRunner().invoke(main, ["run", "--dry-run", str(path)])
    assert dry.exit_code == 0, dry.output
    # vit, ssl4eo, croma: base + 2 widths x 3 modes = 7 each, except croma's attention-only
    # 0.25, which keeps 1 dim per head like 0.5 (head dim 2) and is not run; mapex: base,
    # base@sar, prune[sar], 6 slims, 6 prune-then-slims = 15; no eval cells
    assert "35 cells (0 finished, 35 to run)" in " ".join(dry.output.split())
    assert " eval " not in dry.output
    run = CliRunner().invoke(main, ["run", str(path)])
    assert run.exit_code == 0, run.output
    rep = CliRunner().invoke(main, ["report", str(tmp / "reports" / "cost_only")])
    assert rep.exit_code == 0, rep.output
    return tmp / "reports" / "cost_only", pd.read_parquet(tmp / "reports" / "cost_only" /
                                                          "results.parquet")  # fmt: skip


def test_fixed_band_models_get_all_their_modalities(cost_study: tuple[Path, pd.DataFrame]) -> None:
    _, table = cost_study
    mods = table.groupby("model")["modalities"].unique().to_dict()
    assert list(mods["ssl4eo"]) == ["rgb+red_edge+nir+swir+coastal+atmospheric"]
    assert list(mods["croma"]) == ["rgb+red_edge+nir+swir+sar+coastal+atmospheric"]
    assert set(mods["mapex"]) == {"rgb+red_edge+nir+swir+sar+ele", "sar"}
    assert set(table["protocol"]) == {"cost"}


@pytest.mark.parametrize(("model", "source"), [("vit", "timm_vit_test"), ("ssl4eo", "ssl4eo_test"),
                                               ("croma", "croma_test")])  # fmt: skip
def test_relative_compute_decomposes_into_shares(
    cost_study: tuple[Path, pd.DataFrame], model: str, source: str
) -> None:
    out, t = cost_study
    t = t[t["model"] == model]
    # a width that gives the same model as a wider one is not run: read the one it equals
    collapsed = json.loads((out / "collapsed_widths.json").read_text()).get(model, {})

    def macs(variant: str, metric: str = "macs") -> float:
        m = re.fullmatch(r"slim\[([0-9.]+),([a-z+]+),first\]", variant)
        if m and m.group(1) in collapsed.get(f"{m.group(2)},first", {}):
            rep = collapsed[f"{m.group(2)},first"][m.group(1)]
            variant = f"slim[{rep:g},{m.group(2)},first]"
        return float(t[(t["variant"] == variant) & (t["metric"] == metric)]["value"].iloc[0])

    full = macs("base")
    attn, mlp, other = (macs("base", f"macs_{p}") for p in ("attn", "mlp", "other"))
    assert attn + mlp + other == full and other > 0
    # every MAC inside attention and MLP is linear in the kept dims per head / hidden units
    attns, mlps = slimmable_modules(built := create_model(source))
    mods = dict(built.named_modules())
    head_dim = {int(getattr(mods[n], "head_dim", 0)) or
                mods[n].to_out.in_features // mods[n].num_heads for n in attns}  # fmt: skip
    hidden = {int(_mlp_layers(mods[n])[0].out_features) for n in mlps}
    assert len(head_dim) == len(hidden) == 1  # one width per model: the formula below holds
    head_dim, hidden = head_dim.pop(), hidden.pop()
    for s in (0.5, 0.25):
        ka, km = kept_width(head_dim, s) / head_dim, kept_width(hidden, s) / hidden
        assert macs(f"slim[{s:g},attn,first]") == pytest.approx(other + mlp + ka * attn, rel=1e-9)
        assert macs(f"slim[{s:g},mlp,first]") == pytest.approx(other + attn + km * mlp, rel=1e-9)
        both = macs(f"slim[{s:g},attn+mlp,first]")
        assert both == pytest.approx(other + ka * attn + km * mlp, rel=1e-9)


def test_report_shows_compute_floors_from_the_table(cost_study: tuple[Path, pd.DataFrame]) -> None:
    out, _ = cost_study
    assert_report_numbers_match_table(out, at_least=10)
    page = (out / "report.html").read_text()
    assert "Relative compute vs width per model" in page
    assert "where each model&#x27;s floor lies" in page or "where each model's floor lies" in page
    assert "mapex pruned to sar" in page
    assert "Which operator reaches" not in page  # no probe sections in a cost-only report


def test_zoo_study_validates() -> None:
    res = CliRunner().invoke(main, ["validate", str(ROOT / "studies" / "zoo_slim.yaml")])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load((ROOT / "studies" / "zoo_slim.yaml").read_text())
    assert doc["protocols"] == [] and doc["operators"]["slim"]["widths"] == "paper"
    assert len(doc["models"]) == 11
