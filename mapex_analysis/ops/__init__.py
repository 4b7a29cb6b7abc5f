"""Operators that make a foundation model smaller and record what they did.

* :func:`prune_experts`: modality-aware expert pruning of MAPEX models (keep the experts of
  the task's modalities);
* :func:`slim_width`: post-hoc uniform width slimming of any model built from timm blocks;
* :func:`apply_plan`: replay a recorded plan (checkpoint loading, studies).

Each returns a new, physically smaller model carrying ``applied_ops`` (JSON-able plans),
``model_spec`` and ``op_report`` (what was kept, per layer).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "OPERATORS",
    "SLIM_MODES",
    "SLIM_ORDERS",
    "SLIM_WIDTHS",
    "PRUNE_STRATEGIES",
    "PrunePlan",
    "SlimPlan",
    "apply_plan",
    "prune_experts",
    "slim_width",
]

# public name -> defining module (imported lazily: the prune module needs the MAPEX models)
_API = {
    "OPERATORS": "mapex_analysis.ops.plan",
    "apply_plan": "mapex_analysis.ops.plan",
    "SLIM_MODES": "mapex_analysis.ops.slim",
    "SLIM_ORDERS": "mapex_analysis.ops.slim",
    "SLIM_WIDTHS": "mapex_analysis.ops.slim",
    "SlimPlan": "mapex_analysis.ops.slim",
    "slim_width": "mapex_analysis.ops.slim",
    "PRUNE_STRATEGIES": "mapex_analysis.ops.prune",
    "PrunePlan": "mapex_analysis.ops.prune",
    "prune_experts": "mapex_analysis.ops.prune",
}


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mapex_analysis.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
