"""The self-contained HTML study report (plotly inlined once, works offline).

:func:`render_report` reads ``<study_dir>/cells`` (the results table), ``config.resolved.yaml``
and ``environment.json``; it runs no model. Table cells carry their exact value in a
``data-value`` attribute (the text shows it rounded) so tests can compare the page with the
table. Every figure sets ``data-drawn="1"`` on its container once ``Plotly.newPlot`` resolves
and JavaScript errors are collected into ``#js-errors``, so a headless browser can check both.
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline
import yaml

from mapex_analysis.eval.stats import intervals_overlap
from mapex_analysis.files import atomic_write_text
from mapex_analysis.modalities import DEFAULT_MODALITIES
from mapex_analysis.report.cells import fmt as _fmt
from mapex_analysis.report.cells import interval as _interval
from mapex_analysis.report.cells import mean as _mean
from mapex_analysis.report.cells import td as _td
from mapex_analysis.report.compute import compute_figure, floor_table
from mapex_analysis.report.figures import (
    attribution_figure,
    latency_figure,
    pareto_figure,
    probe_summary,
    redundancy_figure,
    retention_figure,
    slim_comparison_figure,
    slim_curves,
    specialization_figures,
    widest,
)
from mapex_analysis.report.paper import PAPER_ROUTERS, PAPER_TABLES
from mapex_analysis.report.routing import (
    coverage_table,
    router_learned_sentences,
    specialisation_table,
    traffic_table,
)
from mapex_analysis.study.results import read_results

__all__ = [
    "latest_study_dir",
    "modality_findings",
    "render_report",
    "seed_style_table",
    "short_answers",
    "slim_table",
]

logger = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2} td.l,th.l{text-align:left}
.fig{min-height:380px;margin-bottom:16px} .note{color:#555;font-size:13px}
.ci{color:#777;font-size:11px} .paper{background:#f4f4fa;color:#557}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:300px}
"""

_JS_ERRORS = """
window.__errors = [];
window.onerror = function(msg, src, line){ window.__errors.push(String(msg) + ' @' + line);
  var el = document.getElementById('js-errors'); if (el) { el.textContent = window.__errors.join('\\n'); } };
window.addEventListener('unhandledrejection', function(e){ window.onerror(String(e.reason), '', 0); });
"""


def _metric_td(df: pd.DataFrame, q: dict[str, Any]) -> str:
    """A metric cell: mean of the selected rows with its 95 % interval."""
    return _td(_mean(df, **q), q, ci=_interval(df, **q))


def _primary_task(df: pd.DataFrame) -> str:
    tasks = list(dict.fromkeys(df["task"][df["task"] != ""]))
    return "landcover" if "landcover" in tasks else (tasks[0] if tasks else "")


def _fed_variant(g: pd.DataFrame, modality: str) -> str:
    """A model's table row for one modality: pruned to it where the model has that variant
    (MAPEX; only ``role: mapex`` models are pruned), else the model fed only that modality."""
    pruned = f"prune[{modality}]"
    return pruned if (g["variant"] == pruned).any() else "base"


def _seed_table(df: pd.DataFrame, summary: pd.DataFrame, task: str) -> str:
    """Per-modality table: rows (model, protocol), columns modalities + all."""
    s = summary[summary["task"] == task]
    if s.empty:
        return "<p class='note'>No probe results.</p>"
    probes = df[df["task"] == task]
    cols = [m for m in DEFAULT_MODALITIES if (s["modalities"] == m).any()]
    head = "".join(f"<th>{m}</th>" for m in cols) + "<th>all</th><th>params (full)</th>"
    rows = []
    for (model, protocol), g in s.groupby(["model", "protocol"], sort=False):
        role = g["role"].iloc[0]
        metric = g["metric"].iloc[0]
        cells = []
        for m in cols:
            variant = _fed_variant(g, m)
            q = dict(model=model, variant=variant, modalities=m, task=task, protocol=protocol,
                     metric=metric)  # fmt: skip
            cells.append(_metric_td(probes, q))
        full = g[g["variant"] == "base"]
        all_mods = widest(full["modalities"])
        q = dict(model=model, variant="base", modalities=all_mods, task=task, protocol=protocol,
                 metric=metric)  # fmt: skip
        cells.append(_metric_td(probes, q))
        pq = dict(model=model, variant="base", modalities=all_mods, protocol="cost",
                  metric="params_total")  # fmt: skip
        cells.append(_td(_mean(df, **pq), pq, "parameters"))
        label = (
            f"{model} ({role}{', router ' + g['router'].iloc[0] if g['router'].iloc[0] else ''})"
        )
        rows.append(f"<tr><td class='l'>{html.escape(label)}</td><td class='l'>{protocol} "
                    f"{metric}</td>{''.join(cells)}</tr>")  # fmt: skip
    return (f"<table><tr><th class='l'>model</th><th class='l'>protocol</th>{head}</tr>"
            + "".join(rows) + "</table>")  # fmt: skip


