"""Intervals: bootstrap over test scenes, the binomial reference, seeds, ratios."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from mapex_analysis.eval.metrics import mean_iou
from mapex_analysis.eval.probes import run_probe
from mapex_analysis.eval.stats import (
    bootstrap_interval,
    intervals_overlap,
    ratio_interval,
    resample_counts,
    seed_interval,
    wilson_interval,
)
from mapex_analysis.study.results import read_results


def test_bootstrap_accuracy_matches_the_binomial_interval() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.integers(0, 4, n)
    pred = np.where(rng.random(n) < 0.8, y, (y + 1) % 4)
    p = float((pred == y).mean())
    lo, hi = bootstrap_interval("accuracy", y, pred, seed=1)
    w_lo, w_hi = wilson_interval(p, n)
    # Wilson half-width at p = 0.8, n = 2,000 is 1.75 points; the bootstrap agrees to 0.25
    assert abs(lo - w_lo) < 0.0025 and abs(hi - w_hi) < 0.0025
    assert (w_hi - w_lo) == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.01)


def _gaussian_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes, means -1 / +1 in the first of 4 dims, unit variance: the Bayes (and the
    linear probe's) accuracy is Phi(1) = 0.8413."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, 4))
    X[:, 0] += 2.0 * y - 1.0
    return X, y


def test_probe_interval_shrinks_with_the_test_set_and_covers_the_known_accuracy() -> None:
    train_X, train_y = _gaussian_task(4000, 0)
    true_acc = float(sps.norm.cdf(1.0))
    widths = []
    for n in (100, 400, 1600, 6400):
        test_X, test_y = _gaussian_task(n, n)
        res = run_probe("linear", "binary", train_X, train_y, test_X, test_y, ci_seed=0)
        lo, hi = res.intervals["accuracy"]
        assert lo <= res.metrics["accuracy"] <= hi
        assert lo <= true_acc <= hi, (n, lo, hi)
        widths.append(hi - lo)
    # 4x the scenes -> half the width (1 / sqrt(n)), within Monte Carlo and sampling error
    ratios = [b / a for a, b in zip(widths, widths[1:], strict=False)]
    assert all(0.35 < r < 0.65 for r in ratios), ratios
    assert widths[-1] < 0.025


def test_segmentation_interval_resamples_scenes() -> None:
    rng = np.random.default_rng(0)
    one = rng.integers(0, 3, (1, 8, 8))
    same = np.repeat(one, 50, axis=0)
    pred_one = np.where(rng.random((1, 8, 8)) < 0.7, one, 0)
    pred_same = np.repeat(pred_one, 50, axis=0)
    value = mean_iou(same, pred_same, 3)
    lo, hi = bootstrap_interval("miou", same, pred_same, num_classes=3)
    assert lo == pytest.approx(value) and hi == pytest.approx(value)  # identical scenes
    masks = rng.integers(0, 3, (60, 8, 8))
    masks[:, :2] = 255  # ignored pixels
    pred = np.where(rng.random(masks.shape) < 0.6, masks, 1) % 255
    keep = masks != 255
    value = mean_iou(masks[keep], pred[keep], 3)
    lo, hi = bootstrap_interval("miou", masks, pred, num_classes=3, ignore_index=255)
    assert lo < value < hi and hi - lo < 0.2


def test_probe_intervals_for_every_kind() -> None:
    rng = np.random.default_rng(0)
    X, y = _gaussian_task(300, 1)
    res = run_probe("knn", "multiclass", X[:200], y[:200], X[200:], y[200:], k=5)
    assert set(res.intervals) == {"accuracy", "macro_accuracy"}
    for name, (lo, hi) in res.intervals.items():
        assert lo <= res.metrics[name] <= hi
    Y = (rng.random((300, 3)) < 0.4).astype(int)
    Xm = rng.normal(size=(300, 4)) + Y @ np.eye(3, 4)
    res = run_probe("linear", "multilabel", Xm[:200], Y[:200], Xm[200:], Y[200:])
    lo, hi = res.intervals["map"]
    assert lo <= res.metrics["map"] <= hi and 0 < hi - lo < 0.3


def test_seed_ratio_and_overlap_rules() -> None:
    lo, hi = seed_interval([1.0, 2.0, 3.0])
    half = sps.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # 4.303 / sqrt(3) = 2.484
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    assert all(math.isnan(v) for v in seed_interval([0.5]))
    # r = 0.8 / 0.9; half-widths 0.04 and 0.03: sqrt((0.04/0.9)^2 + (r*0.03/0.9)^2)
    r = 0.8 / 0.9
    expect = math.sqrt((0.04 / 0.9) ** 2 + (r * 0.03 / 0.9) ** 2)
    lo, hi = ratio_interval(0.8, (0.76, 0.84), 0.9, (0.87, 0.93))
    assert (lo, hi) == pytest.approx((r - expect, r + expect))
    assert intervals_overlap((0.1, 0.3), (0.25, 0.4))
    assert not intervals_overlap((0.1, 0.2), (0.25, 0.4))
    counts = resample_counts(10, 5, 0)
    assert counts.shape == (5, 10) and (counts.sum(axis=1) == 10).all()


def test_unknown_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        bootstrap_interval("f1", np.zeros(3), np.zeros(3))


def test_study_rows_carry_their_intervals(smoke_run: Any) -> None:
    study, _ = smoke_run
    df = read_results(study.study_dir)
    probes = df[df["protocol"].isin(["knn", "linear"]) & (df["metric"] != "patch_miou")]
    assert len(probes) > 0
    assert probes["ci_low"].notna().all() and probes["ci_high"].notna().all()
    assert ((probes["ci_low"] <= probes["value"]) & (probes["value"] <= probes["ci_high"])).all()
    assert (probes["ci_high"] - probes["ci_low"]).gt(0).mean() > 0.9
    cost = df[df["protocol"] == "cost"]
    assert cost["ci_low"].isna().all()
