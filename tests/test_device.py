"""Devices: `device:` / `--device` resolve with clear errors, rows and environment.json name the
hardware, autocast precision is recorded; the CUDA path runs where a GPU is visible."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from mapex_analysis.cli import main
from mapex_analysis.data import SynthEO
from mapex_analysis.device import DeviceError, device_name, resolve_device
from mapex_analysis.eval.features import extract_features
from mapex_analysis.factory import create_model
from mapex_analysis.study.results import read_results

NO_CUDA = not torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device (none visible here)")
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")


def test_resolve_device_forms_and_errors() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if not NO_CUDA else "cpu")
    with pytest.raises(DeviceError, match=r"device 'gpu' is not one of auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")
    assert device_name("cpu").startswith("cpu (")


@needs_no_cuda
def test_cuda_on_a_machine_without_it_is_a_clear_error(tmp_path: Path, smoke_yaml: Any) -> None:
    with pytest.raises(DeviceError, match=r"device 'cuda:1' requested, but this machine has no"):
        resolve_device("cuda:1")
    path = smoke_yaml(device="cuda")
    res = CliRunner().invoke(main, ["run", str(path)])
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "error: device 'cuda' requested, but this machine has no usable CUDA device" in out
    assert "use device: cpu or device: auto" in out
    assert not (tmp_path / "reports" / "smoke").exists()  # nothing written
    macs = CliRunner().invoke(main, ["macs", "mapex_test", "--device", "cuda"])
    assert macs.exit_code == 2 and "no usable CUDA device" in macs.output
    pre = CliRunner().invoke(
        main, ["pretrain", "studies/pretrain/mapex_tiny.yaml", "--device", "cuda"]
    )
    assert pre.exit_code == 2 and "no usable CUDA device" in " ".join(pre.output.split())


def test_rows_and_environment_name_the_device(smoke_run: Any) -> None:
    study, _ = smoke_run
    table = read_results(study.study_dir)
    assert set(table["device"]) == {device_name("cpu")}
    evals = table[table["protocol"].isin(["knn", "linear"])]
    assert set(evals["precision"]) == {"fp32"}
    assert set(table[table["protocol"] == "cost"]["precision"]) == {""}
    env = json.loads((study.study_dir / "environment.json").read_text())
    assert env["device"] == device_name("cpu") and env["precision"] == "fp32"


def test_bf16_autocast_features_are_close_and_cached_apart(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("mapex_test").eval()
    data = SynthEO("landcover", "test", seed=0, n=16, img_size=16)
    mods = ("rgb", "sar")
    f32 = extract_features(model, data, modalities=mods, cache_dir=tmp_path)
    bf16 = extract_features(model, data, modalities=mods, cache_dir=tmp_path, precision="bf16")
    a, b = f32["test"].X, bf16["test"].X
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert not np.array_equal(a, b)  # really computed in bfloat16, not read from fp32's cache
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    with pytest.raises(ValueError, match="unknown precision 'fp8'; valid: fp32, bf16, fp16"):
        extract_features(model, data, modalities=mods, precision="fp8")


@needs_cuda
def test_cuda_study_matches_cpu(tmp_path: Path, smoke_yaml: Any) -> None:
    rows = {}
    for device in ("cpu", "cuda"):
        doc = yaml.safe_load(smoke_yaml().read_text())
        doc.update(name=f"smoke_{device}", device=device, measurements=["macs", "latency"],
                   tasks=["landcover"], protocols=["knn"])  # fmt: skip
        path = tmp_path / f"{device}.yaml"
        path.write_text(yaml.safe_dump(doc))
        res = CliRunner().invoke(main, ["run", str(path)])
        assert res.exit_code == 0, res.output
        rows[device] = read_results(Path(doc["output_dir"]) / doc["name"])
    gpu = rows["cuda"]
    assert gpu["device"].str.startswith("cuda:0 (").all()
    lat = gpu[gpu["metric"] == "latency_median"]
    assert len(lat) > 0 and (lat["value"] > 0).all()
    for metric in ("macs", "accuracy"):
        a = rows["cpu"][rows["cpu"]["metric"] == metric].sort_values(["model", "variant"])
        b = gpu[gpu["metric"] == metric].sort_values(["model", "variant"])
        np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), atol=0.05)
