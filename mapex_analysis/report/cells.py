"""Table cells of the report: formatted numbers that carry the table query they came from.

Every number cell is ``<td data-value=... data-unit=... data-query=...>``: the value, its unit
and the results-table selection (``{column: value}``, plus ``agg`` when the cell is not the
mean of the selected rows), so a test can recompute each number from the table. A cell with a
95 % interval also carries ``data-low`` / ``data-high`` and shows it under the value.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from mapex_analysis.eval.stats import seed_interval

__all__ = ["fmt", "interval", "mean", "td"]


def fmt(v: float, unit: str = "fraction") -> str:
    """A number as shown: fractions in %, MACs and parameters with thousands separators."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit == "fraction":
        return f"{100 * v:.1f}"
    if unit in ("MACs", "parameters"):
        return f"{v:,.0f}"
    return f"{v:.3g}"


def td(
    v: float, query: Mapping[str, Any], unit: str = "fraction",
    ci: tuple[float, float] | None = None,
) -> str:  # fmt: skip
    """A ``<td>`` with the value, its unit, the query that selects its rows and, when given
    and finite, its 95 % interval."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "<td>-</td>"
    q = html.escape(json.dumps(dict(query), sort_keys=True))
    extra, shown = "", fmt(v, unit)
    if ci is not None and all(math.isfinite(c) for c in ci):
        extra = f' data-low="{ci[0]!r}" data-high="{ci[1]!r}"'
        shown += f"<br><span class='ci'>{fmt(ci[0], unit)}-{fmt(ci[1], unit)}</span>"
    return f'<td data-value="{v!r}" data-unit="{unit}" data-query="{q}"{extra}>{shown}</td>'


def _select(df: pd.DataFrame, eq: Mapping[str, Any]) -> pd.DataFrame:
    # one boolean mask, one row selection (not a filtered copy of the frame per column)
    mask: Any = True
    for k, v in eq.items():
        mask = mask & (df[k] == v).to_numpy()
    return df if mask is True else df[mask]


def interval(df: pd.DataFrame, **eq: Any) -> tuple[float, float]:
    """95 % interval of :func:`mean` of the selected rows: Student t over their seeds when
    they span two or more seeds (clipped to [0, 1] for fractions), else the rows' bootstrap
    interval (``ci_low``/``ci_high``)."""
    m = _select(df, eq)
    if m.empty or "ci_low" not in m:
        return float("nan"), float("nan")
    if m["seed"].nunique() >= 2:
        lo, hi = seed_interval(m.groupby("seed")["value"].mean().to_numpy())
        if m["value"].between(0.0, 1.0).all():  # a fraction's interval stays in [0, 1]
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        return lo, hi
    return float(m["ci_low"].mean()), float(m["ci_high"].mean())


def mean(df: pd.DataFrame, **eq: Any) -> float:
    """Mean ``value`` of the rows where every ``column == value`` of ``eq`` (NaN if none)."""
    m = _select(df, eq)
    return float(m["value"].mean()) if len(m) else float("nan")
