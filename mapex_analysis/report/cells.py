"""Table cells of the report: formatted numbers that carry the table query they came from.

Every number cell is ``<td data-value=... data-unit=... data-query=...>``: the value, its unit
and the results-table selection (``{column: value}``, plus ``agg`` when the cell is not the
mean of the selected rows), so a test can recompute each number from the table.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

__all__ = ["fmt", "mean", "td"]


def fmt(v: float, unit: str = "fraction") -> str:
    """A number as shown: fractions in %, MACs and parameters with thousands separators."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit == "fraction":
        return f"{100 * v:.1f}"
    if unit in ("MACs", "parameters"):
        return f"{v:,.0f}"
    return f"{v:.3g}"


def td(v: float, query: Mapping[str, Any], unit: str = "fraction") -> str:
    """A ``<td>`` with the value, its unit and the query that selects its rows."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "<td>-</td>"
    q = html.escape(json.dumps(dict(query), sort_keys=True))
    return f'<td data-value="{v!r}" data-unit="{unit}" data-query="{q}">{fmt(v, unit)}</td>'


def mean(df: pd.DataFrame, **eq: Any) -> float:
    """Mean ``value`` of the rows where every ``column == value`` of ``eq`` (NaN if none)."""
    m = df
    for k, v in eq.items():
        m = m[m[k] == v]
    return float(m["value"].mean()) if len(m) else float("nan")