def _table_models(s: pd.DataFrame) -> list[str]:
    """The models of a seed-style table, supervised first, then dense, then MAPEX (the
    router-ablation models, when the study has several routers, only in the router table)."""
    first = s.drop_duplicates("model")
    routers = set(first.loc[first["role"] == "mapex", "router"])
    ablation = len(routers) > 1
    order = {"supervised": 0, "dense": 1, "mapex": 2}
    keep: list[tuple[int, int, str]] = []
    for i, (model, role, router) in enumerate(
        zip(first["model"], first["role"], first["router"], strict=True)
    ):
        if not (ablation and role == "mapex" and router not in ("modality", "")):
            keep.append((order.get(str(role), 3), i, str(model)))
    return [m for *_, m in sorted(keep)]


def seed_style_table(df: pd.DataFrame, summary: pd.DataFrame, task: str) -> str:
    """The seed's table layout for one task: one row per modality (plus all modalities and
    the parameter counts), per model a k-NN and a fine-tune column (linear probe and
    fine-tune for segmentation, which has no k-NN probe), MAPEX pruned to the row's
    modality, and the paper's real-data values at the right, labelled as such.

    Args:
        df: The results table.
        summary: :func:`~mapex_analysis.report.figures.probe_summary` of it.
        task: The task.

    Returns:
        An HTML table (or a note when the task has no probe result).
    """
    s = summary[summary["task"] == task]
    if s.empty:
        return "<p class='note'>No probe results.</p>"
    frozen = "linear" if (s["metric"] == "miou").any() else "knn"
    probes = df[df["task"] == task]
    models = _table_models(s)
    groups = [
        (m, [p for p in (frozen, "finetune") if ((s["model"] == m) & (s["protocol"] == p)).any()])
        for m in models
    ]
    mods = [m for m in DEFAULT_MODALITIES if (s["modalities"] == m).any()]
    paper = PAPER_TABLES.get(task)
    head1 = "".join(
        f"<th colspan='{len(ps)}'>{html.escape(m)}<br><span class='ci'>"
        f"{html.escape(str(s.loc[s['model'] == m, 'role'].iloc[0]))}</span></th>"
        for m, ps in groups
    )
    head2 = "".join(f"<th>{'k-NN' if p == 'knn' else 'FT' if p == 'finetune' else p}</th>"
                    for _, ps in groups for p in ps)  # fmt: skip
    if paper is not None:
        head1 += (f"<th class='paper' colspan='{len(paper.columns)}'>the paper, real data: "
                  f"{html.escape(paper.title)}</th>")  # fmt: skip
        head2 += "".join(f"<th class='paper'>{html.escape(c)}</th>" for c in paper.columns)
    rows = []
    for mod in [*mods, "all"]:
        cells = []
        for model, ps in groups:
            g = s[s["model"] == model]
            if mod == "all":
                mset = widest(g.loc[g["variant"] == "base", "modalities"])
                variant = "base"
            else:
                mset, variant = mod, _fed_variant(g, mod)
            for p in ps:
                metric = g.loc[g["protocol"] == p, "metric"].iloc[0]
                q = dict(model=model, variant=variant, modalities=mset, task=task, protocol=p,
                         metric=metric)  # fmt: skip
                cells.append(_metric_td(probes, q))
        if paper is not None:
            ref = paper.rows.get(mod)
            cells += (
                [f"<td class='paper'>{v:.1f}</td>" for v in ref]
                if ref
                else ["<td class='paper'></td>"] * len(paper.columns)
            )
        rows.append(f"<tr><td class='l'>{mod}</td>{''.join(cells)}</tr>")
    # parameter counts: the full model, and what MAPEX keeps pruned to each modality
    full, kept = [], []
    for model, ps in groups:
        g = s[s["model"] == model]
        mset = widest(g.loc[g["variant"] == "base", "modalities"])
        q = dict(model=model, variant="base", modalities=mset, protocol="cost",
                 metric="params_total")  # fmt: skip
        full.append(
            _td(_mean(df, **q), q, "parameters").replace("<td", f"<td colspan='{len(ps)}'", 1)
        )
        pruned_to = [m for m in mods if (g["variant"] == f"prune[{m}]").any()]
        if pruned_to:
            counts = [_mean(df, model=model, variant=f"prune[{m}]", modalities=m,
                            protocol="cost", metric="params_total") for m in pruned_to]  # fmt: skip
            kept.append(f"<td colspan='{len(ps)}'>{min(counts):,.0f}-{max(counts):,.0f}</td>")
        else:
            kept.append(f"<td colspan='{len(ps)}'>same</td>")
    extra = len(paper.columns) if paper is not None else 0
    pp = "".join(f"<td class='paper'>{html.escape(v)}</td>" for v in paper.params) if paper else ""
    rows.append(f"<tr><td class='l'># params (full model)</td>{''.join(full)}{pp}</tr>")
    rows.append(f"<tr><td class='l'># params (as fed one modality)</td>{''.join(kept)}"
                f"{'<td class=paper></td>' * extra}</tr>")  # fmt: skip
    return (f"<table><tr><th class='l' rowspan='2'>modality</th>{head1}</tr><tr>{head2}</tr>"
            + "".join(rows) + "</table>")  # fmt: skip


