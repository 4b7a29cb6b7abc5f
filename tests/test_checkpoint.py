"""Checkpoints: save/load round trip, hash verification, strict rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures.inputs import modality_batch

from mapex_analysis.checkpoint import CheckpointError, load_model, save_model
from mapex_analysis.factory import create_model


def _batch(model: torch.nn.Module, B: int = 2) -> dict[str, torch.Tensor]:
    return modality_batch(model.modalities, model.img_size, B=B, seed=1, noise=0.5)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("mapex_test", {"router": "pos_embed", "experts_per_modality": 2, "top_k": 2}),
     ("vit_mae_test", {"modalities": ["rgb", "sar"]})],
)  # fmt: skip
def test_round_trip_gives_identical_outputs(tmp_path: Path, name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    x = _batch(model)
    save_model(model, tmp_path / "ckpt", card={"steps": 3, "final_loss": "0.5"})
    loaded = load_model(tmp_path / "ckpt")
    assert torch.equal(model(x), loaded(x))
    assert loaded.model_spec == {"name": name, "kwargs": kwargs}
    spec = json.loads((tmp_path / "ckpt" / "spec.json").read_text())
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert spec["sha256"] in card and "- steps: 3" in card
    # create_model on the directory is the same load
    assert torch.equal(create_model(str(tmp_path / "ckpt"))(x), model(x))


def test_corrupted_weights_fail_the_hash_check(tmp_path: Path) -> None:
    save_model(create_model("mapex_test"), tmp_path)
    weights = tmp_path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip the last byte of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError,
        match="does not match .* in spec.json; the weight file is corrupted or was replaced",
    ):
        load_model(tmp_path)


def test_spec_that_does_not_match_the_weights_is_rejected(tmp_path: Path) -> None:
    save_model(create_model("mapex_test", modalities=["rgb", "sar"]), tmp_path)
    spec_path = tmp_path / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["kwargs"]["modalities"] = ["rgb", "sar", "ele"]  # rebuild with one more modality
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.0.mlp.experts.2.fc1.bias'"):
        load_model(tmp_path)


def test_missing_weight_file_is_named(tmp_path: Path) -> None:
    save_model(create_model("mapex_test"), tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks weights.safetensors"):
        load_model(tmp_path)
