"""Studies on real data: `mapex-study run` + `report` through the CLI on fixture files written in
each dataset's on-disk layout (EuroSAT with an adapter's upstream weights file, BigEarthNetV2
multi-label, MMFlood segmentation), and the errors a real setup produces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from fixtures.data_sources import (
    eurosat_dn,
    write_bigearthnet_v2,
    write_eurosat,
    write_mmflood,
)
from fixtures.report_check import assert_report_numbers_match_table

from mapex_analysis.cli import main
from mapex_analysis.data.materialize import EmptySourceError, load_split
from mapex_analysis.factory import create_model


def cli(*args: str) -> Result:
    res = CliRunner().invoke(main, list(args))
    res.flat = " ".join(res.output.split())  # type: ignore[attr-defined]
    return res


def _study(
    tmp: Path, name: str, data: dict[str, Any], models: dict[str, Any], **extra: Any
) -> Path:
    doc = {
        "name": name,
        "models": models,
        "data": data,
        "operators": {"slim": {"widths": [0.5]}},
        "protocols": ["knn", "linear"],
        "knn_k": 3,
        "measurements": ["macs", "params"],
        "output_dir": str(tmp / "reports"),
    } | extra
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run_and_report(study: Path, out: Path, at_least: int = 4) -> Any:
    run = cli("run", str(study))
    assert run.exit_code == 0, run.output
    rep = cli("report", str(out))
    assert rep.exit_code == 0, rep.output
    return assert_report_numbers_match_table(out, at_least=at_least)


def _ssl4eo_upstream_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of the timm ViT that ssl4eo_test wraps, in timm's key format."""
    torch.manual_seed(123)
    upstream = create_model("ssl4eo_test", img_size=16).model
    state = {k: v.clone() for k, v in upstream.state_dict().items()}
    torch.save(state, path)
    return state


def test_eurosat_study_with_adapter_weights_file(tmp_path: Path) -> None:
    root = tmp_path / "eurosat"
    write_eurosat(root, size=16, per_split=6)
    weights = tmp_path / "ssl4eo_upstream.pth"
    state = _ssl4eo_upstream_weights(weights)
    study = _study(
        tmp_path,
        "eurosat_real",
        {"source": "eurosat", "root": str(root), "img_size": 16, "n_train": "all",
         "n_test": "all", "splits": {"train": "train", "test": "test"}},
        {"mapex": {"source": "mapex_test"},
         "ssl4eo": {"source": "ssl4eo_test", "role": "dense", "weights": str(weights),
                    "kwargs": {"img_size": 16}}},
    )  # fmt: skip
    table = _run_and_report(study, tmp_path / "reports" / "eurosat_real")
    acc = table[(table["protocol"] == "knn") & (table["metric"] == "accuracy")]
    assert set(acc["task"]) == {"eurosat"}
    # MAPEX is fed the four Sentinel-2 groups EuroSAT and the model share; the 13-band SSL4EO
    # adapter all six (coastal and atmospheric included), with no fill
    mods = acc.groupby("model")["modalities"].first().to_dict()
    assert mods == {"mapex": "rgb+red_edge+nir+swir",
                    "ssl4eo": "rgb+red_edge+nir+swir+coastal+atmospheric"}  # fmt: skip
    # 12 test files (6 per class); accuracies are fractions of them
    assert all(round(v * 12) == pytest.approx(v * 12, abs=1e-9) for v in acc["value"])
    # the study loaded the weights file, strictly: the model it builds carries them
    from mapex_analysis.study.context import build_base
    from mapex_analysis.study.schema import load_study

    built = build_base(load_study(study).models["ssl4eo"])
    for k, v in state.items():
        torch.testing.assert_close(built.model.state_dict()[k], v, rtol=0, atol=0)


