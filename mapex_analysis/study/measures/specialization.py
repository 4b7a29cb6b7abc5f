"""Expert specialisation of a MoE model's routing on the test split (unslimmed variants, the
study's first task), and the parameters the tokens of each modality actually reached."""

from __future__ import annotations

from typing import Any

from torch import nn

from mapex_analysis.measure.params import routed_active_params
from mapex_analysis.measure.specialization import collect_routing, specialization_metrics
from mapex_analysis.models.contract import is_moe
from mapex_analysis.study.grid import Cell
from mapex_analysis.study.measures.base import EvalInputs
from mapex_analysis.study.schema import Study

__all__ = ["measures_routing", "specialization_rows"]


def measures_routing(study: Study, cell: Cell, model: nn.Module) -> bool:
    """Whether :func:`specialization_rows` measures this cell (an unslimmed MoE variant on the
    study's first task), so that its test-split feature pass can record the routing."""
    return (
        "specialization" in study.measurements
        and cell.variant.width is None
        and cell.task == study.tasks[0]
        and is_moe(model)
    )


def specialization_rows(m: EvalInputs) -> list[dict[str, Any]]:
    """Per-layer routing measures (``protocol="routing"``) and ``params_active_routed``.

    The counts are those the test split's feature pass recorded (``m.routing``), else (features
    from the cache) those of a pass of their own; both are the same (routing does not depend on
    the batch)."""
    cell = m.cell
    if not measures_routing(m.study, cell, m.model):
        return []
    counts = m.routing
    if counts is None:
        counts = collect_routing(m.model, m.test.arrays(), modalities=cell.modalities,
                                 batch_size=m.study.data.batch_size)  # fmt: skip
    rows = []
    for r in specialization_metrics(counts).rows():
        rows.append(m.row | {
            "protocol": "routing",
            "metric": r["metric"],
            "value": float(r["value"]),
            "unit": r["unit"],
            "subject": r["modality"] or "",
            "layer": int(r["layer"]),
            "expert": -1 if r["expert"] is None else int(r["expert"]),
            "expert_group": r["expert_group"] or "",
        })  # fmt: skip
    for mod in cell.modalities:  # what the tokens reached, not what the group labels say
        rows.append(m.row | {"protocol": "routing", "metric": "params_active_routed",
                             "value": float(routed_active_params(m.model, counts, mod)),
                             "unit": "parameters", "subject": mod})  # fmt: skip
    return rows