def _router_table(df: pd.DataFrame, summary: pd.DataFrame, task: str) -> str:
    s = summary[(summary["task"] == task) & (summary["router"] != "")]
    if s.empty or s["router"].nunique() < 2:
        return "<p class='note'>No router ablation in this study (fewer than two router kinds).</p>"
    routers = list(dict.fromkeys(s["router"]))
    out = []
    for protocol, gp in s.groupby("protocol", sort=False):
        if gp["router"].nunique() < 2:
            continue  # a protocol only one router's model ran (fine-tuning of the main one)
        metric = gp["metric"].iloc[0]
        mods = [m for m in DEFAULT_MODALITIES if (gp["modalities"] == m).any()]
        paper = task == "landcover" and protocol == "knn"
        rows = []
        for m in mods:
            cells = []
            for r in routers:
                gr = gp[(gp["router"] == r) & (gp["modalities"] == m)]
                variant = _fed_variant(gr, m)
                model = gr["model"].iloc[0] if len(gr) else ""
                q = dict(model=model, variant=variant, modalities=m, task=task,
                         protocol=protocol, metric=metric)  # fmt: skip
                cells.append(_metric_td(df, q))
            ref = PAPER_ROUTERS.get(m) if paper else None
            cells += [f"<td class='paper'>{v:.1f}</td>" for v in ref or ()]
            cells += ["<td class='paper'></td>"] * (3 if paper and not ref else 0)
            rows.append(f"<tr><td class='l'>{m}</td>{''.join(cells)}</tr>")
        head = "".join(f"<th>{r}</th>" for r in routers)
        if paper:
            head += (
                "<th class='paper'>the paper (ben-ge-8k, k-NN): deterministic</th>"
                "<th class='paper'>pos. embed</th><th class='paper'>modality-based</th>"
            )
        out.append(f"<h4>{protocol} ({metric}, %)</h4><table><tr><th class='l'>pruned to</th>"
                   f"{head}</tr>{''.join(rows)}</table>")  # fmt: skip
    return "".join(out)


def _ret_text(row: pd.Series) -> str:
    """``0.971 (95 % CI 0.932-1.010, t over 3 seeds)``."""
    if math.isfinite(row["ret_low"]) and math.isfinite(row["ret_high"]):
        return (f"{row['retention']:.3f} (95 % CI {row['ret_low']:.3f}-{row['ret_high']:.3f}, "
                f"{row['interval']})")  # fmt: skip
    return f"{row['retention']:.3f} (no interval)"