def test_bigearthnet_v2_multilabel_study(tmp_path: Path) -> None:
    root = tmp_path / "ben"
    write_bigearthnet_v2(root, size=16, per_split=10)
    study = _study(
        tmp_path,
        "ben_real",
        {"source": "bigearthnet_v2", "root": str(root), "img_size": 16, "n_train": "all",
         "n_test": "all", "splits": {"train": "train", "test": "val"}},
        {"mapex": {"source": "mapex_test"}},
    )  # fmt: skip
    table = _run_and_report(study, tmp_path / "reports" / "ben_real")
    probes = table[table["protocol"].isin(["knn", "linear"])]
    assert set(probes["metric"]) == {"map"} and set(probes["task"]) == {"bigearthnet_v2"}
    base = probes[
        (probes["variant"] == "base") & (probes["modalities"] == "rgb+red_edge+nir+swir+sar")
    ]
    # the two label sets differ in every band: both probes separate them perfectly
    assert base["value"].tolist() == [1.0, 1.0]


def test_mmflood_segmentation_study(tmp_path: Path) -> None:
    root = tmp_path / "mmflood"
    write_mmflood(root, size=64, dark_water=True)
    study = _study(
        tmp_path,
        "flood_real",
        {"source": "mmflood", "root": str(root), "img_size": 16, "n_train": "all",
         "n_test": "all"},
        {"mapex": {"source": "mapex_test"}},
        protocols=["linear"],
    )  # fmt: skip
    table = _run_and_report(study, tmp_path / "reports" / "flood_real", at_least=2)
    miou = table[(table["metric"] == "miou") & (table["variant"] == "base")]
    assert set(miou["modalities"]) == {"sar+ele"} and set(miou["task"]) == {"mmflood"}
    # dark water is separable from land in SAR: the linear probe finds the flood (the no-data
    # quarter, label 255, is left out of training and scoring)
    assert float(miou["value"].iloc[0]) == 1.0


def test_splits_load_right_bands_in_project_units(tmp_path: Path) -> None:
    write_eurosat(tmp_path / "e", size=16, per_split=6)
    sp = load_split("eurosat", tmp_path / "e", "train", n=None, seed=0, img_size=32,
                    modalities=["rgb", "nir"])  # fmt: skip
    a = sp.arrays()
    assert a["rgb"].shape == (12, 3, 32, 32) and a["label"].tolist() == [0] * 6 + [1] * 6
    # bilinear upsampling of a row ramp keeps the band order and the reflectance unit: the
    # mean of the first file's B04 is (400 + mean row 7.5) / 10,000
    assert a["rgb"][0, 0].mean() == pytest.approx((400 + 7.5) / 1e4, abs=1e-6)
    assert a["rgb"][0, 2].mean() == pytest.approx((200 + 7.5) / 1e4, abs=1e-6)
    crop = load_split("eurosat", tmp_path / "e", "test", n=10, seed=3, img_size=8,
                      resize="crop", modalities=["nir"])  # fmt: skip
    # centre crop = rows 4..11 of B08 (DN 800 + row, + 6..11 for the test files, + 400 Forest)
    b08 = crop.arrays()["nir"][:, 0] * 1e4
    assert b08.shape == (10, 8, 8)
    np.testing.assert_allclose(b08[:, :, 0] - b08[:, :1, 0], np.tile(np.arange(8), (10, 1)),
                               atol=1e-3)  # fmt: skip
    offsets = set(np.round(b08[:, 0, 0] - eurosat_dn("B08")[4, 4]).astype(int).tolist())
    assert offsets <= set(range(6, 12)) | set(range(406, 412)) and len(offsets) >= 5
    assert len(crop) == 10 and crop.describe()["available"] == 12


