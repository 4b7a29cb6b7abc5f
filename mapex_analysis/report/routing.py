"""Report sections on routing: the router ablation's traffic and specialisation, and the
pruning strategies (accuracy vs kept experts).

Every number comes from the results table: ``traffic_to_removed`` and ``experts_kept`` rows of
the pruned variants' cost cells, and the ``routing`` rows (``mutual_information``,
``modality_entropy``, ``own_group_share``) of the base variant fed all modalities.
"""

from __future__ import annotations

import html
import math

import pandas as pd

from mapex_analysis.modalities import DEFAULT_MODALITIES
from mapex_analysis.report.cells import mean, td
from mapex_analysis.report.figures import widest

__all__ = ["coverage_table", "router_learned_sentences", "specialisation_table", "traffic_table"]

#: What each router may do, by construction (see ``mapex_analysis.models.moe``).
_COULD = {
    "deterministic": "could only use its own group (choice inside the group by the load balance)",
    "pos_embed": "could use any expert, choosing from the patch position alone (no modality signal)",
    "modality": "could use any expert, from the token and a learned own-group prior",
}


def _routers(df: pd.DataFrame) -> dict[str, str]:
    """``{column heading: model label}`` of the MAPEX models: one per router kind (first label
    per kind) where models declare ``router:``, else one per MAPEX model label."""
    mapex = df[df["role"] == "mapex"]
    m = mapex[mapex["router"] != ""]
    if m.empty:
        return {str(label): str(label) for label in mapex["model"].unique()}
    return {str(r): str(g["model"].iloc[0]) for r, g in m.groupby("router", sort=False)}


def traffic_table(df: pd.DataFrame) -> str:
    """Share of each modality's calibration routing assignments that went to the experts
    static pruning removes, per router (%).

    Args:
        df: The results table.

    Returns:
        An HTML table, or a note when the table has no ``traffic_to_removed`` rows.
    """
    t = df[(df["metric"] == "traffic_to_removed") & (df["protocol"] == "cost")]
    routers = _routers(df)
    if t.empty or not routers:
        return "<p class='note'>No traffic_to_removed rows (no pruned MAPEX model).</p>"
    mods = [m for m in DEFAULT_MODALITIES if (t["modalities"] == m).any()]
    rows = []
    for m in mods:
        cells = []
        for model in routers.values():
            q = dict(model=model, variant=f"prune[{m}]", modalities=m, protocol="cost",
                     metric="traffic_to_removed")  # fmt: skip
            cells.append(td(mean(df, **q), q))
        rows.append(f"<tr><td class='l'>{m}</td>{''.join(cells)}</tr>")
    head = "".join(f"<th>{html.escape(r)}</th>" for r in routers)
    return "<table><tr><th class='l'>pruned to</th>" + head + "</tr>" + "".join(rows) + "</table>"


def _routing_rows(df: pd.DataFrame, model: str) -> pd.DataFrame:
    """Routing rows of ``model``'s base variant fed its widest modality set (first task, seed)."""
    r = df[(df["protocol"] == "routing") & (df["model"] == model) & (df["variant"] == "base")]
    if r.empty:
        return r
    r = r[r["modalities"] == widest(r["modalities"])]
    return r[(r["task"] == r["task"].iloc[0]) & (r["seed"] == r["seed"].iloc[0])]


def specialisation_table(df: pd.DataFrame) -> str:
    """Per MoE layer and router: ``I(M; E)`` in bits (with ``H(M)``, its upper bound) and the
    lowest own-group share over modalities.

    Args:
        df: The results table.

    Returns:
        An HTML table, or a note when there are no routing rows.
    """
    routers = {r: _routing_rows(df, m) for r, m in _routers(df).items()}
    routers = {r: g for r, g in routers.items() if not g.empty}
    if not routers:
        return "<p class='note'>No routing statistics in this study.</p>"
    # per-layer rows only (per-modality rows such as params_active_routed carry layer -1)
    layers = sorted({int(v) for g in routers.values() for v in g["layer"].unique() if v >= 0})
    head = "".join(
        f"<th>{html.escape(r)}: MI (bits)</th><th>{html.escape(r)}: min own-group share</th>"
        for r in routers
    )
    rows = []
    for layer in layers:
        cells = []
        h_m = float("nan")
        for g in routers.values():
            gl = g[g["layer"] == layer]
            if gl.empty:
                cells += ["<td>-</td>", "<td>-</td>"]
                continue
            base = dict(model=str(gl["model"].iloc[0]), variant="base",
                        modalities=str(gl["modalities"].iloc[0]), task=str(gl["task"].iloc[0]),
                        seed=int(gl["seed"].iloc[0]), protocol="routing", layer=layer)  # fmt: skip
            mi = mean(gl, metric="mutual_information")
            cells.append(td(mi, base | {"metric": "mutual_information"}, "bits"))
            own = gl[gl["metric"] == "own_group_share"]["value"]
            cells.append(td(float(own.min()) if len(own) else float("nan"),
                               base | {"metric": "own_group_share", "agg": "min"}))  # fmt: skip
            if math.isnan(h_m):
                h_m = mean(gl, metric="modality_entropy")
        rows.append(f"<tr><td>{layer}</td><td>{h_m:.3g}</td>{''.join(cells)}</tr>")
    return ("<table><tr><th>layer</th><th>H(M) (bits)</th>" + head + "</tr>" + "".join(rows)
            + "</table>")  # fmt: skip


