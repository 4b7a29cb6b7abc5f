"""What a measurement receives: the inputs of its cell, and the row every result row extends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mapex_analysis.data.tasks import TaskSpec
from mapex_analysis.eval.features import Features
from mapex_analysis.eval.probes import ProbeResult
from mapex_analysis.study.context import StudyContext
from mapex_analysis.study.grid import Cell
from mapex_analysis.study.schema import Study

__all__ = ["CostInputs", "EvalInputs", "base_row"]


def base_row(study: Study, cell: Cell) -> dict[str, Any]:
    """The columns every row of ``cell`` shares (model, variant, modalities, task, seed...)."""
    cfg = study.models[cell.model]
    v = cell.variant
    prune, slim = v.prune, v.slim
    return {
        "study": study.name,
        "model": cell.model,
        "source": cfg.source,
        "role": cfg.role,
        "router": cfg.router or "",
        "variant": v.key,
        "operator": v.operator,
        "prune": "+".join(prune.modalities) if prune is not None else "",
        "width": 1.0 if slim is None else slim.s,
        "mode": slim.mode if slim is not None else "",
        "order": slim.order if slim is not None else "",
        "task": cell.task,
        "modalities": "+".join(cell.modalities),
        "seed": cell.seed,
    }


@dataclass
class CostInputs:
    """A ``cost`` cell's inputs.

    Attributes:
        ctx: The study context (models, data).
        cell: The cell.
        model: The variant model.
        row: Columns every row of the cell carries (``protocol="cost"``).
    """

    ctx: StudyContext
    cell: Cell
    model: nn.Module
    row: dict[str, Any]

    @property
    def study(self) -> Study:
        """The study."""
        return self.ctx.study


@dataclass
class EvalInputs(CostInputs):
    """An ``eval`` cell's inputs.

    Attributes:
        train: The task's training split.
        test: The task's test split.
        task: The task definition.
        features: Frozen features of both splits.
        probes: Probe results by protocol (``knn``, ``linear``), as far as they ran.
        routing: Per-block routing counts the test split's feature pass recorded (``None``:
            not recorded, e.g. features from the cache).
    """

    train: Any = None
    test: Any = None
    task: TaskSpec | None = None
    features: Features | None = None
    probes: dict[str, ProbeResult] = field(default_factory=dict)
    routing: list[Any] | None = None
