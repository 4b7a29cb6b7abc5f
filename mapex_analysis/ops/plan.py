"""Replaying operator plans: :func:`apply_plan`.

Every operator records a JSON-able plan (``{"op": <operator>, ...}``) in ``model.applied_ops``
(:mod:`.record`); :func:`apply_plan` dispatches such a plan back to its operator, so a
checkpoint's ``spec.json`` (base model + list of plans) rebuilds the exact architecture of a
pruned and/or slimmed model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from mapex_analysis.ops.prune import PrunePlan, apply_prune_plan
from mapex_analysis.ops.slim import SlimPlan, apply_slim_plan

__all__ = ["OPERATORS", "apply_plan"]

#: Operator names a plan's ``"op"`` may hold.
OPERATORS: tuple[str, ...] = ("prune_experts", "slim_width")


def apply_plan(
    model: nn.Module, plan: Mapping[str, Any], *, structural_only: bool = False
) -> nn.Module:
    """Apply one recorded operator plan to ``model``.

    Args:
        model: The model to transform (not modified; a new model is returned).
        plan: A plan from ``model.applied_ops`` / a checkpoint spec, e.g.
            ``{"op": "slim_width", "s": 0.5, "mode": "attn+mlp", "order": "first", "seed": 0}``
            or ``{"op": "prune_experts", "modalities": [...], "kept_experts": {...}, ...}``.
        structural_only: Rebuild only the shapes (for a loader that overwrites every weight
            next): slimming keeps the first dims whatever the recorded order, so no weight
            statistic is computed.

    Returns:
        The transformed model, carrying ``applied_ops`` (with ``plan`` appended),
        ``model_spec`` and ``op_report``.

    Raises:
        ValueError: for a plan that is not a mapping, names an unknown operator (the valid
            ones are listed) or holds invalid values.
    """
    if not isinstance(plan, Mapping):
        raise ValueError(f"an operator plan is a mapping with an 'op' key, got {plan!r}")
    op = plan.get("op")
    if op == "slim_width":
        return apply_slim_plan(model, SlimPlan.from_dict(plan), structural_only=structural_only)
    if op == "prune_experts":
        return apply_prune_plan(model, PrunePlan.from_dict(plan))
    raise ValueError(f"unknown operator {op!r} in plan; valid operators: {list(OPERATORS)}")