def _verdict(row: pd.Series, target: float) -> str:
    """Whether a retention clears ``target`` given its interval."""
    if math.isfinite(row["ret_low"]) and row["ret_low"] >= target:
        return f"clearly above {target:.0%}"
    if math.isfinite(row["ret_high"]) and row["ret_high"] < target:
        return f"clearly below {target:.0%}"
    return f"indistinguishable from {target:.0%}"


def _reaching(g: pd.DataFrame, target: float) -> pd.DataFrame:
    """Variants whose mean retention reaches ``target``, cheapest first."""
    ok = g[g["retention"] >= target]
    return ok.sort_values(["macs", "retention"], ascending=[True, False])


def _answer_inputs(s: pd.DataFrame) -> pd.DataFrame:
    """The rows the answers are about: single-modality inputs, or, in a study that feeds
    every model only all its modalities, those."""
    singles = s[~s["modalities"].str.contains(r"\+")]
    return singles if len(singles) else s


def modality_findings(summary: pd.DataFrame, target: float) -> list[str]:
    """One sentence per (task, protocol, model, single modality): which operator reaches
    ``target`` retention at the lowest MACs, with the retention's 95 % interval, whether it
    clears the target, and how the cheapest variant of each other operator that reaches it
    compares ("indistinguishable" when the two retention intervals overlap).

    Args:
        summary: From :func:`~mapex_analysis.report.figures.probe_summary`.
        target: Retention threshold, e.g. 0.95.

    Returns:
        Sentences (plain text).
    """
    out = []
    s = summary.dropna(subset=["macs"])
    singles = _answer_inputs(s)
    for (task, protocol, model, mod), g in singles.groupby(
        ["task", "protocol", "model", "modalities"], sort=True
    ):
        ok = _reaching(g, target)
        base = g[g["variant"] == "base"]
        if ok.empty:
            out.append(f"{task}, {protocol}, {model} on {mod}: no variant reaches "
                       f"{target:.0%} retention.")  # fmt: skip
            continue
        best = ok.iloc[0]
        saving = ""
        if len(base) and base["macs"].iloc[0] > 0:
            saving = f" ({best['macs'] / base['macs'].iloc[0]:.1%} of the unmodified model's MACs on {mod})"
        op = best["operator"] if best["operator"] != "none" else "no operator (the full model)"
        text = (
            f"{task}, {protocol}, {model} on {mod}: {op} reaches {target:.0%} retention at the "
            f"lowest MACs, variant {best['variant']} with {best['macs']:,.0f} MACs/sample"
            f"{saving}, retention {_ret_text(best)}: {_verdict(best, target)}; relative to the "
            f"full model {best['rel_macs']:.1%} of its MACs."
        )
        for other, go_ in ok[ok["operator"] != best["operator"]].groupby("operator", sort=True):
            if other == "none":
                continue
            o = go_.iloc[0]
            same = intervals_overlap((best["ret_low"], best["ret_high"]),
                                     (o["ret_low"], o["ret_high"]))  # fmt: skip
            text += (
                f" Cheapest {other} variant reaching it: {o['variant']}, {o['macs']:,.0f} "
                f"MACs/sample, retention {o['retention']:.3f}; "
                + ("indistinguishable from" if same else "distinguishable from")
                + f" {best['variant']}."
            )
        out.append(text)
    return out


