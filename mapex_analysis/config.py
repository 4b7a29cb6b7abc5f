"""YAML configuration files: strict pydantic models and errors that name the YAML path.

Every config section (study files, pretraining files) derives from :class:`Strict`: unknown keys
are errors listing the allowed keys, values are validated on load, and all problems of a file
are collected into one :class:`ConfigError` whose lines read ``path.to[3].key: message (got
value)``. No torch is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

__all__ = ["ConfigError", "Strict", "format_validation_error", "load_yaml", "validate"]

#: Error types whose message already says what was given.
_NO_GOT = ("unknown_key", "missing", "modality_set", "width_range", "unknown_task",
           "unknown_measurement", "unknown_model")  # fmt: skip

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file that does not validate; one line per problem, naming its path."""


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_validation_error(err: ValidationError, source: str = "study") -> str:
    """One line per validation problem: ``path: message (got value)``.

    Args:
        err: The pydantic error.
        source: File name shown in the first line.

    Returns:
        The formatted message.
    """
    lines = [f"{source}: {err.error_count()} problem(s)"]
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        ctx = e.get("ctx") or {}
        if e["type"] == "unknown_key":
            loc.append(str(ctx["key"]))
        if "index" in ctx:
            loc.append(int(ctx["index"]))
        # Drop pydantic's union/tag markers (``function-after[...]``, ``list[...]``).
        loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str", "float"}))]
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        got = ""
        if e["type"] not in _NO_GOT:
            got = f" (got {e['input']!r})" if repr(e["input"]) not in msg else ""
        lines.append(f"  {_loc(loc)}: {msg}{got}")
    return "\n".join(lines)


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors that list the allowed ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = set(cls.model_fields)
            for key in data:
                if key not in allowed:
                    raise PydanticCustomError(
                        "unknown_key",
                        "{msg}",
                        {
                            "key": str(key),
                            "msg": f"unknown key {key!r}; allowed keys: "
                            + ", ".join(sorted(allowed)),
                        },
                    )
        return data


def validate(
    model: type[M], data: Any, *, source: str, error: type[ConfigError] = ConfigError
) -> M:
    """Validate a parsed YAML document against ``model``.

    Raises:
        error: listing every problem with its YAML path (a non-mapping document included).
    """
    if not isinstance(data, dict):
        raise error(f"{source}: expected a YAML mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise error(format_validation_error(err, source)) from None


def load_yaml(path: str | Path, *, what: str, error: type[ConfigError] = ConfigError) -> Any:
    """Read a YAML file.

    Raises:
        error: if the file is missing or is not YAML (naming the file).
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} file {str(p)!r} not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise error(f"{p}: not valid YAML: {err}") from None
