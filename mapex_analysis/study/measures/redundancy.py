"""Feature redundancy of the test split's frozen features (not for segmentation tasks)."""

from __future__ import annotations

from typing import Any

from mapex_analysis.measure.redundancy import redundancy_metrics
from mapex_analysis.study.measures.base import EvalInputs

__all__ = ["redundancy_rows"]

#: Metric -> unit.
METRICS = {
    "mean_abs_correlation": "|r|",
    "spectrum_slope": "log-log slope",
    "effective_dimensionality": "dimensions",
}


def redundancy_rows(m: EvalInputs) -> list[dict[str, Any]]:
    """Mean absolute feature correlation, spectrum slope and effective dimensionality."""
    assert m.task is not None and m.features is not None
    if m.task.kind == "segmentation":
        return []
    red = redundancy_metrics(m.features.test.X)
    return [
        m.row
        | {
            "protocol": "features",
            "metric": metric,
            "value": float(getattr(red, metric)),
            "unit": unit,
        }  # fmt: skip
        for metric, unit in METRICS.items()
    ]
