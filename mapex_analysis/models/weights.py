"""Weight files: reading them, and loading a state dict strictly.

* :func:`read_state_dict`: a local file in an upstream format (``.safetensors``, or a torch
  pickle read with ``weights_only=True`` so no code runs on load);
* :func:`load_state_strict`: the one strict loader (adapters and checkpoint directories both
  use it): a missing or unexpected key, or any shape mismatch, is an error naming the key (and
  both shapes) before anything is loaded; only keys the caller declares optional may be missing;
* :func:`resolve_torchgeo_weights` / :func:`download_state_dict`: torchgeo weight enums by name
  (downloads, so only online).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

__all__ = [
    "WeightsError",
    "WeightsReport",
    "download_state_dict",
    "load_state_strict",
    "read_state_dict",
    "resolve_torchgeo_weights",
]


class WeightsError(RuntimeError):
    """Weights that cannot be loaded: unreadable file, key or shape mismatch, offline download."""


@dataclass
class WeightsReport:
    """What :meth:`Adapter.load_weights` loaded.

    Attributes:
        source: The file path or torchgeo weight name.
        loaded: Number of tensors loaded.
        missing: Keys the checkpoint lacked that the adapter declares optional.
        ignored: Checkpoint keys the adapter declares unused.
    """

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file in the upstream format.

    Args:
        path: ``.safetensors``, or a torch pickle (``.pth``, ``.pt``, ``.bin``, ``.ckpt``) read
            with ``weights_only=True`` (no code runs on load).

    Returns:
        The object stored (a state dict, possibly nested as the upstream saves it).

    Raises:
        WeightsError: if the file is missing or unreadable.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weight file {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            return dict(load_file(str(p)))
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling and safetensors errors have no common base
        raise WeightsError(f"cannot read weight file {p}: {type(err).__name__}: {err}") from err
    if not isinstance(obj, dict):
        raise WeightsError(f"{p} holds a {type(obj).__name__}, not a state dict")
    return obj


def resolve_torchgeo_weights(name: str, valid: Sequence[Any]) -> Any:
    """Find a torchgeo weight enum member by its full name.

    Args:
        name: ``"<EnumClass>.<MEMBER>"``, e.g. ``"DOFABase16_Weights.DOFA_MAE"``.
        valid: The enum members this adapter can load.

    Returns:
        The enum member.

    Raises:
        WeightsError: for a name that is not one of ``valid`` (the valid names are listed).
    """
    for member in valid:
        if name == str(member):
            return member
    names = ", ".join(str(m) for m in valid) or "none"
    raise WeightsError(
        f"{name!r} is neither an existing weight file nor a torchgeo weight name this model "
        f"can load; valid weight names: {names}"
    )


def download_state_dict(weights: Any) -> dict[str, Any]:
    """Download a torchgeo weight enum's state dict (needs the network).

    Raises:
        WeightsError: if the download fails (e.g. offline), saying how to load a local file.
    """
    try:
        state: dict[str, Any] = weights.get_state_dict(progress=False)
    except Exception as err:  # URLError, HTTPError, OSError, socket errors...
        raise WeightsError(
            f"cannot download torchgeo weights {weights} from {weights.url} "
            f"({type(err).__name__}: {err}); this machine may be offline: download the file "
            "elsewhere and pass its local path as weights="
        ) from err
    return state


def load_state_strict(
    target: nn.Module,
    state: Mapping[str, Tensor],
    *,
    source: str,
    what: str | None = None,
    optional: Collection[str] = (),
    error: type[Exception] = WeightsError,
) -> list[str]:
    """Load ``state`` into ``target`` only if every key and shape matches.

    Args:
        target: The module to load into.
        state: A flat state dict.
        source: The file or weight name (first word of every message).
        what: What the keys are matched against, for messages (default: the target's class).
        optional: Keys of ``target`` that ``state`` may lack (left as initialised).
        error: The exception type raised (e.g. a checkpoint loader's own error type).

    Returns:
        The optional keys that were missing, sorted.

    Raises:
        error: naming the missing and unexpected keys (a misspelled key shows in both lists),
            or every shape mismatch with both shapes; nothing is loaded then.
    """
    own = target.state_dict()
    what = what or type(target).__name__
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    hard_missing = [k for k in missing if k not in optional]
    if hard_missing or unexpected:
        hint = " (a misspelled key shows up in both lists)" if hard_missing and unexpected else ""
        raise error(
            f"{source}: does not match {what}: missing keys {hard_missing}, "
            f"unexpected keys {unexpected}{hint}"
        )
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise error(f"{source}: shape mismatch (nothing loaded, no key skipped): {'; '.join(bad)}")
    target.load_state_dict(dict(state), strict=not missing)
    return missing
