"""The model factory: one ``create_model`` for every model source.

A source is resolved by :func:`mapex_analysis.models.registry.resolve_source` (the same rule the
study schema and the CLI use) and built here:

* a registry name: its entry point, with keyword overrides and optional ``weights`` (a
  checkpoint directory written by :func:`~mapex_analysis.checkpoint.save_model`, or for
  adapters a local upstream weight file or a torchgeo weight name);
* a checkpoint directory: :func:`~mapex_analysis.checkpoint.load_model` (base model, recorded
  operator plans replayed, weights loaded strictly after their sha256 is checked);
* ``timm/<architecture>``: that timm architecture, random init, behind the adapter contract
  (:class:`~mapex_analysis.models.adapters.timm_vit.TimmModelAdapter`: RGB, ImageNet statistics,
  headless), so it runs in a study like every other model.

The factory sits above the operators (a checkpoint replays their plans), which is why it is not
part of :mod:`mapex_analysis.models`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapex_analysis.checkpoint import load_model
from mapex_analysis.models.adapters.timm_vit import TimmModelAdapter
from mapex_analysis.models.contract import modalities_of, num_params
from mapex_analysis.models.registry import (
    TIMM_PREFIX,
    UnknownModelError,
    build_registered,
    get_entry,
    list_models,
    resolve_source,
)
from mapex_analysis.ops.record import model_spec

__all__ = ["TIMM_PREFIX", "create_model", "model_table"]


def _is_checkpoint_dir(p: str | Path) -> bool:
    path = Path(p)
    return path.is_dir() and (path / "spec.json").is_file()


def create_model(name: str, *, weights: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a model from any source.

    Args:
        name: A registry name, a checkpoint directory, or ``timm/<architecture>``.
        weights: ``None`` (random init), a checkpoint directory written by ``save_model``,
            or, for adapters, a local upstream weight file or torchgeo weight name.
        **overrides: Keyword arguments for the entry point (``depth=2``...).

    Returns:
        The model, with ``model.model_spec`` recording how to rebuild it.

    Raises:
        UnknownModelError: for an unknown name, a missing checkpoint directory or an unknown
            timm architecture.
        ValueError: if weights or overrides are given where they cannot apply.
    """
    source = resolve_source(name)
    if source.kind == "checkpoint":
        if overrides or weights is not None:
            raise ValueError(f"checkpoint {name} is loaded as saved; no overrides allowed")
        return load_model(name)
    if source.kind == "timm":
        try:
            model: nn.Module = TimmModelAdapter(model_name=source.ref, **overrides)
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise UnknownModelError(f"{name!r}: {err}") from None
        if weights is not None:
            model.load_weights(weights)  # type: ignore[operator]
        setattr(model, "model_spec", {"name": name, "kwargs": dict(overrides)})  # noqa: B010
        return model
    entry = get_entry(source.ref)
    if weights is not None and _is_checkpoint_dir(weights):
        model = load_model(weights)
        saved = (model_spec(model) or {}).get("name")
        if saved != name:
            raise ValueError(f"checkpoint {weights} holds model {saved!r}, not {name!r}")
        return model
    if weights is not None:
        if not entry.accepts_weights:
            raise ValueError(
                f"model {name!r} loads weights only from a checkpoint directory "
                f"(with spec.json); {weights!s} is not one"
            )
        return build_registered(name, weights=weights, **overrides)
    return build_registered(name, **overrides)


def model_table() -> list[dict[str, Any]]:
    """One row per registered model: name, family, modalities, parameters, weights source.

    Models are built on the ``meta`` device, so this costs no memory or init time. Any timm
    architecture is available as ``timm/<architecture>`` besides these.
    """
    rows = []
    for name in list_models():
        entry = get_entry(name)
        with torch.device("meta"):
            model = entry.fn()
        rows.append(
            {
                "name": name,
                "family": entry.family,
                "modalities": ", ".join(modalities_of(model)),
                "params": num_params(model),
                "weights": entry.weights,
                "description": entry.description,
            }
        )
    return rows
