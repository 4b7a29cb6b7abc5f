"""Measurements: MACs, parameters, latency (and redundancy, specialisation, attribution).

Names are imported lazily so that ``import mapex_analysis.measure`` stays cheap::

    from mapex_analysis.measure import count_macs, count_params, measure_latency
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_API = {
    "MacsError": "mapex_analysis.measure.macs",
    "MacsReport": "mapex_analysis.measure.macs",
    "count_macs": "mapex_analysis.measure.macs",
    "sdpa_macs": "mapex_analysis.measure.macs",
    "ParamsReport": "mapex_analysis.measure.params",
    "count_params": "mapex_analysis.measure.params",
    "routed_active_params": "mapex_analysis.measure.params",
    "LatencyPoint": "mapex_analysis.measure.latency",
    "LatencyReport": "mapex_analysis.measure.latency",
    "measure_latency": "mapex_analysis.measure.latency",
    "redundancy_metrics": "mapex_analysis.measure.redundancy",
    "specialization_metrics": "mapex_analysis.measure.specialization",
    "modality_ablation": "mapex_analysis.measure.attribution",
    "band_integrated_gradients": "mapex_analysis.measure.attribution",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mapex_analysis.measure' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
