"""Expert specialisation of a MoE model's routing on the test split (unslimmed variants, the
study's first task), and the parameters the tokens of each modality actually reached."""

from __future__ import annotations

from typing import Any

from mapex_analysis.measure.params import routed_active_params
from mapex_analysis.measure.specialization import collect_routing, specialization_metrics
from mapex_analysis.models.contract import is_moe
from mapex_analysis.study.measures.base import EvalInputs

__all__ = ["specialization_rows"]


def specialization_rows(m: EvalInputs) -> list[dict[str, Any]]:
    """Per-layer routing measures (``protocol="routing"``) and ``params_active_routed``."""
    cell = m.cell
    if cell.variant.width is not None or cell.task != m.study.tasks[0] or not is_moe(m.model):
        return []
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
