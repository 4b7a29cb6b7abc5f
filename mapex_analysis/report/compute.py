"""Report sections on compute: relative compute vs slimming width per model (the slimmability
paper's compute figure) and where each model's floor lies and why.

Relative compute = MACs per sample of a slimmed variant / MACs of the same model, unslimmed, fed
the same modalities. Width slimming narrows the attention and MLP modules only; the MACs outside
them (``macs_other``: patch or spectral embeddings, norms, heads) stay, so they bound every
mode from below, attention-only slimming additionally keeps the MLP's MACs and MLP-only
slimming the attention's.
"""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mapex_analysis.report.cells import td

__all__ = ["compute_figure", "compute_points", "floor_table"]

_MODES = ("attn+mlp", "attn", "mlp")


def compute_points(df: pd.DataFrame) -> pd.DataFrame:
    """One row per slimmed variant: model, prune set, mode, width, MACs, reference MACs and
    relative compute (reference: the same model and prune step, unslimmed, same modalities)."""
    macs = df[(df["protocol"] == "cost") & (df["metric"] == "macs")]
    if macs.empty:
        return pd.DataFrame()
    keys = ["model", "prune", "modalities"]
    ref = macs[macs["mode"] == ""][[*keys, "value"]].rename(columns={"value": "ref"})
    ref = ref.drop_duplicates(keys)
    pts = macs[macs["mode"] != ""].merge(ref, on=keys, how="inner")
    if pts.empty:
        return pd.DataFrame()
    pts = pts.assign(rel=pts["value"] / pts["ref"])
    widest = macs.groupby("model")["modalities"].agg(lambda s: max(s, key=lambda m: m.count("+")))
    label = pts["model"].where(pts["prune"] == "", pts["model"] + " pruned to " + pts["prune"])
    restricted = (pts["prune"] == "") & (pts["modalities"] != pts["model"].map(widest))
    label = label.where(~restricted, pts["model"] + " fed " + pts["modalities"])
    return pts.assign(curve=label).sort_values(["curve", "mode", "width"])


def compute_figure(df: pd.DataFrame) -> go.Figure | None:
    """Relative compute vs width, one panel per slimming mode, one line per model (and per
    pruned MAPEX modality); ``None`` when the table has no slimmed variants."""
    pts = compute_points(df)
    if pts.empty:
        return None
    modes = [m for m in _MODES if m in set(pts["mode"])]
    fig = make_subplots(rows=1, cols=len(modes), shared_yaxes=True,
                        subplot_titles=[f"slimmed: {m}" for m in modes])  # fmt: skip
    curves = list(dict.fromkeys(pts["curve"]))
    for j, mode in enumerate(modes, start=1):
        for i, curve in enumerate(curves):
            g = pts[(pts["mode"] == mode) & (pts["curve"] == curve)]
            if g.empty:
                continue
            fig.add_trace(go.Scatter(
                x=g["width"], y=g["rel"], mode="lines+markers", name=curve, legendgroup=curve,
                showlegend=j == 1, line=dict(color=_COLORS[i % len(_COLORS)]),
                hovertemplate=curve + "<br>s=%{x:g}<br>%{y:.1%} of full MACs<extra></extra>",
            ), row=1, col=j)  # fmt: skip
        fig.update_xaxes(type="log", title="width s (log)", row=1, col=j)
    fig.update_yaxes(title="relative compute (MACs / full MACs)", tickformat=".0%", row=1, col=1)
    fig.update_layout(title="Relative compute vs width per model (post-hoc slimming)",
                      template="plotly_white", height=480)  # fmt: skip
    return fig


_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39")  # fmt: skip


def floor_table(df: pd.DataFrame) -> str:
    """Per model and mode: MACs at full width and at the smallest width, the relative compute
    there, and the full model's attention / MLP / other shares that explain it."""
    pts = compute_points(df)
    if pts.empty:
        return "<p class='note'>No slimmed variant in this study: no compute floor to show.</p>"
    cost = df[df["protocol"] == "cost"]
    base = cost[cost["mode"] == ""]
    rows = []
    for (curve, mode), g in pts.groupby(["curve", "mode"], sort=False):
        low = g.sort_values("width").iloc[0]
        b = base[(base["model"] == low["model"]) & (base["prune"] == low["prune"])
                 & (base["modalities"] == low["modalities"])]  # fmt: skip
        share = {}
        for part in ("attn", "mlp", "other"):
            v = b[b["metric"] == f"macs_{part}"]["value"]
            share[part] = float(v.iloc[0]) / float(low["ref"]) if len(v) else float("nan")
        q_ref = {"protocol": "cost", "metric": "macs", "model": low["model"],
                 "variant": str(b["variant"].iloc[0]) if len(b) else "base",
                 "modalities": low["modalities"]}  # fmt: skip
        q_low = {"protocol": "cost", "metric": "macs", "model": low["model"],
                 "variant": low["variant"], "modalities": low["modalities"]}  # fmt: skip
        rows.append(
            "<tr><td>"
            + html.escape(str(curve))
            + f"</td><td>{html.escape(str(mode))}</td>"
            + td(float(low["ref"]), q_ref, "MACs")
            + f"<td>{low['width']:g}</td>"
            + td(float(low["value"]), q_low, "MACs")
            + f"<td><b>{low['rel']:.1%}</b></td>"
            + "".join(f"<td>{share[p]:.1%}</td>" for p in ("attn", "mlp", "other"))
            + "</tr>"
        )
    head = ("<table><tr><th>model</th><th>mode</th><th>MACs/sample, full</th><th>smallest "
            "width</th><th>MACs/sample there</th><th>relative compute</th><th>attention share "
            "(full)</th><th>MLP share (full)</th><th>other share (full): embeddings, norms, "
            "heads</th></tr>")  # fmt: skip
    return head + "".join(rows) + "</table>"
