"""Checkpoints: a directory with the architecture spec, safetensors weights and a model card.

Layout of a checkpoint directory::

    spec.json               # {"format", "name", "kwargs", "ops", "sha256"}
    weights.safetensors     # the state dict
    README.md               # model card: what, data, command, steps, final loss, sha256

``name`` and ``kwargs`` rebuild the base architecture through the registry; ``ops`` is the list
of operator plans (pruning, slimming) that were applied, in order, recorded by the operators as
``model.applied_ops``. Loading rebuilds the base model, replays each plan structurally with
:func:`mapex_analysis.ops.apply_plan`, then loads the weights strictly (no missing or unexpected
keys) after checking their sha256.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from mapex_analysis.files import atomic_write, atomic_write_text, sha256_file
from mapex_analysis.models.contract import num_params
from mapex_analysis.models.registry import build_registered
from mapex_analysis.models.weights import load_state_strict
from mapex_analysis.ops.plan import apply_plan
from mapex_analysis.ops.record import applied_ops, model_spec

__all__ = ["CheckpointError", "load_model", "save_model"]

FORMAT = "mapex-analysis/1"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is incomplete, corrupted or does not match its spec."""


def _card(spec: dict[str, Any], card: dict[str, Any] | None, n_params: int) -> str:
    card = dict(card or {})
    title = card.pop("title", spec["name"])
    lines = [f"# {title}", ""]
    desc = card.pop("description", None)
    if desc:
        lines += [str(desc), ""]
    lines += [
        f"- registry name: `{spec['name']}`",
        f"- constructor overrides: `{json.dumps(spec['kwargs'], sort_keys=True)}`",
        f"- operators applied: {len(spec['ops'])}"
        + "".join(f"\n  - `{json.dumps(op, sort_keys=True)[:200]}`" for op in spec["ops"]),
        f"- parameters: {n_params:,}",
    ]
    for key, value in card.items():
        lines.append(f"- {key.replace('_', ' ')}: {value}")
    lines += ["", f"weights.safetensors sha256: `{spec['sha256']}`", ""]
    return "\n".join(lines)


def save_model(
    model: nn.Module, directory: str | Path, *, card: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` as a checkpoint directory.

    Args:
        model: A model built by :func:`mapex_analysis.create_model` (it carries
            ``model_spec``), possibly pruned or slimmed (``applied_ops``).
        directory: Target directory (created).
        card: Extra model-card fields, e.g. ``data``, ``command``, ``steps``, ``final_loss``.

    Returns:
        The directory.

    Raises:
        CheckpointError: if the model was not built through the registry.
    """
    base = model_spec(model)
    if not base:
        raise CheckpointError(
            f"{type(model).__name__} has no model_spec; build it with create_model() "
            "so it can be rebuilt on load"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = directory / "weights.safetensors"
    with atomic_write(weights) as tmp:
        save_file(state, str(tmp))
    spec = {
        "format": FORMAT,
        "name": base["name"],
        "kwargs": base.get("kwargs", {}),
        "ops": applied_ops(model),
        "sha256": sha256_file(weights),
    }
    atomic_write_text(directory / "spec.json", json.dumps(spec, indent=2, sort_keys=True) + "\n")
    atomic_write_text(directory / "README.md", _card(spec, card, num_params(model)))
    return directory


def load_model(directory: str | Path, *, verify: bool = True) -> nn.Module:
    """Rebuild a model from a checkpoint directory.

    Raises:
        CheckpointError: for a missing file, a sha256 mismatch, or missing/unexpected keys
            or shape mismatches (each named).
    """
    directory = Path(directory)
    spec_path, weights = directory / "spec.json", directory / "weights.safetensors"
    for p in (spec_path, weights):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {directory} lacks {p.name}")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"{spec_path}: unknown format {spec.get('format')!r}")
    if verify:
        digest = sha256_file(weights)
        if digest != spec["sha256"]:
            raise CheckpointError(
                f"{weights}: sha256 {digest} does not match {spec['sha256']} in spec.json; "
                "the weight file is corrupted or was replaced"
            )
    model = build_registered(spec["name"], **spec["kwargs"])
    for plan in spec["ops"]:
        model = apply_plan(model, plan, structural_only=True)
    state = load_file(str(weights))
    load_state_strict(model, state, source=str(weights), error=CheckpointError)
    # plain attributes (nn.Module.__setattr__ keeps non-tensor values as attributes)
    setattr(model, "model_spec", {"name": spec["name"], "kwargs": spec["kwargs"]})  # noqa: B010
    setattr(model, "applied_ops", copy.deepcopy(spec["ops"]))  # noqa: B010
    setattr(model, "checkpoint_dir", str(directory))  # noqa: B010
    model.eval()
    return model
