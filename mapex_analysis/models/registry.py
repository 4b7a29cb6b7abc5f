"""Model registry and the one rule that says what a model source is.

Every built-in model goes through this registry (timm's pattern: a decorator on a tiny
entry-point function). Entry points take keyword overrides and return an ``nn.Module`` that
follows the model contract (:mod:`mapex_analysis.models.contract`).

:func:`resolve_source` decides what a source string names, for the study schema, the CLI and
the factory alike:

* ``timm/<architecture>``: a timm architecture behind the adapter contract (random init);
* a path (it contains ``/``, starts with ``.`` or exists): a checkpoint directory (``spec.json``,
  ``weights.safetensors``, ``README.md``);
* anything else: a registry name.

This module imports no torch: the study schema validates model names with it. The built-in
entry points are registered on first use by importing their modules.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "TIMM_PREFIX",
    "ModelEntry",
    "ModelSource",
    "UnknownModelError",
    "build_registered",
    "get_entry",
    "list_models",
    "register_model",
    "resolve_source",
]

#: Prefix of a timm architecture name as a model source (``timm/vit_small_patch16_224``).
TIMM_PREFIX = "timm/"

#: Modules whose import registers the built-in models.
_BUILTIN_MODULES = (
    "mapex_analysis.models.mapex",
    "mapex_analysis.models.vit",
    "mapex_analysis.models.unet",
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


def build_registered(name: str, **kwargs: Any) -> nn.Module:
    """Call a registry entry point and record how the model was built.

    Args:
        name: A registry name.
        **kwargs: Keyword arguments for the entry point (``weights=`` included).

    Returns:
        The model, with ``model.model_spec = {"name": name, "kwargs": kwargs}`` (without
        ``weights``), which checkpoints use to rebuild it.

    Raises:
        UnknownModelError: for an unknown name.
    """
    entry = get_entry(name)
    model = entry.fn(**kwargs)
    spec_kwargs = {k: v for k, v in kwargs.items() if k != "weights"}
    setattr(model, "model_spec", {"name": name, "kwargs": spec_kwargs})  # noqa: B010
    return model


@dataclass(frozen=True)
class ModelSource:
    """What a model source string names (from :func:`resolve_source`).

    Attributes:
        kind: ``registry``, ``checkpoint`` or ``timm``.
        ref: The registry name, the checkpoint directory, or the timm architecture name.
    """

    kind: Literal["registry", "checkpoint", "timm"]
    ref: str

    @property
    def is_checkpoint(self) -> bool:
        """Whether the source is a checkpoint directory."""
        return self.kind == "checkpoint"


def _looks_like_path(source: str) -> bool:
    return "/" in source or source.startswith(".") or Path(source).exists()


def resolve_source(source: str, *, check: bool = True) -> ModelSource:
    """Say what a model source names (see the module docstring for the rule).

    Args:
        source: ``timm/<architecture>``, a checkpoint directory, or a registry name.
        check: Also check that a checkpoint directory holds ``spec.json`` and that a registry
            name is registered (timm names are checked by timm when the model is built).

    Returns:
        The :class:`ModelSource`.

    Raises:
        UnknownModelError: for a missing checkpoint directory or an unknown registry name
            (the registered names are listed).
    """
    if source.startswith(TIMM_PREFIX):
        arch = source[len(TIMM_PREFIX) :]
        if not arch:
            raise UnknownModelError(f"{source!r}: name a timm architecture after {TIMM_PREFIX}")
        return ModelSource("timm", arch)
    if _looks_like_path(source):
        if check and not (Path(source) / "spec.json").is_file():
            raise UnknownModelError(
                f"checkpoint directory {source!r} not found (a checkpoint directory holds "
                f"spec.json, weights.safetensors, README.md); registered models: "
                f"{', '.join(list_models()) or '(none)'}; or {TIMM_PREFIX}<timm architecture>"
            )
        return ModelSource("checkpoint", source)
    if check and source not in list_models():
        raise UnknownModelError(
            f"unknown model {source!r}; registered models: {', '.join(list_models())}, "
            f"a checkpoint directory such as models/<name>, or {TIMM_PREFIX}<timm architecture>"
        )
    return ModelSource("registry", source)