def slim_table(
    summary: pd.DataFrame, task: str, protocol: str, pairs: dict[str, str] | None = None
) -> str:
    """Metric and retention of every slimmed model at each width (columns), with intervals.

    Args:
        summary: From :func:`~mapex_analysis.report.figures.probe_summary`.
        task: Task shown.
        protocol: Probe protocol shown.
        pairs: Model -> the model it is compared with (``compare_with`` in the study); a
            value is marked <b>*</b> when its interval does not overlap the partner's at that
            width. Without pairs every model is compared with the first.

    Returns:
        An HTML table.
    """
    c = slim_curves(summary, task, protocol)
    widths = sorted(set(c["width"]), reverse=True)
    keep = (1.0, 0.5, 0.25, 0.1, 0.05, 0.03, 0.01, 0.001)
    shown = [w for w in widths if w in keep] or widths
    models = list(dict.fromkeys(c["model"]))
    partner = {m: p for m, p in (pairs or {}).items() if m in models and p in models}
    if not partner:
        partner = {m: models[0] for m in models[1:]}
    by = {m: c[c["model"] == m].set_index("width") for m in models}

    def mark(r: pd.Series, other: pd.DataFrame, w: float, lo: str, hi: str) -> str:
        if w not in other.index:
            return ""
        a = (float(r[lo]), float(r[hi]))
        o = other.loc[w, [lo, hi]].to_numpy(dtype=float)
        b = (float(o[0]), float(o[1]))
        return "" if intervals_overlap(a, b) else " <b>*</b>"

    rows = []
    for model in models:
        g, other = by[model], by.get(partner.get(model, ""), pd.DataFrame())
        cells = []
        for w in shown:
            if w not in g.index:
                cells.append("<td>-</td>")
                continue
            r = g.loc[w]
            m_v = mark(r, other, w, "ci_low", "ci_high") if len(other) else ""
            m_r = mark(r, other, w, "ret_low", "ret_high") if len(other) and w < 1 else ""
            ret = "" if w == 1.0 else (
                f"<br>R {_fmt(r['retention'], 'ratio')}{m_r} <span class='ci'>("
                f"{_fmt(r['ret_low'], 'ratio')}-{_fmt(r['ret_high'], 'ratio')})</span>")  # fmt: skip
            cells.append(f"<td>{_fmt(r['value'])}{m_v} <span class='ci'>({_fmt(r['ci_low'])}-"
                         f"{_fmt(r['ci_high'])})</span>{ret}</td>")  # fmt: skip
        vs = html.escape(partner.get(model, ""))
        rows.append(f"<tr><td class='l'>{html.escape(str(model))}</td><td class='l'>{vs}</td>"
                    + "".join(cells) + "</tr>")  # fmt: skip
    head = "".join(f"<th>s = {w:g}</th>" for w in shown)
    how = html.escape("; ".join(sorted(set(c["interval"].dropna()))))
    return (f"<h3>{html.escape(task)}, {html.escape(protocol)}: metric % and retention R at "
            f"each width (<b>*</b>: its interval does not overlap the compared model's; "
            f"intervals: {how})</h3>"
            f"<table><tr><th class='l'>model</th><th class='l'>compared with</th>{head}</tr>"
            + "".join(rows) + "</table>")  # fmt: skip


def short_answers(df: pd.DataFrame, summary: pd.DataFrame, target: float) -> str:
    """The report's first table: per task and single modality, the cheapest variant of any
    model and operator whose retention reaches ``target`` (headline protocol: linear when
    present), with its metric and retention intervals and whether it clears the target.

    Args:
        df: The results table (the metric cell's rows).
        summary: From :func:`~mapex_analysis.report.figures.probe_summary`.
        target: Retention threshold.

    Returns:
        An HTML table (or a note when no probe ran).
    """
    s_df = df
    s = summary.dropna(subset=["macs"])
    s = _answer_inputs(s)
    if s.empty:
        return "<p class='note'>No probe results.</p>"
    rows = []
    for (task, mod), g in s.groupby(["task", "modalities"], sort=False):
        protocol = "linear" if (g["protocol"] == "linear").any() else str(g["protocol"].iloc[0])
        g = g[g["protocol"] == protocol]
        ok = _reaching(g, target)
        if ok.empty:
            rows.append(f"<tr><td class='l'>{task}</td><td class='l'>{mod}</td><td class='l'>"
                        f"{protocol}</td><td class='l' colspan='6'>no variant reaches "
                        f"{target:.0%}</td></tr>")  # fmt: skip
            continue
        b = ok.iloc[0]
        q = dict(model=b["model"], variant=b["variant"], modalities=mod, task=task,
                 protocol=protocol, metric=b["metric"])  # fmt: skip
        rows.append(
            f"<tr><td class='l'>{task}</td><td class='l'>{mod}</td><td class='l'>{protocol} "
            f"{b['metric']}</td><td class='l'>{html.escape(str(b['model']))}</td>"
            f"<td class='l'>{html.escape(str(b['variant']))}</td>"
            f"<td>{b['rel_macs']:.1%}</td>{_metric_td(s_df, q)}"
            f"<td>{_fmt(b['retention'], 'ratio')}<br><span class='ci'>"
            f"{_fmt(b['ret_low'], 'ratio')}-{_fmt(b['ret_high'], 'ratio')}</span></td>"
            f"<td class='l'>{_verdict(b, target)}</td></tr>"
        )
    return (
        "<table><tr><th class='l'>task</th><th class='l'>modality</th><th class='l'>protocol"
        "</th><th class='l'>model</th><th class='l'>cheapest variant reaching the target</th>"
        "<th>MACs / full model</th><th>metric %</th><th>retention</th><th class='l'>vs target"
        "</th></tr>" + "".join(rows) + "</table>"
    )


