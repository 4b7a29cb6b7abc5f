"""Runner: grid expansion, variant keys, atomic cell files, resume, kill-and-resume."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from fixtures.studies import write_smoke

from mapex_analysis.study.results import finished_cells, read_results, write_cell
from mapex_analysis.study.runner import RunSummary, Variant, plan_grid, run_study
from mapex_analysis.study.schema import Study, load_study, parse_study

ROOT = Path(__file__).resolve().parents[1]
SIX = ("rgb", "red_edge", "nir", "swir", "sar", "ele")


def test_variant_keys() -> None:
    assert Variant().key == "base"
    assert Variant.of(prune=("sar",)).key == "prune[sar]"
    assert Variant.of(width=0.25).key == "slim[0.25,attn+mlp,first]"
    v = Variant.of(prune=("rgb", "sar"), width=0.5, mode="mlp", order="last")
    assert v.key == "prune[rgb+sar]+slim[0.5,mlp,last]"
    assert v.operator == "prune+slim"
    r = Variant.of(prune=("sar",), strategy="routing", coverage=0.95)
    assert r.key == "prune[sar,routing@0.95]" and r.operator == "prune"
    # a variant is its chain of operator plans, in order
    assert [type(s).__name__ for s in v.steps] == ["PrunePlan", "SlimPlan"]
    assert v.width == 0.5 and v.prune is not None and v.prune.modalities == ("rgb", "sar")
    assert Variant().steps == () and Variant().width is None


def test_coverage_sweep_adds_routing_variants_and_distinct_cells() -> None:
    doc = {
        "name": "g",
        "models": {"m": {"source": "mapex_test"}},
        "tasks": ["landcover"],
        "operators": {"prune": {"sets": [["sar"], ["rgb", "sar"]], "coverages": [0.9, 0.99]}},
    }
    study = parse_study(doc)
    cells = plan_grid(study, {"m": SIX})
    keys = sorted({c.variant.key for c in cells if c.kind == "cost"})
    assert keys == ["base", "prune[rgb+sar,routing@0.99]", "prune[rgb+sar,routing@0.9]",
                    "prune[rgb+sar]", "prune[sar,routing@0.99]", "prune[sar,routing@0.9]",
                    "prune[sar]"]  # fmt: skip
    ids = [c.cell_id(study) for c in cells]
    assert len(set(ids)) == len(ids)
    with pytest.raises(ValueError, match=r"operators.prune.coverages.1"):
        parse_study(doc | {"operators": {"prune": {"sets": ["each"], "coverages": [0.9, 1.5]}}})


def test_feature_cache_key_is_the_applied_plan() -> None:
    import torch

    from mapex_analysis import create_model, prune_experts
    from mapex_analysis.measure.cost import example_inputs
    from mapex_analysis.study.cells import feature_cache_key
    from mapex_analysis.study.grid import Cell

    study = parse_study({"name": "k", "models": {"m": {"source": "mapex_test"}},
                         "tasks": ["landcover"]})  # fmt: skip
    cfg = study.models["m"]
    torch.manual_seed(0)
    base = create_model("mapex_test", experts_per_modality=2, prior_init=0.0).eval()
    calib = [example_inputs(base, batch_size=16, modalities=["sar"], seed=1)]
    static = prune_experts(base, ["sar"], calibration=calib)
    routing = prune_experts(base, ["sar"], strategy="routing", calibration=calib, coverage=0.5)
    cell = Cell("eval", "m", Variant.of(prune=("sar",)), ("sar",), "landcover", 0)
    # same variant name, different plans (kept experts differ): different keys
    assert static.op_report["kept_experts"] != routing.op_report["kept_experts"]
    assert feature_cache_key(cfg, cell, static) != feature_cache_key(cfg, cell, routing)
    # the same plan gives the same key
    again = prune_experts(base, ["sar"], calibration=calib)
    assert feature_cache_key(cfg, cell, static) == feature_cache_key(cfg, cell, again)


def test_grid_size_by_hand() -> None:
    study = parse_study({
        "name": "g",
        "models": {"m": {"source": "mapex_test"}, "d": {"source": "vit_mae_test", "role": "dense",
                                                         "operators": ["slim"]}},
        "tasks": ["landcover", "flood"],
        "seeds": [0, 1],
        "operators": {"prune": {"sets": ["each", ["rgb", "sar"]]},
                      "slim": {"widths": [1.0, 0.5, 0.25], "pruned_widths": [0.5],
                               "apply_to": ["base", "pruned"]}},
    })  # fmt: skip
    cells = plan_grid(study, {"m": SIX, "d": SIX})
    # mapex: base@all + 7 sets x (base@P, prune[P]) + 2 slim widths (1.0 is base) + 7 x 1
    # prune-then-slim = 1 + 14 + 2 + 7 = 24 variants; dense: base@all + 7 base@P + 2 slim = 10.
    # 34 cost cells + 34 variants x 2 tasks x 2 seeds = 136 eval cells.
    assert sum(c.kind == "cost" for c in cells) == 34
    assert sum(c.kind == "eval" for c in cells) == 136
    keys = {(c.model, c.variant.key, "+".join(c.modalities)) for c in cells}
    assert ("m", "prune[rgb+sar]+slim[0.5,attn+mlp,first]", "rgb+sar") in keys
    assert not any(k[0] == "d" and "prune" in k[1] for k in keys)
    # the dense model also slimmed at 0.5 on each of the 7 prune sets' inputs: 7 more variants
    # (7 cost + 28 eval cells); 1.0 in the list is the unslimmed reference, not a variant
    doc = study.model_dump(mode="json", exclude={"study_dir"})
    doc["models"]["d"]["slim_set_widths"] = [0.5, 1.0]
    more = plan_grid(parse_study(doc), {"m": SIX, "d": SIX})
    assert len(more) - len(cells) == 7 + 28
    assert ("d", "slim[0.5,attn+mlp,first]", "sar") in {
        (c.model, c.variant.key, "+".join(c.modalities)) for c in more
    }
    # adding widths leaves the ids of the cells that already existed unchanged (nothing reruns)
    more_study = parse_study(doc)
    old_ids = {c.cell_id(study) for c in cells}
    assert old_ids <= {c.cell_id(more_study) for c in more}
    # ids are unique and stable
    ids = [c.cell_id(study) for c in cells]
    assert len(set(ids)) == len(ids)
    assert ids == [c.cell_id(study) for c in plan_grid(study, {"m": SIX, "d": SIX})]


def test_cell_files_union_without_duplicates(tmp_path: Path) -> None:
    row = {"study": "s", "model": "m", "variant": "base", "metric": "macs", "value": 10.0,
           "unit": "MACs"}  # fmt: skip
    write_cell(tmp_path, "a", [row])
    write_cell(tmp_path, "b", [row | {"variant": "prune[sar]", "value": 4.0}])
    write_cell(tmp_path, "a", [row])  # rewriting a cell replaces it, never appends
    (tmp_path / "cells" / ".b.parquet.123.tmp").write_bytes(b"partial")  # a killed write
    assert finished_cells(tmp_path) == {"a", "b"}
    df = read_results(tmp_path)
    assert len(df) == 2
    assert df["value"].tolist() == [10.0, 4.0]
    assert df["layer"].tolist() == [-1, -1]
    with pytest.raises(KeyError, match="unknown result columns"):
        write_cell(tmp_path, "c", [row | {"colour": "red"}])


@pytest.fixture(scope="module")
def reference(smoke_run: tuple[Study, RunSummary]) -> tuple[Study, RunSummary]:
    """The session's uninterrupted run of the smoke study (conftest), shared below."""
    return smoke_run


