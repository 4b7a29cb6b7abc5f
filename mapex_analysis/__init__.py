"""mapex-analysis: how much of a remote sensing foundation model does a task need?

The public API is small and imported lazily (heavy dependencies such as torchgeo load only when
used)::

    from mapex_analysis import prune_experts, slim_width, count_macs, create_model
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "create_model": "mapex_analysis.models.registry",
    "list_models": "mapex_analysis.models.registry",
    "register_model": "mapex_analysis.models.registry",
    "save_model": "mapex_analysis.models.checkpoint",
    "load_model": "mapex_analysis.models.checkpoint",
    "prune_experts": "mapex_analysis.ops.prune",
    "slim_width": "mapex_analysis.ops.slim",
    "SLIM_WIDTHS": "mapex_analysis.ops.slim",
    "count_macs": "mapex_analysis.measure.macs",
    "count_params": "mapex_analysis.measure.params",
    "measure_latency": "mapex_analysis.measure.latency",
    "extract_features": "mapex_analysis.eval.features",
    "knn_probe": "mapex_analysis.eval.probes",
    "linear_probe": "mapex_analysis.eval.probes",
    "finetune": "mapex_analysis.eval.finetune",
    "retention": "mapex_analysis.eval.metrics",
    "redundancy_metrics": "mapex_analysis.measure.redundancy",
    "specialization_metrics": "mapex_analysis.measure.specialization",
    "modality_ablation": "mapex_analysis.measure.attribution",
    "band_integrated_gradients": "mapex_analysis.measure.attribution",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mapex_analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
