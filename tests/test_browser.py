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


def test_report_draws_every_figure_without_js_errors(tmp_path: Path) -> None:
    _table(tmp_path)
    page = render_report(tmp_path)
    n_figures = page.read_text().count('data-figure="1"')
    # retention + Pareto + latency + specialisation + redundancy + attribution
    assert n_figures == 6
    profile = tmp_path / "profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=20000",
           "--dump-dom", page.as_uri()]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert dom.count('data-drawn="1"') == n_figures
    assert dom.count('class="main-svg"') >= n_figures
    errors = re.search(r'<pre id="js-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == ""
