"""End to end through the console script: validate, run, report; numbers in the HTML equal the
results table; malformed studies fail both `validate` and `run` naming the YAML path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from fixtures.report_check import assert_report_numbers_match_table
from fixtures.studies import write_smoke

from mapex_analysis.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> Result:
    """``mapex-study ARGS`` in-process (the console script's entry point); output unwrapped."""
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    res.stdout_flat = res.output.replace("\n", " ")  # type: ignore[attr-defined]
    return res


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_smoke(tmp_path_factory.mktemp("e2e"))


def test_run_and_report_numbers_match_table(smoke: Path) -> None:
    out_dir = Path(yaml.safe_load(smoke.read_text())["output_dir"]) / "smoke"
    dry = cli("run", "--dry-run", str(smoke))
    assert dry.exit_code == 0, dry.output
    # smoke grid (studies/smoke.yaml): mapex base@all, 2 sets x (base@P, prune[P]), 2 slim
    # widths, 2 sets x prune-then-slim at 0.5 = 9 variants; dense base@all + 2 base@P + 2 slim
    # = 5; 14 cost cells + 14 x 2 tasks eval cells = 42.
    assert "42 cells (0 finished, 42 to run)" in dry.stdout_flat
    run = cli("run", str(smoke))
    assert run.exit_code == 0, run.output
    assert "42 cells: 42 run, 0 already finished" in run.stdout_flat
    rep = cli("report", str(out_dir))
    assert rep.exit_code == 0, rep.output
    page = (out_dir / "report.html").read_text()
    table = assert_report_numbers_match_table(out_dir, at_least=8)
    # The findings sentence quotes the MACs of the chosen variant, taken from the table.
    line = re.search(r"landcover, knn, mapex on sar: .*? with ([\d,]+) MACs/sample", page)
    assert line is not None
    macs = table[(table["metric"] == "macs") & (table["model"] == "mapex")
                 & (table["modalities"] == "sar")]["value"]  # fmt: skip
    assert float(line.group(1).replace(",", "")) in set(macs.round())
    for name in ("config.resolved.yaml", "environment.json", "results.parquet", "results.csv"):
        assert (out_dir / name).is_file()
    env = json.loads((out_dir / "environment.json").read_text())
    assert env["versions"]["torch"].startswith("2.")


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (lambda d: d["operators"]["slim"].update(modez=["attn"]), "operators.slim.modez"),
        (lambda d: d.update(knn_k="five"), "knn_k"),
        (lambda d: d["models"]["mapex"].update(source="mapex_huge"), "models.mapex.source"),
        (
            lambda d: d["models"]["mapex"].update(source="models/no_such_ckpt"),
            "models.mapex.source",
        ),
        (lambda d: d["operators"]["slim"].update(widths=[0.5, 0.0]), "operators.slim.widths[1]"),
        (lambda d: d["operators"]["prune"].update(sets=[[]]), "operators.prune.sets[0]"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "unknown-model",
        "missing-checkpoint",
        "width-range",
        "empty-modality-set",
    ],
)
def test_malformed_study_fails_validate_and_run(tmp_path: Path, edit, path: str) -> None:
    doc = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    edit(doc)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    for cmd in ("validate", "run"):
        res = cli(cmd, str(bad))
        assert res.exit_code == 2
        assert f"  {path}: " in res.output, res.output