def test_resume_skips_finished_cells(reference: tuple[Study, RunSummary]) -> None:
    study, first = reference
    assert first.ran == first.cells and first.skipped == 0
    table1 = read_results(study.study_dir)
    # A cell file of an earlier config is removed, so the table stays this config's.
    write_cell(study.study_dir, "0" * 20, [{"study": "smoke", "metric": "macs", "value": 1.0}])
    dead = subprocess.Popen(["true"])  # a writer that is gone (as one killed mid-write)
    dead.wait()
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    partial = study.study_dir / "cells" / f".1234.parquet.{host}-{dead.pid}.x.tmp"
    live = study.study_dir / "cells" / f".5678.parquet.{host}-{os.getpid()}.y.tmp"
    for p in (partial, live):
        p.write_bytes(b"PAR1")
    second = run_study(study)
    assert not partial.exists()  # swept at the end of the run
    assert live.exists()  # a live writer's file (another run on the same folder) is kept
    live.unlink()
    assert second.ran == 0 and second.skipped == first.cells
    assert "0" * 20 not in finished_cells(study.study_dir)
    pd.testing.assert_frame_equal(table1, read_results(study.study_dir))
    # Every row carries a unit; MACs of the pruned single-modality MAPEX < the full model's.
    assert (table1["unit"] != "").all()
    macs = table1[(table1["metric"] == "macs") & (table1["model"] == "mapex")]
    full = macs[(macs["variant"] == "base") & (macs["modalities"].str.count(r"\+") == 5)]
    pruned = macs[macs["variant"] == "prune[sar]"]
    assert float(pruned["value"].iloc[0]) < float(full["value"].iloc[0])
    # every pruned model was calibrated on the train split and reports its removed traffic:
    # at initialisation the own-group prior keeps every token on its group, so it is 0
    t = table1[table1["metric"] == "traffic_to_removed"].set_index("variant")["value"]
    slim = "+slim[0.5,attn+mlp,first]"  # prune-then-slim reports its pruning step's traffic
    assert t.to_dict() == {"prune[sar]": 0.0, "prune[rgb+sar]": 0.0, f"prune[sar]{slim}": 0.0,
                           f"prune[rgb+sar]{slim}": 0.0}  # fmt: skip
    kept = table1[table1["metric"] == "experts_kept"].set_index("variant")["value"].to_dict()
    # 2 MoE layers, 1 expert per group
    assert kept == {"prune[sar]": 2.0, "prune[rgb+sar]": 4.0, f"prune[sar]{slim}": 2.0,
                    f"prune[rgb+sar]{slim}": 4.0}  # fmt: skip
    # active parameters from the measured routing: what sar's tokens reached equals the
    # static group count, since every token stayed on its group
    routed = table1[(table1["metric"] == "params_active_routed") & (table1["variant"] == "base")
                    & (table1["subject"] == "sar") & (table1["modalities"] == "sar")]  # fmt: skip
    active = table1[(table1["metric"] == "params_active") & (table1["variant"] == "base")
                    & (table1["modalities"] == "sar") & (table1["model"] == "mapex")]  # fmt: skip
    assert len(routed) == 1  # specialisation rows: first task, unslimmed variants
    assert float(routed["value"].iloc[0]) == pytest.approx(float(active["value"].iloc[0]))


