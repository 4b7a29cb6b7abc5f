"""Operator plans: replaying them (:func:`apply_plan`) and recording them (:func:`record_op`).

Every operator records a JSON-able plan (``{"op": <operator>, ...}``) in ``model.applied_ops``;
:func:`apply_plan` dispatches such a plan back to its operator, so a checkpoint's ``spec.json``
(base model + list of plans) rebuilds the exact architecture of a pruned and/or slimmed model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["OPERATORS", "apply_plan", "record_op"]

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
        from mapex_analysis.ops.slim import SlimPlan, apply_slim_plan

        return apply_slim_plan(model, SlimPlan.from_dict(plan), structural_only=structural_only)
    if op == "prune_experts":
        from mapex_analysis.ops.prune import PrunePlan, apply_prune_plan

        return apply_prune_plan(model, PrunePlan.from_dict(plan))
    raise ValueError(f"unknown operator {op!r} in plan; valid operators: {list(OPERATORS)}")


def record_op(
    source: nn.Module, out: nn.Module, plan: dict[str, Any], report: dict[str, Any]
) -> None:
    """Attach the operator bookkeeping to an operator's output model.

    ``out.applied_ops`` becomes the source's ops plus ``plan``; ``out.model_spec`` is copied
    from the source; ``out.op_report`` is ``report`` and ``out.op_reports`` lists the reports
    of every op applied in this process (earlier ones first).

    Args:
        source: The model the operator was applied to.
        out: The operator's result (may be ``source`` itself when in place).
        plan: The JSON-able plan of the operator.
        report: The JSON-able report of what it kept.
    """
    ops = [copy.deepcopy(p) for p in getattr(source, "applied_ops", [])]
    reports = list(getattr(source, "op_reports", []))
    spec = getattr(source, "model_spec", None)
    setattr(out, "applied_ops", [*ops, copy.deepcopy(plan)])  # noqa: B010
    setattr(out, "op_report", report)  # noqa: B010
    setattr(out, "op_reports", [*reports, report])  # noqa: B010
    if spec is not None:
        setattr(out, "model_spec", copy.deepcopy(spec))  # noqa: B010
