"""Derived views of a results table: retention, relative MACs, Pareto fronts, plotly figures.

Everything here reads the tidy results table (:mod:`mapex_analysis.study.results`) and
computes nothing that needs a model. Definitions:

* **retention** of a variant = its probe metric / the metric of the same model's ``base``
  variant fed the **same modalities** (same task, protocol, seed), as in the slimmability
  paper (metric(s) / metric(1.0));
* **relative MACs** = MACs per sample of the variant / MACs per sample of the same model's
  ``base`` variant fed **all** its modalities (the full model's cost).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mapex_analysis.eval.stats import ratio_interval, seed_interval

__all__ = [
    "PRIMARY_METRIC",
    "attribution_figure",
    "binned_retention",
    "collapse_duplicate_widths",
    "compute_bin",
    "latency_figure",
    "pareto_front",
    "pareto_figure",
    "probe_summary",
    "redundancy_figure",
    "retention_figure",
    "slim_comparison_figure",
    "slim_curves",
    "specialization_figures",
]

#: The headline metric of each probe protocol row set, by task kind (as the probes name it).
PRIMARY_METRIC = ("accuracy", "map", "miou")

_KEY = ["model", "role", "router", "variant", "operator", "prune", "width", "mode", "order",
        "modalities", "task", "protocol", "metric"]  # fmt: skip


def _primary(df: pd.DataFrame) -> pd.DataFrame:
    probes = df[df["protocol"].isin(["knn", "linear", "finetune"])]
    keep = []
    for _, g in probes.groupby(["task", "protocol"], sort=False):
        for m in PRIMARY_METRIC:
            if (g["metric"] == m).any():
                keep.append(g[g["metric"] == m])
                break
        else:
            keep.append(g[g["metric"] == sorted(g["metric"].unique())[0]])
    return pd.concat(keep) if keep else probes.iloc[0:0]


def _interval_of(g: pd.DataFrame, col: str, lo: str, hi: str) -> tuple[float, float, str]:
    """The 95 % interval of the mean of ``col`` over the seeds of ``g``: Student t over seeds
    for two or more seeds, else the single row's bootstrap interval ``(lo, hi)``."""
    if g["seed"].nunique() >= 2:
        per_seed = g.groupby("seed")[col].mean()
        a, b = seed_interval(per_seed.to_numpy())
        return a, b, f"t over {len(per_seed)} seeds"
    return float(g[lo].mean()), float(g[hi].mean()), "bootstrap over test scenes"


