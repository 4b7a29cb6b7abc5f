"""The applied-operations record every operator attaches to the model it returns.

``model.applied_ops`` is the list of JSON-able plans applied so far (base model first, in
order; a checkpoint stores it and :func:`mapex_analysis.ops.apply_plan` replays it),
``model.op_report`` what the last operator kept, ``model.op_reports`` every report of this
process, and ``model.model_spec`` how the base model was built.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

__all__ = ["applied_ops", "model_spec", "op_reports", "record_op"]


def applied_ops(model: nn.Module) -> list[dict[str, Any]]:
    """The plans applied to ``model`` (empty for an unmodified model)."""
    return list(getattr(model, "applied_ops", []))


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """How the base model was built (``{"name", "kwargs"}``), or ``None`` for a module the
    factory did not build."""
    spec = getattr(model, "model_spec", None)
    return dict(spec) if spec else None


def op_reports(model: nn.Module) -> list[dict[str, Any]]:
    """The reports of the operators applied to ``model`` in this process, earliest first."""
    return list(getattr(model, "op_reports", []))


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
    ops = [copy.deepcopy(p) for p in applied_ops(source)]
    reports = op_reports(source)
    spec = model_spec(source)
    setattr(out, "applied_ops", [*ops, copy.deepcopy(plan)])  # noqa: B010
    setattr(out, "op_report", report)  # noqa: B010
    setattr(out, "op_reports", [*reports, report])  # noqa: B010
    if spec is not None:
        setattr(out, "model_spec", copy.deepcopy(spec))  # noqa: B010