def test_real_source_errors_name_the_problem(tmp_path: Path) -> None:
    write_eurosat(tmp_path / "e", size=16, per_split=6)
    models = {"mapex": {"source": "mapex_test"}}

    def run(data: dict[str, Any], name: str) -> Result:
        res = cli("run", str(_study(tmp_path, name, data, models)))
        assert res.exit_code == 2, res.output
        return res

    base = {"source": "eurosat", "root": str(tmp_path / "e"), "img_size": 16}
    res = run(base | {"source": "eurosat_v9"}, "unknown_source")
    assert "data.source: Input should be 'syntheo', 'eurosat'" in res.flat  # type: ignore[attr-defined]
    res = run(base | {"root": str(tmp_path / "nowhere")}, "missing_root")
    assert f"Dataset not found in `root='{tmp_path / 'nowhere'}'`" in res.flat  # type: ignore[attr-defined]
    res = run(base | {"n_train": "all", "n_test": "all",
                      "splits": {"train": "train", "test": "holdout"}}, "bad_split")  # fmt: skip
    assert "EuroSAT has no split 'holdout'; valid splits: train, val, test" in res.flat  # type: ignore[attr-defined]
    res = run(base | {"n_train": 500}, "too_many")
    assert "data.n_train = 500, data.splits.train = 'train': eurosat at" in res.flat  # type: ignore[attr-defined]
    assert "500 samples requested but the split has 12" in res.flat  # type: ignore[attr-defined]
    # an MMFlood tile smaller than the chip size yields no chips: an error naming root and size
    write_mmflood(tmp_path / "f", size=8)
    with pytest.raises(EmptySourceError, match=r"mmflood at '.*f', split 'train', img_size 16: "):
        load_split("mmflood", tmp_path / "f", "train", n=None, seed=0, img_size=16)


def test_weights_file_with_a_wrong_key_is_refused(tmp_path: Path) -> None:
    write_eurosat(tmp_path / "e", size=16, per_split=6)
    weights = tmp_path / "bad.pth"
    state = _ssl4eo_upstream_weights(weights)
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:, :8]
    torch.save(state, weights)
    study = _study(
        tmp_path, "bad_weights",
        {"source": "eurosat", "root": str(tmp_path / "e"), "img_size": 16, "n_train": "all",
         "n_test": "all"},
        {"ssl4eo": {"source": "ssl4eo_test", "weights": str(weights), "kwargs": {"img_size": 16}}},
    )  # fmt: skip
    res = cli("run", str(study))
    assert res.exit_code == 2, res.output
    assert "blocks.0.attn.qkv.weight" in res.flat  # type: ignore[attr-defined]
    assert "(96, 8)" in res.flat and "(96, 32)" in res.flat  # type: ignore[attr-defined]
    missing = _study(tmp_path, "no_weights", {"source": "eurosat", "root": str(tmp_path / "e")},
                     {"m": {"source": "ssl4eo_test", "weights": str(tmp_path / "x.pth")}})  # fmt: skip
    res = cli("validate", str(missing))
    assert res.exit_code == 2 and "models.m.weights" in res.flat  # type: ignore[attr-defined]
    assert "x.pth' does not exist" in res.flat  # type: ignore[attr-defined]


def test_geobench_task_study(tmp_path: Path) -> None:
    from fixtures.data_sources import write_geobench

    from mapex_analysis.data.sources import SOURCES

    root = tmp_path / "m-brick-kiln"
    write_geobench(root, SOURCES["m-brick-kiln"].available_bands, n_classes=2, per_split=10)
    study = _study(
        tmp_path,
        "kiln_real",
        {"source": "m-brick-kiln", "root": str(root), "img_size": 16, "n_train": "all",
         "n_test": "all", "splits": {"train": "train", "test": "valid"}},
        {"mapex": {"source": "mapex_test"}},
    )  # fmt: skip
    table = _run_and_report(study, tmp_path / "reports" / "kiln_real")
    acc = table[(table["metric"] == "accuracy") & (table["variant"] == "base")]
    assert set(acc["task"]) == {"m-brick-kiln"} and len(acc) == 2  # knn, linear
    # the two classes differ by 50 DN in every band: both probes separate the 10 test samples
    assert acc["value"].tolist() == [1.0, 1.0]