def probe_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per variant, task and protocol: the headline metric over seeds with its 95 %
    interval, retention with its interval, MACs and relative MACs.

    Intervals (:mod:`mapex_analysis.eval.stats`): with two or more seeds, the Student-t
    interval of the mean over seeds (the seeds vary the data sample and the probe's or
    fine-tuning's initialisation); with one seed, the bootstrap over test scenes, and for
    retention its delta-method ratio with the base variant's interval (conservative: both are
    scored on the same scenes). The base variant's retention is 1 by definition.

    Args:
        df: The results table.

    Returns:
        One row per (model, variant, modalities, task, protocol) with ``value`` (mean),
        ``std``, ``n_seeds``, ``ci_low``, ``ci_high``, ``retention``, ``ret_low``,
        ``ret_high``, ``ret_std``, ``interval`` (how the intervals were computed), ``macs``,
        ``rel_macs``, ``params``.
    """
    p = _primary(df)
    cols = [*_KEY, "value", "std", "n_seeds", "ci_low", "ci_high", "retention", "ret_low",
            "ret_high", "ret_std", "interval", "macs", "rel_macs", "params"]  # fmt: skip
    if p.empty:
        return pd.DataFrame(columns=cols)
    for c in ("ci_low", "ci_high"):
        if c not in p:
            p = p.assign(**{c: np.nan})
    # Retention per seed against the base variant fed the same modalities.
    on = ["model", "modalities", "task", "protocol", "metric", "seed"]
    ref = p[p["variant"] == "base"][[*on, "value", "ci_low", "ci_high"]].rename(
        columns={"value": "ref", "ci_low": "ref_low", "ci_high": "ref_high"}
    )
    p = p.merge(ref, on=on, how="left")
    p["retention"] = p["value"] / p["ref"]
    base = p["variant"] == "base"
    single = [ratio_interval(v, (a, b), r, (c, d)) for v, a, b, r, c, d in
              zip(p["value"], p["ci_low"], p["ci_high"], p["ref"], p["ref_low"], p["ref_high"],
                  strict=True)]  # fmt: skip
    p["ret_ci_low"] = np.where(base, 1.0, [x[0] for x in single])
    p["ret_ci_high"] = np.where(base, 1.0, [x[1] for x in single])
    records = []
    for key, g in p.groupby(_KEY, dropna=False, sort=False):
        lo, hi, how = _interval_of(g, "value", "ci_low", "ci_high")
        if bool((g["variant"] == "base").all()):
            rlo, rhi = 1.0, 1.0
        else:
            rlo, rhi, _ = _interval_of(g, "retention", "ret_ci_low", "ret_ci_high")
        per_seed = g.groupby("seed")[["value", "retention"]].mean()
        records.append(dict(zip(_KEY, key, strict=True)) | {
            "value": float(per_seed["value"].mean()), "std": float(per_seed["value"].std()),
            "n_seeds": len(per_seed), "ci_low": lo, "ci_high": hi,
            "retention": float(per_seed["retention"].mean()), "ret_low": rlo, "ret_high": rhi,
            "ret_std": float(per_seed["retention"].std()), "interval": how,
        })  # fmt: skip
    agg = pd.DataFrame.from_records(records)
    cost = df[df["protocol"] == "cost"]
    on = ["model", "variant", "modalities"]
    for metric, col in (("macs", "macs"), ("params_total", "params")):
        # one value per variant and input (cost rows do not depend on task or seed)
        v = cost[cost["metric"] == metric].groupby(on, sort=False)["value"].mean()
        agg = agg.merge(v.rename(col).reset_index(), on=on, how="left")
    agg["rel_macs"] = agg["macs"] / agg["model"].map(_full_macs(df))
    return agg[cols]


def widest(modalities: pd.Series) -> str:
    """The modality set with the most modalities (``a+b+c``) among ``modalities``.

    Args:
        modalities: Modality-set strings.

    Returns:
        The widest one (the first on ties).
    """
    values = [str(v) for v in modalities]
    return max(values, key=lambda v: v.count("+"))


def _full_macs(df: pd.DataFrame) -> dict[str, float]:
    """MACs of each model's base variant fed all its modalities (the most modalities)."""
    cost = df[(df["protocol"] == "cost") & (df["metric"] == "macs") & (df["variant"] == "base")]
    out = {}
    for model, g in cost.groupby("model"):
        full = g[g["modalities"] == widest(g["modalities"])]
        out[str(model)] = float(full["value"].mean())
    return out


def pareto_front(points: pd.DataFrame, x: str = "rel_macs", y: str = "retention") -> pd.DataFrame:
    """The Pareto-optimal points: no other point has lower-or-equal ``x`` and higher ``y``.

    Args:
        points: Rows with columns ``x`` and ``y``.
        x: Cost column (lower is better).
        y: Quality column (higher is better).

    Returns:
        The front, sorted by ``x`` ascending (``y`` strictly increasing along it).
    """
    pts = points.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, False])
    best = -np.inf
    keep = []
    for idx, row in pts.iterrows():
        if row[y] > best:
            keep.append(idx)
            best = row[y]
    return pts.loc[keep]


def _layout(
    fig: go.Figure, title: str, xtitle: str, ytitle: str, logx: bool = False,
    categorical: bool = False,
) -> None:  # fmt: skip
    fig.update_layout(title=title, template="plotly_white", height=420,
                      margin=dict(l=60, r=20, t=50, b=50), legend=dict(font=dict(size=10)))  # fmt: skip
    # a category axis for names (modalities): on a linear axis Chromium draws no bar at all
    fig.update_xaxes(title=xtitle, type="category" if categorical else "log" if logx else "linear")
    fig.update_yaxes(title=ytitle)