def router_learned_sentences(df: pd.DataFrame) -> list[str]:
    """One sentence per router: what it could learn (by construction) and did (measured).

    Args:
        df: The results table.

    Returns:
        Plain-text sentences.
    """
    out = []
    t = df[(df["metric"] == "traffic_to_removed") & (df["protocol"] == "cost")]
    for r, model in _routers(df).items():
        g = _routing_rows(df, model)
        could = _COULD.get(r, "")
        if g.empty:
            continue
        own = g[g["metric"] == "own_group_share"]["value"]
        mi = g[g["metric"] == "mutual_information"]["value"]
        hm = g[g["metric"] == "modality_entropy"]["value"]
        tr = t[(t["model"] == model) & ~t["modalities"].str.contains(r"\+")
               & ~t["variant"].str.contains("routing")]["value"]  # fmt: skip
        did = (
            f"its tokens landed on their own group {100 * own.min():.1f}-{100 * own.max():.1f} %"
            f" of the time (per layer and modality), MI {mi.min():.2f}-{mi.max():.2f} bits of "
            f"H(M) = {hm.mean():.2f}"
        )
        if len(tr):
            did += (
                f"; static pruning to one modality removed experts carrying "
                f"{100 * tr.min():.2f}-{100 * tr.max():.2f} % of that modality's traffic"
            )
        routed = df[(df["metric"] == "params_active_routed") & (df["model"] == model)
                    & (df["variant"] == "base") & (df["modalities"] == df["subject"])]  # fmt: skip
        static = df[(df["metric"] == "params_active") & (df["model"] == model)
                    & (df["variant"] == "base") & df["modalities"].isin(routed["modalities"])]  # fmt: skip
        if len(routed) and len(static):
            did += (
                f"; active parameters of a modality fed alone, from the experts its tokens "
                f"reached: {routed['value'].min():,.0f}-{routed['value'].max():,.0f} (its own "
                f"group and the shared parts: {static['value'].min():,.0f}-"
                f"{static['value'].max():,.0f})"
            )
        if could:
            out.append(f"{r} router ({model}): {could}; measured: {did}.")
        else:  # the study does not say which router the model has
            out.append(f"{model} (router kind not declared in the study): measured: {did}.")
    return out


def coverage_table(df: pd.DataFrame, summary: pd.DataFrame, task: str) -> str:
    """Accuracy vs kept experts for every pruning plan of every MAPEX model, per modality.

    Args:
        df: The results table.
        summary: From :func:`~mapex_analysis.report.figures.probe_summary`.
        task: The task whose probes are shown.

    Returns:
        An HTML table (cells ``accuracy % / experts kept``), or a note without routing plans.
    """
    kept = df[(df["metric"] == "experts_kept") & (df["protocol"] == "cost")]
    s = summary[(summary["task"] == task) & (summary["operator"] == "prune")]
    if kept.empty or s.empty or not s["variant"].str.contains("routing").any():
        return ("<p class='note'>No routing-coverage sweep in this study "
                "(operators.prune.coverages).</p>")  # fmt: skip
    protocol = str(s["protocol"].iloc[0])
    s = s[(s["protocol"] == protocol) & ~s["modalities"].str.contains(r"\+")]
    out = []
    for model, g in s.groupby("model", sort=False):
        plans = sorted(
            {str(v).split("[", 1)[1].split(",", 1)[1].rstrip("]") if "," in str(v) else "static"
             for v in g["variant"]}, key=lambda p: (p != "static", p))  # fmt: skip
        head = "".join(f"<th>{html.escape(p)}</th>" for p in plans)
        rows = []
        for m in [m for m in DEFAULT_MODALITIES if (g["modalities"] == m).any()]:
            cells = []
            for p in plans:
                variant = f"prune[{m}]" if p == "static" else f"prune[{m},{p}]"
                acc = g[(g["variant"] == variant) & (g["modalities"] == m)]["value"]
                n = mean(kept, model=model, variant=variant, modalities=m)
                text = "-" if acc.empty else f"{100 * float(acc.mean()):.1f}"
                text += "" if math.isnan(n) else f" / {n:.0f}"
                cells.append(f"<td>{text}</td>")
            rows.append(f"<tr><td class='l'>{m}</td>{''.join(cells)}</tr>")
        share = mean(df[df["model"] == model], metric="experts_kept_share",
                       variant=f"prune[{DEFAULT_MODALITIES[0]}]")  # fmt: skip
        total = mean(kept, model=model, variant=f"prune[{DEFAULT_MODALITIES[0]}]") / share
        of = "" if math.isnan(total) else f" of {total:.0f}"
        out.append(
            f"<h4>{html.escape(str(model))} ({html.escape(protocol)} accuracy % / routed experts "
            f"kept{of}, all MoE layers)</h4><table><tr><th class='l'>pruned to</th>{head}</tr>"
            + "".join(rows)
            + "</table>"
        )
    return "".join(out)