def _figure_div(fig: go.Figure, idx: int) -> str:
    spec = pio.to_json(fig, validate=False)
    return (
        f'<div id="fig{idx}" class="fig" data-figure="1"></div>\n<script>(function(){{'
        f"var s={spec};var el=document.getElementById('fig{idx}');"
        "Plotly.newPlot(el,s.data,s.layout,{responsive:true,displaylogo:false})"
        ".then(function(){el.setAttribute('data-drawn','1');})"
        ".catch(function(e){window.onerror('plot fig" + str(idx) + ": '+e,'',0);});"
        "})();</script>"
    )


def latest_study_dir(root: str | Path = "reports") -> Path:
    """The most recently modified study folder under ``root`` (one holding ``cells/``).

    Args:
        root: Parent folder of study outputs.

    Returns:
        The folder.

    Raises:
        FileNotFoundError: if ``root`` holds no study results.
    """
    cands = [p for p in Path(root).glob("*/cells") if p.is_dir()]
    if not cands:
        raise FileNotFoundError(
            f"no study results under {str(root)!r}; run `mapex-study run` first"
        )
    return max(cands, key=lambda p: p.stat().st_mtime).parent


def render_report(study_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render ``<study_dir>/report.html`` from the results table.

    Args:
        study_dir: The study's output folder.
        out: Output file; default ``<study_dir>/report.html``.

    Returns:
        The written file.

    Raises:
        FileNotFoundError: if the folder holds no results.
    """
    folder = Path(study_dir)
    df = read_results(folder)
    if df.empty:
        raise FileNotFoundError(f"{folder} holds no finished cells; run the study first")
    cfg_path, env_path = folder / "config.resolved.yaml", folder / "environment.json"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    target = float(cfg.get("retention_target", 0.95))
    summary = probe_summary(df)
    task = _primary_task(df)
    protocols = list(dict.fromkeys(summary["protocol"])) if not summary.empty else []
    figs: list[tuple[str, go.Figure]] = []
    #: figures that would be empty, and why (said in text instead of drawn)
    empty: list[str] = []
    tasks = list(dict.fromkeys(summary["task"])) if not summary.empty else []
    has = (
        {(t, p) for t, p in zip(summary["task"], summary["protocol"], strict=True)}
        if tasks
        else set()
    )
    for t in tasks:
        for p in protocols:
            if (t, p) in has:
                figs.append((f"Retention vs relative MACs: {t}, {p}",
                             retention_figure(summary, t, p)))  # fmt: skip
            else:
                empty.append(f"Retention vs relative MACs and Pareto front for {t}, {p}: no "
                             f"{p} results on {t}" + (" (k-NN is not run on segmentation "
                             "tasks)" if p == "knn" else ""))  # fmt: skip
    for t in tasks:
        p0 = next((p for p in protocols if (t, p) in has), None)
        if p0 is not None:
            figs.append((f"Pareto front: {t}, {p0}", pareto_figure(summary, t, p0)))
    slim_parts: list[str] = []
    pairs = {str(k): str(v["compare_with"]) for k, v in (cfg.get("models") or {}).items()
             if isinstance(v, dict) and v.get("compare_with")}  # fmt: skip
    for t in tasks:
        for p in protocols:
            if (t, p) in has and slim_curves(summary, t, p)["model"].nunique() >= 2:
                figs.append((f"Slimming retention by model: {t}, {p}",
                             slim_comparison_figure(summary, t, p)))  # fmt: skip
                figs.append((f"Slimmed accuracy by model: {t}, {p}",
                             slim_comparison_figure(summary, t, p, y="value")))  # fmt: skip
                slim_parts.append(slim_table(summary, t, p, pairs))
    details: list[tuple[str, go.Figure]] = []
    if (df["metric"] == "latency_median").any():
        details.append(("Latency vs MACs", latency_figure(df)))
    details += [(f"Specialisation: {m}", f) for m, f in specialization_figures(df)]
    if (df["protocol"] == "features").any():
        details.append(("Redundancy", redundancy_figure(df)))
    if (df["protocol"] == "attribution").any():
        details.append(("Attribution", attribution_figure(df)))
    compute = compute_figure(df)

    findings = modality_findings(summary, target)
    name = html.escape(str(cfg.get("name", folder.name)))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>mapex-analysis study {name}</title><style>{_CSS}</style>",
        f"<script>{_JS_ERRORS}</script>",
        f"<script>{plotly.offline.get_plotlyjs()}</script></head><body>",
        f"<h1>Study <code>{name}</code></h1>",
        f"<p>{html.escape(str(cfg.get('description', '')))}</p>",
        f"<p class='note'>{len(df):,} result rows, {df['cell'].nunique()} cells, models "
        f"{', '.join(sorted(df['model'].unique()))}, tasks "
        f"{', '.join(sorted(t for t in df['task'].unique() if t))}. Retention = metric of a "
        "variant / metric of the same model fed the same modalities without operators; "
        "relative MACs = MACs per sample / MACs of the full model on all its modalities. "
        "Accuracies in %.</p>",
        "<pre id='js-errors'></pre>",
    ]
    compute_part = [
        "<h2>Compute: how far slimming reduces MACs, and where each model's floor lies</h2>",
        "<p class='note'>Relative compute = MACs/sample of the slimmed variant / MACs of the "
        "same model (and pruning) unslimmed, fed the same modalities. Slimming narrows "
        "attention and MLP modules only; the other share (patch or spectral embeddings, "
        "norms, heads) never shrinks, so it is every mode's floor; attention-only slimming "
        "also keeps the MLP share, MLP-only slimming the attention share.</p>",
        floor_table(df),
    ]
    n_fig = 0

    def draw(items: list[tuple[str, go.Figure]]) -> list[str]:
        nonlocal n_fig
        out = []
        for title, fig in items:
            out += [f"<h3>{html.escape(title)}</h3>", _figure_div(fig, n_fig)]
            n_fig += 1
        return out

    if summary.empty:  # a cost-only study: no probes, no per-modality tables
        parts += [*compute_part, *_collapsed_note(folder)]
        parts += draw([("Relative compute vs width", compute)] if compute is not None else [])
        parts += ["<h2>Details</h2>", *draw(details)]
    else:
        parts += _accuracy_sections(df, summary, task, target, findings)
        if slim_parts:
            parts += ["<h2>Post-hoc slimming, model by model</h2>",
                      "<p class='note'>Each model slimmed post hoc on all its modalities: the "
                      "metric at each width and its retention R (metric / metric at s = 1), "
                      "mean over seeds with the 95 % interval in grey. A model keeps more of a "
                      "worse full width as easily as of a better one, so read R next to the "
                      "metric. Pairs come from the study's compare_with (else every model is "
                      "compared with the first); unmarked values are indistinguishable from "
                      "the partner's.</p>", *slim_parts]  # fmt: skip
        parts += ["<h2>Retention and Pareto fronts</h2>", _CURVE_NOTE,
                  *_collapsed_note(folder), *draw(figs)]  # fmt: skip
        if empty:
            parts.append("<h3>Figures not drawn</h3><ul class='note'>")
            parts += [f"<li>{html.escape(s)}</li>" for s in empty]
            parts.append("</ul>")
        parts += ["<h2>Details</h2>", *_routing_sections(df, summary, task), *compute_part]
        parts += draw([("Relative compute vs width", compute)] if compute is not None else [])
        parts += draw(details)
    parts += [
        "<h2>Run metadata</h2><h3>Environment</h3>",
        f"<pre>{html.escape(json.dumps(env, indent=2, sort_keys=True))}</pre>",
        "<h3>Resolved config</h3>",
        f"<pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>",
        "</body></html>",
    ]
    path = Path(out) if out is not None else folder / "report.html"
    atomic_write_text(path, "\n".join(parts))
    logger.info("report with %d figures -> %s", n_fig, path)
    return path


def _collapsed_note(folder: Path) -> list[str]:
    """What the run's ``collapsed_widths.json`` says: the widths not run because a wider one
    gives the same model (empty when none collapsed or the file is absent)."""
    path = folder / "collapsed_widths.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    items = [
        f"{model} ({plan}): " + ", ".join(f"{w} = {rep:g}" for w, rep in dropped.items())
        for model, by_plan in data.items()
        for plan, dropped in by_plan.items()
    ]
    if not items:
        return []
    return [
        "<p class='note'>Widths not run because a wider width keeps the same dimensions per "
        "head and MLP units, i.e. gives the same model (width = the width it equals):</p>"
        "<ul class='note'>",
        *[f"<li>{html.escape(i)}</li>" for i in items],
        "</ul>",
    ]


_CURVE_NOTE = (
    "<p class='note'>Slimming curves: variants with the same kept dimensions per head and "
    "MLP units (identical MACs) are one point; points are binned by relative MACs (10 % bins "
    "above 10 %, decades below, the log axis shows the smallest widths) and show the mean over "
    "the modality sets and seeds in the bin with a +- 2 SD band (the slimmability paper's "
    "curves); pruning points show their 95 % interval. Pick the model in the menu.</p>"
)


def _accuracy_sections(
    df: pd.DataFrame, summary: pd.DataFrame, task: str, target: float, findings: list[str]
) -> list[str]:
    """The answer, the findings and the per-modality tables of a study with probes."""
    how = sorted(set(summary["interval"].dropna()))
    tasks = list(dict.fromkeys(summary["task"]))
    out = [
        f"<h2>Short answer: the cheapest variant that keeps {target:.0%} of the accuracy</h2>",
        "<p class='note'>Per task and modality, over every model and operator of the study. "
        "Grey: 95 % intervals (" + html.escape("; ".join(how)) + "). 'Indistinguishable' "
        "means the retention interval contains the target.</p>",
        short_answers(df, summary, target),
        f"<details><summary>All {len(findings)} findings, one per (task, protocol, model, "
        "single modality), with the other operators compared</summary><ul>",
        *[f"<li>{html.escape(s)}</li>" for s in findings],
        "</ul></details>",
    ]
    for t in [task, *[x for x in tasks if x != task]]:
        out += [
            f"<h2>Per-modality results: {html.escape(t)}</h2>",
            "<p class='note'>The seed's table layout. MAPEX columns: pruned to the row's "
            "modality; dense and supervised columns: the model fed only that modality. Grey: "
            "95 % interval. The shaded columns are the MAPEX paper's own numbers on real data "
            "(other data sets, ViT-B/L scale models), shown as a reference, not as a result of "
            "this study.</p>",
            seed_style_table(df, summary, t),
            "<details><summary>Every protocol of every model</summary>",
            _seed_table(df, summary, t),
            "</details>",
        ]
    out += [
        f"<h2>Router ablation ({html.escape(task)})</h2>",
        "<p class='note'>Each router's model pruned (static) to the modality; accuracy %.</p>",
        _router_table(df, summary, task),
    ]
    return out


def _routing_sections(df: pd.DataFrame, summary: pd.DataFrame, task: str) -> list[str]:
    """What the routers learned: sentences, traffic, per-layer specialisation, coverage."""
    return [
        "<h3>What each router could and did learn</h3><ul>",
        *[f"<li>{html.escape(s)}</li>" for s in router_learned_sentences(df)],
        "</ul>",
        "<h3>Traffic that static pruning removes (% of the modality's calibration "
        "assignments, train split)</h3>",
        traffic_table(df),
        "<h3>Specialisation per layer (all modalities fed, test split)</h3>",
        specialisation_table(df),
        f"<h3>Pruning strategies: accuracy vs experts kept ({html.escape(task)})</h3>",
        coverage_table(df, summary, task),
    ]
