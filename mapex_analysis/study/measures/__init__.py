"""The study's measurements: one small unit each, registered here by name.

A measurement is a function ``rows(inputs) -> list[dict]`` in its own module: it receives what
its cell already has (:class:`~mapex_analysis.study.measures.base.CostInputs` for ``cost``
cells: the variant model and its inputs; :class:`~mapex_analysis.study.measures.base.EvalInputs`
for ``eval`` cells: also the task data, the frozen features and the probes' results), decides
whether it applies to that cell, and returns its result rows (columns of
:data:`mapex_analysis.study.results.COLUMNS`). A study YAML selects measurements by the names
below (``measurements: [macs, latency, ...]``); the schema validates against this table
without importing torch, and the runner imports a unit only when a study selects it.

Adding a measurement is one new module plus one line in :data:`MEASUREMENTS` (see
``docs/architecture.md`` for a worked example).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MEASUREMENTS", "Measure", "measurement_names", "rows_function", "selected"]

CellKind = Literal["cost", "eval"]


@dataclass(frozen=True)
class Measure:
    """A registered measurement.

    Attributes:
        kind: The cell kind it runs in: ``cost`` (once per model variant and modality set) or
            ``eval`` (once per variant, modality set, task and seed).
        target: ``"module:function"`` of its rows function.
        description: One line for docs and ``mapex-study list``.
    """

    kind: CellKind
    target: str
    description: str


_M = "mapex_analysis.study.measures"

#: Measurement name -> its unit, in the order their rows are computed within a cell.
MEASUREMENTS: dict[str, Measure] = {
    "macs": Measure("cost", f"{_M}.cost:macs_rows", "MACs per sample (fused attention and routed experts counted)"),
    "params": Measure("cost", f"{_M}.cost:params_rows", "total and active parameters for the fed modalities"),
    "latency": Measure("cost", f"{_M}.cost:latency_rows", "median latency and throughput per batch size"),
    "redundancy": Measure("eval", f"{_M}.redundancy:redundancy_rows", "feature correlation, spectrum slope, effective dimensionality"),
    "specialization": Measure("eval", f"{_M}.specialization:specialization_rows", "expert specialisation of MoE routing"),
    "attribution": Measure("eval", f"{_M}.attribution:attribution_rows", "modality ablation of the linear probe"),
}  # fmt: skip


def measurement_names() -> tuple[str, ...]:
    """Every registered measurement name."""
    return tuple(MEASUREMENTS)


def selected(names: Iterable[str], kind: CellKind) -> list[str]:
    """The measurements among ``names`` that run in ``kind`` cells, in registry order."""
    wanted = set(names)
    return [n for n, m in MEASUREMENTS.items() if m.kind == kind and n in wanted]


def rows_function(name: str) -> Callable[[Any], list[dict[str, Any]]]:
    """Import and return a measurement's rows function.

    Raises:
        KeyError: for an unregistered name (the registered ones are listed).
    """
    if name not in MEASUREMENTS:
        raise KeyError(f"unknown measurement {name!r}; registered: {', '.join(MEASUREMENTS)}")
    module, func = MEASUREMENTS[name].target.split(":")
    fn: Callable[[Any], list[dict[str, Any]]] = getattr(importlib.import_module(module), func)
    return fn
