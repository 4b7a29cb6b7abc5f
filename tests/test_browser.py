"""The report renders in headless Chromium: every figure drew, no JavaScript error."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mapex_analysis.report import render_report
from mapex_analysis.study.results import write_cell

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian `chromium` is not installed "
        "(apt-get install -y chromium; .ci/run installs it)",
    ),  # fmt: skip
]


def _table(folder: Path) -> None:
    """Rows for every figure kind: probes, MACs, latency, routing, redundancy, attribution."""
    for i, (variant, op, width, macs, acc) in enumerate([
        ("base", "none", 1.0, 1000.0, 0.8),
        ("slim[0.5,attn+mlp,first]", "slim", 0.5, 600.0, 0.7),
        ("slim[0.25,attn+mlp,first]", "slim", 0.25, 400.0, 0.6),
    ]):  # fmt: skip
        c = dict(study="b", model="m", role="mapex", variant=variant, operator=op, width=width,
                 modalities="rgb+sar")  # fmt: skip
        t = c | dict(task="landcover", seed=0)
        rows = [
            c | dict(protocol="cost", metric="macs", value=macs, unit="MACs"),
            c | dict(protocol="cost", metric="latency_median", value=macs / 100, unit="ms",
                     batch_size=1),
            t | dict(protocol="knn", metric="accuracy", value=acc, unit="fraction"),
            t | dict(protocol="features", metric="effective_dimensionality", value=10 * width,
                     unit="dimensions"),
        ]  # fmt: skip
        if variant == "base":
            for m, v in (("rgb", 0.3), ("sar", 0.1)):
                rows.append(t | dict(protocol="attribution", metric="true_class_prob_drop",
                                     value=v, unit="probability", subject=m))  # fmt: skip
                for e, g in enumerate(("rgb", "sar")):
                    rows.append(t | dict(protocol="routing", metric="routing_frequency",
                                         value=float(m == g), unit="fraction", subject=m,
                                         layer=0, expert=e, expert_group=g))  # fmt: skip
        write_cell(folder, f"c{i}", rows)


def _dom(page: Path, profile: Path) -> str:
    """The page's DOM after headless Chromium ran its scripts."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
           "--dump-dom", page.as_uri()]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def figure_marks(dom: str) -> dict[str, int]:
    """Visible marks per figure div (``fig<i>``): markers and bars with a real shape (a path
    other than plotly's ``M0,0Z`` placeholder), drawn lines and heatmap images."""
    out = {}
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<div id="(fig\d+)"', dom)]
    for k, (pos, fid) in enumerate(starts):
        block = dom[pos : starts[k + 1][0] if k + 1 < len(starts) else len(dom)]
        points = re.findall(r'<path class="point"[^>]*?\sd="([^"]*)"', block)
        bars = re.findall(r'<g class="point"><path d="M[\d.-]+,([\d.-]+)V([\d.-]+)H', block)
        lines = re.findall(r'class="js-line"[^>]*?\sd="(M[^"]*L[^"]*)"', block)
        images = re.findall(r"<image[^>]+href=\"data:image", block)
        out[fid] = (
            sum(d not in ("", "M0,0Z") for d in points)
            + sum(y0 != y1 for y0, y1 in bars)  # a bar of zero height is not a mark
            + len(lines)
            + len(images)
        )
    return out


def _js_errors(dom: str) -> str:
    errors = re.search(r'<pre id="js-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None
    return errors.group(1).strip()


def test_report_draws_every_figure_without_js_errors(tmp_path: Path) -> None:
    _table(tmp_path)
    page = render_report(tmp_path)
    n_figures = page.read_text().count('data-figure="1"')
    # retention + Pareto + latency + specialisation + redundancy + attribution
    assert n_figures == 6
    dom = _dom(page, tmp_path / "profile")
    assert dom.count('data-drawn="1"') == n_figures
    marks = figure_marks(dom)
    assert len(marks) == n_figures and all(n > 0 for n in marks.values()), marks
    assert _js_errors(dom) == ""


def test_mark_check_fails_on_a_deliberately_empty_figure(tmp_path: Path) -> None:
    import plotly.graph_objects as go

    from mapex_analysis.report.html import _figure_div

    _table(tmp_path)
    page = render_report(tmp_path)
    text = page.read_text()
    empty = _figure_div(go.Figure(go.Scatter(x=[], y=[])), 99)  # plotted, but no data
    page.write_text(text.replace("</body>", empty + "</body>"))
    marks = figure_marks(_dom(page, tmp_path / "profile"))
    assert marks["fig99"] == 0  # the check sees the empty figure
    assert [f for f, n in marks.items() if n == 0] == ["fig99"]


def test_smoke_study_report_draws_marks_in_every_figure(smoke_run, tmp_path: Path) -> None:
    study, _ = smoke_run
    page = render_report(study.study_dir, out=tmp_path / "report.html")
    html_text = page.read_text()
    n_figures = html_text.count('data-figure="1"')
    assert n_figures >= 8
    dom = _dom(page, tmp_path / "profile")
    marks = figure_marks(dom)
    assert len(marks) == n_figures and all(n > 0 for n in marks.values()), marks
    assert _js_errors(dom) == ""