def _family(row: pd.Series) -> str:
    if row["operator"] == "prune+slim":
        return f"prune[{row['prune']}]+slim"
    if row["operator"] == "slim":
        return "slim"
    if row["operator"] == "prune":
        return "prune"
    return "full model"


def collapse_duplicate_widths(g: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct model among slimmed variants: widths that keep the same
    dimensions per head and MLP units give identical MACs (and identical models) for the same
    modalities, so they are one point; ``widths`` lists the widths it stands for, ``n_widths``
    how many.

    Args:
        g: Summary rows of one model and operator family.

    Returns:
        The collapsed rows (the widest width of each group kept as the representative).
    """
    g = g.sort_values("width", ascending=False)
    keys = ["modalities", "prune", "macs"]
    rep = g.groupby(keys, sort=False, dropna=False).head(1).copy()
    widths = g.groupby(keys, sort=False, dropna=False)["width"].apply(
        lambda w: ",".join(f"{x:g}" for x in w)
    )
    rep = rep.merge(widths.rename("widths").reset_index(), on=keys, how="left")
    rep["n_widths"] = rep["widths"].str.count(",") + 1
    return rep


def compute_bin(rel: float) -> float:
    """The bin of a relative-compute value: 10 % bins at or above 0.1 (the slimmability
    paper's), decades below (the log view of the smallest widths). Returns the bin's lower
    edge."""
    if not np.isfinite(rel) or rel <= 0:
        return float("nan")
    if rel >= 0.1:
        return min(np.floor(rel * 10 + 1e-9) / 10, 1.0)
    return float(10.0 ** np.floor(np.log10(rel) + 1e-9))


def binned_retention(g: pd.DataFrame) -> pd.DataFrame:
    """Mean +- 2 SD of retention per relative-compute bin (:func:`compute_bin`) over the points
    in it (modality sets and widths; each point already the mean over seeds).

    Args:
        g: Collapsed summary rows of one model and operator family.

    Returns:
        One row per bin: ``bin``, ``rel_macs`` (mean), ``retention`` (mean), ``sd`` (NaN for a
        single point), ``n`` (points), ``label``.
    """
    g = g.dropna(subset=["rel_macs", "retention"]).copy()
    g["bin"] = g["rel_macs"].map(compute_bin)
    rows = []
    for b, gb in g.groupby("bin", sort=True):
        dup = int((gb["n_widths"] > 1).sum()) if "n_widths" in gb else 0
        label = f"{len(gb)} point(s): " + "; ".join(
            f"{m} s={w}" for m, w in zip(gb["modalities"], gb.get("widths", gb["width"]),
                                         strict=True))  # fmt: skip
        if dup:
            label += f" ({dup} point(s) stand for several widths with the same kept dims)"
        rows.append({"bin": b, "rel_macs": float(gb["rel_macs"].mean()),
                     "retention": float(gb["retention"].mean()),
                     "sd": float(gb["retention"].std()) if len(gb) > 1 else float("nan"),
                     "n": len(gb), "label": label})  # fmt: skip
    return pd.DataFrame(rows)


def retention_figure(summary: pd.DataFrame, task: str, protocol: str) -> go.Figure:
    """Retention vs relative MACs for pruning, slimming and their composition, one model at a
    time (a menu picks the model): slimming curves binned by relative compute with a +- 2 SD
    band (:func:`binned_retention`, duplicate widths collapsed), pruning and the full model as
    points with their 95 % retention intervals.

    Args:
        summary: From :func:`probe_summary`.
        task: Task shown.
        protocol: Probe protocol shown.

    Returns:
        The figure.
    """
    s = summary[(summary["task"] == task) & (summary["protocol"] == protocol)].copy()
    fig = go.Figure()
    owners: list[str] = []
    if not s.empty:
        s["family"] = s.apply(_family, axis=1)
        for (model, fam), g in s.groupby(["model", "family"], sort=True):
            if "slim" in str(fam):
                b = binned_retention(collapse_duplicate_widths(g))
                if b.empty:
                    continue
                fig.add_trace(go.Scatter(
                    x=b["rel_macs"], y=b["retention"], name=f"{fam} (binned)",
                    mode="lines+markers", text=b["label"],
                    error_y=dict(type="data", array=(2 * b["sd"]).fillna(0).to_numpy(),
                                 visible=True),
                    hovertemplate="%{text}<br>rel. MACs %{x:.4f}<br>retention %{y:.3f}"
                                  "<extra></extra>",
                ))  # fmt: skip
            else:
                g = g.dropna(subset=["rel_macs"]).sort_values("rel_macs")
                fig.add_trace(go.Scatter(
                    x=g["rel_macs"], y=g["retention"], name=str(fam), mode="markers",
                    text=g["variant"] + " @" + g["modalities"],
                    error_y=dict(type="data", array=(g["ret_high"] - g["retention"]).fillna(0),
                                 arrayminus=(g["retention"] - g["ret_low"]).fillna(0)),
                    hovertemplate="%{text}<br>rel. MACs %{x:.4f}<br>retention %{y:.3f}"
                                  "<extra></extra>",
                ))  # fmt: skip
            owners.append(str(model))
    models = list(dict.fromkeys(owners))
    for tr, owner in zip(fig.data, owners, strict=True):
        tr.visible = owner == models[0]
        tr.legendgroup = owner
    if len(models) > 1:
        fig.update_layout(updatemenus=[dict(
            type="dropdown", x=1.0, xanchor="right", y=1.15, yanchor="top",
            buttons=[dict(label=m, method="update",
                          args=[{"visible": [o == m for o in owners]}]) for m in models],
        )])  # fmt: skip
    _layout(fig, f"Retention vs relative MACs: {task}, {protocol} probe"
            + (" (menu: model)" if len(models) > 1 else ""),
            "MACs / MACs of the full model (log)", "retention (same inputs)", logx=True)  # fmt: skip
    return fig


def slim_curves(summary: pd.DataFrame, task: str, protocol: str) -> pd.DataFrame:
    """Per model, the post-hoc slimming curve on all its modalities: retention (with its
    interval) at every width, for every model slimmed on them.

    Args:
        summary: From :func:`probe_summary`.
        task: Task shown.
        protocol: Probe protocol shown.

    Returns:
        Rows of ``model``, ``width``, ``retention``, ``ret_low``, ``ret_high``, ``value``,
        ``ci_low``, ``ci_high``, ``n_seeds``, ``interval``, ``rel_macs``, sorted by model and
        decreasing width (the full model's row at width 1 included).
    """
    s = summary[(summary["task"] == task) & (summary["protocol"] == protocol)
                & summary["operator"].isin(["none", "slim"])]  # fmt: skip
    out = []
    for _, g in s.groupby("model", sort=False):
        g = g[g["modalities"] == widest(g["modalities"])]
        if (g["operator"] == "slim").any():
            out.append(g.sort_values("width", ascending=False))
    cols = ["model", "width", "retention", "ret_low", "ret_high", "value", "ci_low", "ci_high",
            "n_seeds", "interval", "rel_macs"]  # fmt: skip
    return pd.concat(out)[cols] if out else pd.DataFrame(columns=cols)


def slim_comparison_figure(
    summary: pd.DataFrame, task: str, protocol: str, y: str = "retention"
) -> go.Figure:
    """Post-hoc slimming vs width, one trace per model (all its modalities), with 95 %
    intervals: how different pretrainings of one architecture survive slimming.

    Args:
        summary: From :func:`probe_summary`.
        task: Task shown.
        protocol: Probe protocol shown.
        y: ``retention`` or ``value`` (the metric itself: whether a width of one model beats
            the same width of another, which retention alone does not say).

    Returns:
        The figure.
    """
    c = slim_curves(summary, task, protocol)
    lo, hi = ("ret_low", "ret_high") if y == "retention" else ("ci_low", "ci_high")
    fig = go.Figure()
    for model, g in c.groupby("model", sort=False):
        fig.add_trace(go.Scatter(
            x=g["width"], y=g[y], name=str(model), mode="lines+markers",
            error_y=dict(type="data", array=(g[hi] - g[y]).fillna(0),
                         arrayminus=(g[y] - g[lo]).fillna(0)),
            hovertemplate="s = %{x}<br>" + y + " %{y:.3f}<extra>" + str(model) + "</extra>",
        ))  # fmt: skip
    metric = str(summary.loc[summary["task"] == task, "metric"].iloc[0]) if len(c) else "metric"
    what = "retention" if y == "retention" else metric
    _layout(fig, f"Slimming {what} by model: {task}, {protocol} probe (all modalities)",
            "width s (log)", what, logx=True)  # fmt: skip
    return fig


def pareto_figure(summary: pd.DataFrame, task: str, protocol: str) -> go.Figure:
    """All variants of all models with the Pareto front (absolute metric vs relative MACs).

    Args:
        summary: From :func:`probe_summary`.
        task: Task shown.
        protocol: Probe protocol shown.

    Returns:
        The figure: points per operator and the front as a line.
    """
    s = summary[(summary["task"] == task) & (summary["protocol"] == protocol)]
    s = s.dropna(subset=["rel_macs"])
    fig = go.Figure()
    for op, g in s.groupby("operator", sort=True):
        fig.add_trace(go.Scatter(
            x=g["rel_macs"], y=g["value"], mode="markers", name=f"operator: {op}",
            text=g["model"] + " " + g["variant"] + " @" + g["modalities"],
            hovertemplate="%{text}<br>rel. MACs %{x:.4f}<br>metric %{y:.3f}<extra></extra>",
        ))  # fmt: skip
    front = pareto_front(s, "rel_macs", "value")
    fig.add_trace(go.Scatter(x=front["rel_macs"], y=front["value"], mode="lines",
                             name="Pareto front", line=dict(color="black", dash="dash")))  # fmt: skip
    metric = s["metric"].iloc[0] if not s.empty else "metric"
    _layout(fig, f"Pareto front across operators: {task}, {protocol} probe",
            "MACs / MACs of the full model (log)", metric, logx=True)  # fmt: skip
    return fig


def latency_figure(df: pd.DataFrame) -> go.Figure:
    """Median latency vs MACs per sample, one trace per model and batch size.

    Args:
        df: The results table.

    Returns:
        The figure (empty when no latency was measured).
    """
    cost = df[df["protocol"] == "cost"]
    lat = cost[cost["metric"] == "latency_median"]
    macs = cost[cost["metric"] == "macs"][["model", "variant", "modalities", "value"]]
    m = lat.merge(macs.rename(columns={"value": "macs"}), on=["model", "variant", "modalities"])
    fig = go.Figure()
    for (model, bs), g in m.groupby(["model", "batch_size"], sort=True):
        fig.add_trace(go.Scatter(
            x=g["macs"], y=g["value"], mode="markers", name=f"{model}, batch {bs}",
            text=g["variant"] + " @" + g["modalities"],
            hovertemplate="%{text}<br>%{x:.3s} MACs/sample<br>%{y:.2f} ms<extra></extra>",
        ))  # fmt: skip
    _layout(fig, "Latency vs MACs (median of repeats, per batch)", "MACs per sample (log)",
            "median latency per batch (ms)", logx=True)  # fmt: skip
    return fig


def specialization_figures(df: pd.DataFrame) -> list[tuple[str, go.Figure]]:
    """Routing-frequency heatmaps ``p(expert | modality)`` per MoE model (base variant, all
    modalities, first task and seed), layers side by side.

    Args:
        df: The results table.

    Returns:
        ``(model label, figure)`` pairs.
    """
    r = df[(df["protocol"] == "routing") & (df["metric"] == "routing_frequency")
           & (df["variant"] == "base")]  # fmt: skip
    out = []
    for model, g in r.groupby("model", sort=True):
        g = g[g["modalities"] == widest(g["modalities"])]
        g = g[(g["task"] == g["task"].iloc[0]) & (g["seed"] == g["seed"].iloc[0])]
        layers = sorted(g["layer"].unique())
        fig = make_subplots(rows=1, cols=len(layers), subplot_titles=[f"layer {i}" for i in layers],
                            shared_yaxes=True, horizontal_spacing=0.02)  # fmt: skip
        mods = list(dict.fromkeys(g["subject"]))
        for j, layer in enumerate(layers):
            gl = g[g["layer"] == layer]
            piv = gl.pivot_table(index="subject", columns="expert", values="value").reindex(mods)
            groups = dict(zip(gl["expert"].astype(int), gl["expert_group"].astype(str)))
            xs = [f"e{e}:{groups.get(int(e), '')}" for e in piv.columns]
            fig.add_trace(go.Heatmap(z=piv.values, x=xs, y=mods, zmin=0, zmax=1,
                                     colorscale="Viridis", showscale=j == len(layers) - 1,
                                     colorbar=dict(title="p(e|m)")), row=1, col=j + 1)  # fmt: skip
        fig.update_layout(title=f"Expert specialisation of {model}: p(expert | modality), "
                          f"task {g['task'].iloc[0]}", template="plotly_white", height=380,
                          margin=dict(l=80, r=20, t=70, b=80))  # fmt: skip
        out.append((str(model), fig))
    return out


_RED = (("effective_dimensionality", "effective dimensionality"),
        ("mean_abs_correlation", "mean |correlation|"),
        ("spectrum_slope", "explained-variance slope (log-log)"))  # fmt: skip


def redundancy_figure(df: pd.DataFrame) -> go.Figure:
    """Redundancy measures vs width for the slimmed full models (first task, mean over seeds).

    Args:
        df: The results table.

    Returns:
        A figure with one panel per measure.
    """
    r = df[(df["protocol"] == "features") & df["operator"].isin(["none", "slim"])]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in _RED])
    if not r.empty:
        task = r["task"].iloc[0]
        r = r[r["task"] == task]
        for model, g in r.groupby("model", sort=True):
            full = widest(g["modalities"])
            g = g[g["modalities"] == full]
            for j, (metric, _) in enumerate(_RED):
                gm = g[g["metric"] == metric].groupby("width")["value"].mean().sort_index()
                fig.add_trace(go.Scatter(x=gm.index, y=gm.values, mode="lines+markers",
                                         name=str(model), legendgroup=str(model),
                                         showlegend=j == 0), row=1, col=j + 1)  # fmt: skip
        fig.update_xaxes(type="log", title="width s (log)")
        fig.update_layout(title=f"Feature redundancy vs width (task {task}, test features)")
    fig.update_layout(template="plotly_white", height=380, margin=dict(l=50, r=20, t=70, b=50))
    return fig


def attribution_figure(df: pd.DataFrame) -> go.Figure:
    """Modality attribution: drop of the linear probe's true-class probability when one
    modality is replaced by its mean (captum feature ablation), per model and task.

    Args:
        df: The results table.

    Returns:
        A grouped bar chart.
    """
    a = df[df["protocol"] == "attribution"]
    fig = go.Figure()
    g: Any
    for (model, task), g in a.groupby(["model", "task"], sort=True):
        m = g.groupby("subject", sort=False)["value"].mean()
        fig.add_trace(go.Bar(x=list(m.index), y=m.values, name=f"{model}, {task}"))
    _layout(fig, "Modality attribution (feature ablation of the linear probe)", "modality",
            "mean drop of true-class probability", categorical=True)  # fmt: skip
    fig.update_layout(barmode="group")
    return fig
