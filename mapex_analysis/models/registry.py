"""Model registry: ``register_model`` / ``create_model`` / ``list_models``.

Every model a study YAML can name goes through this registry (timm's pattern: a decorator on a
tiny entry-point function). Entry points take keyword overrides and return an ``nn.Module`` that
follows the project's model contract:

* ``modalities``: tuple of modality names the model accepts;
* ``forward_features(x)``: ``x`` is a modality dict ``{name: (B, C, H, W)}`` in physical units
  (see :mod:`mapex_analysis.modalities`), returns tokens ``(B, N, D)``;
* ``forward_head(tokens, pre_logits=True)``: pooled features ``(B, D)`` (pooling declared in
  ``model.pool``, ``"cls"`` or ``"mean"``);
* ``forward(x)``: ``forward_head(forward_features(x))``;
* ``num_features``: ``D``.

:func:`create_model` records how a model was built in ``model.model_spec`` so
:func:`mapex_analysis.models.checkpoint.save_model` can rebuild it.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModelEntry",
    "UnknownModelError",
    "create_model",
    "get_entry",
    "list_models",
    "model_table",
    "register_model",
]

#: Modules whose import registers the built-in models.
_BUILTIN_MODULES = (
    "mapex_analysis.models.mapex",
    "mapex_analysis.models.vit",
    "mapex_analysis.models.adapters",
)


class UnknownModelError(KeyError):
    """A model name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelEntry:
    """A registered model.

    Attributes:
        name: Registry name.
        fn: Entry point ``fn(**kwargs) -> nn.Module``.
        family: ``mapex``, ``vit``, ``adapter``...
        description: One line for ``mapex-study list models``.
        weights: Where weights come from (``"random init"``, a torchgeo weight enum, ...).
        accepts_weights: Whether ``fn`` takes a ``weights=`` argument (path or weight name).
    """

    name: str
    fn: Callable[..., nn.Module]
    family: str
    description: str = ""
    weights: str = "random init"
    accepts_weights: bool = False
    tags: tuple[str, ...] = field(default=())


_ENTRIES: dict[str, ModelEntry] = {}
_loaded_builtins = False


def register_model(
    name: str | None = None,
    *,
    family: str,
    description: str = "",
    weights: str = "random init",
    accepts_weights: bool = False,
    tags: tuple[str, ...] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering an entry point under ``name`` (default: the function name).

    Raises:
        ValueError: if the name is registered already by another function.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        old = _ENTRIES.get(key)
        if old is not None and old.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"model {key!r} is registered twice")
        _ENTRIES[key] = ModelEntry(
            key,
            fn,
            family,
            description or (fn.__doc__ or "").strip().split("\n")[0],
            weights,
            accepts_weights,
            tags,
        )
        return fn

    return deco


def _ensure_builtins() -> None:
    global _loaded_builtins
    if _loaded_builtins:
        return
    _loaded_builtins = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            # Only tolerate the registering module itself being absent, never a missing
            # dependency inside it.
            if err.name != mod:
                raise


def list_models(pattern: str | None = None, *, family: str | None = None) -> list[str]:
    """Sorted registry names, optionally filtered by a glob ``pattern`` and ``family``."""
    _ensure_builtins()
    names = sorted(_ENTRIES)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if family:
        names = [n for n in names if _ENTRIES[n].family == family]
    return names


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``.

    Raises:
        UnknownModelError: listing the registered names.
    """
    _ensure_builtins()
    try:
        return _ENTRIES[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; registered models: {', '.join(sorted(_ENTRIES))}"
        ) from None


def _is_checkpoint_dir(p: str | Path) -> bool:
    path = Path(p)
    return path.is_dir() and (path / "spec.json").is_file()


def create_model(name: str, *, weights: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model, or load a checkpoint directory.

    Args:
        name: A registry name, or a checkpoint directory written by ``save_model``.
        weights: ``None`` (random init), a checkpoint directory written by ``save_model``,
            or, for adapters, a local upstream weight file or torchgeo weight name.
        **overrides: Keyword arguments for the entry point (``depth=2``...).

    Returns:
        The model, with ``model.model_spec = {"name": name, "kwargs": overrides}``.

    Raises:
        UnknownModelError: for an unknown name.
        ValueError: if weights are given to a model that takes none.
    """
    from mapex_analysis.models.checkpoint import load_model

    if _is_checkpoint_dir(name):
        if overrides or weights is not None:
            raise ValueError(f"checkpoint {name} is loaded as saved; no overrides allowed")
        return load_model(name)
    entry = get_entry(name)
    if weights is not None and _is_checkpoint_dir(weights):
        model = load_model(weights)
        saved = getattr(model, "model_spec", {}).get("name")
        if saved != name:
            raise ValueError(f"checkpoint {weights} holds model {saved!r}, not {name!r}")
        return model
    if weights is not None:
        if not entry.accepts_weights:
            raise ValueError(
                f"model {name!r} loads weights only from a checkpoint directory "
                f"(with spec.json); {weights!s} is not one"
            )
        model = entry.fn(weights=weights, **overrides)
    else:
        model = entry.fn(**overrides)
    setattr(model, "model_spec", {"name": name, "kwargs": dict(overrides)})  # noqa: B010
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_table() -> list[dict[str, Any]]:
    """One row per registered model: name, family, modalities, parameters, weights source.

    Models are built on the ``meta`` device, so this costs no memory or init time.
    """
    rows = []
    for name in list_models():
        entry = _ENTRIES[name]
        with torch.device("meta"):
            model = entry.fn()
        rows.append(
            {
                "name": name,
                "family": entry.family,
                "modalities": ", ".join(getattr(model, "modalities", ())),
                "params": count_parameters(model),
                "weights": entry.weights,
                "description": entry.description,
            }
        )
    return rows