def _drop_cell_col(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["cell"]).reset_index(drop=True)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(
    tmp_path: Path, reference: tuple[Study, RunSummary], smoke_serial_one_thread: pd.DataFrame
) -> None:
    # the uninterrupted run uses the same thread count as the killed one, so that every value
    # (not just every row) must come out bit-identical
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "mapex_analysis.cli", "run"]
    expected = smoke_serial_one_thread
    assert len(expected) == len(read_results(reference[0].study_dir))

    path = write_smoke(tmp_path)
    study = load_study(path)
    n_cells = len(plan_grid(study))
    cmd = [*run, str(path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while len(finished_cells(study.study_dir)) < 4 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_killed = len(finished_cells(study.study_dir))
    assert 4 <= n_killed < n_cells, "the run must be killed mid-way"

    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert f"{n_cells - n_killed} run, {n_killed} already finished" in out.stdout.replace("\n", " ")
    got = read_results(study.study_dir)
    assert not got.duplicated(subset=[c for c in got.columns if c != "value"]).any()
    pd.testing.assert_frame_equal(_drop_cell_col(got), _drop_cell_col(expected))


def test_finetune_protocol_runs_in_a_study(tmp_path: Path) -> None:
    study = parse_study({
        "name": "ft",
        "models": {"m": {"source": "mapex_test", "role": "mapex"}},
        "data": {"n_train": 24, "n_test": 16, "img_size": 16, "batch_size": 16},
        "tasks": ["landcover"],
        "operators": {"prune": {"sets": [["sar"]]}},
        "protocols": ["finetune"],
        "finetune": {"epochs": 1, "batch_size": 8},
        "measurements": ["params"],
        "output_dir": str(tmp_path),
    })  # fmt: skip
    summary = run_study(study)
    df = read_results(study.study_dir)
    ft = df[df["protocol"] == "finetune"]
    # base@all, base@sar and prune[sar] each fine-tuned once on land cover (16 test scenes)
    assert summary.ran == summary.cells
    assert sorted(ft["variant"].unique().tolist()) == ["base", "prune[sar]"]
    assert len(ft) == 3
    assert set(ft["metric"]) == {"accuracy"} and set(ft["unit"]) == {"fraction"}
    assert ((ft["value"] * 16).round(6) % 1 == 0).all()  # a share of the 16 test scenes
    assert ft["value"].between(0.0, 1.0).all()


def test_supervised_model_is_trained_from_scratch_and_validated(tmp_path: Path, smoke_yaml) -> None:
    from mapex_analysis.study.schema import StudyError

    sup = {"source": "vit_mae_test", "role": "supervised", "protocols": ["finetune"],
           "operators": []}  # fmt: skip
    models = {"dense": {"source": "vit_mae_test", "role": "dense", "operators": []},
              "scratch": sup}  # fmt: skip
    study = load_study(smoke_yaml(models=models, tasks=["landcover"],
                                  measurements=["params", "redundancy"], finetune={"epochs": 1}))  # fmt: skip
    run_study(study)
    df = read_results(study.study_dir)
    probes = df[df["protocol"].isin(["knn", "linear", "finetune"])]
    by_model = probes.groupby("model")["protocol"].agg(lambda p: sorted(set(p)))
    assert by_model["scratch"] == ["finetune"] and by_model["dense"] == ["knn", "linear"]
    # frozen-feature measures describe pretrained features: none for the supervised model
    red = df[df["protocol"] == "features"]
    assert set(red["model"]) == {"dense"}
    ft = probes[probes["model"] == "scratch"]
    # trained once per input the study feeds (all modalities, sar, rgb+sar), with intervals
    assert sorted(ft["modalities"]) == sorted(set(df.loc[df["model"] == "dense", "modalities"]))
    assert len(ft) == 3 and ft["ci_low"].notna().all()
    assert ((ft["ci_low"] <= ft["value"]) & (ft["value"] <= ft["ci_high"])).all()
    for bad, msg in (({**sup, "protocols": None}, "set protocols: \\[finetune\\]"),
                     ({**sup, "source": "models/vit_mae_tiny"}, "trained from scratch")):  # fmt: skip
        with pytest.raises(StudyError, match=msg):
            load_study(smoke_yaml(models={"scratch": bad}))


def test_cell_files_with_differing_column_types_still_read(tmp_path: Path) -> None:
    """Cell files are read as one Arrow table; files whose column types differ (a file from
    an older version) fall back to pandas and give the same table."""
    rows = [{"model": "m", "metric": "accuracy", "value": 0.5 + i / 10, "layer": i, "seed": 0}
            for i in range(3)]  # fmt: skip
    write_cell(tmp_path, "a" * 20, rows)
    write_cell(tmp_path, "b" * 20, [dict(r, model="n") for r in rows])
    same = read_results(tmp_path)
    assert len(same) == 6 and same["layer"].dtype == "int64"
    other = tmp_path / "cells" / f"{'b' * 20}.parquet"
    df = pd.read_parquet(other)
    df.astype({"layer": "float64"}).to_parquet(other, index=False)  # int64 -> double
    mixed = read_results(tmp_path)
    pd.testing.assert_frame_equal(mixed, same)
