"""Uncertainty of every accuracy the toolkit prints.

Two sources of variation are separated:

* **test-set sampling**: a metric measured on ``N`` test scenes is one draw; its 95 % interval
  comes from a nonparametric bootstrap over **test scenes** (scenes are resampled with
  replacement ``n_boot`` times and the metric is recomputed; the 2.5 / 97.5 percentiles are the
  interval), as torchgeo-bench-style benchmarks do. Segmentation resamples whole scenes (their
  pixels are not independent), multi-label resamples whole samples. :func:`bootstrap_interval`
  computes it, vectorised for accuracy, macro accuracy and mIoU (one matrix product of
  multinomial resampling counts with per-scene counts), by recomputation for mAP.
* **seeds** (data split, probe initialisation, fine-tuning order): :func:`seed_interval` is the
  Student-t 95 % interval of the mean over seeds; the retention curves also show the
  slimmability paper's band, mean +- 2 SD.

:func:`wilson_interval` is the analytic binomial interval of an accuracy, the reference the
bootstrap is tested against. :func:`ratio_interval` propagates two independent intervals to a
ratio (retention of a single seed) with the delta method; variant and full model are scored on
the same scenes, so their errors are positively correlated and the interval is conservative
(wider than a paired one). :func:`intervals_overlap` is the rule behind the report's
"indistinguishable".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

from mapex_analysis.eval.metrics import multilabel_map

__all__ = [
    "CI_LEVEL",
    "N_BOOT",
    "bootstrap_interval",
    "intervals_overlap",
    "ratio_interval",
    "resample_counts",
    "seed_interval",
    "wilson_interval",
]

#: Confidence level of every interval the toolkit prints.
CI_LEVEL = 0.95
#: Bootstrap resamples (percentile interval; its Monte Carlo error at N = 1,000 scenes is
#: below 0.3 points of accuracy).
N_BOOT = 1000
#: Resamples for metrics recomputed by scikit-learn (mAP): slower per resample.
N_BOOT_SLOW = 200


@functools.lru_cache(maxsize=8)
def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``n_boot`` bootstrap resamples.

    Cached (read-only): every metric of one probe, and every probe of a cell, resamples the
    same test scenes the same way, so their intervals are paired.

    Args:
        n: Number of items (test scenes).
        n_boot: Number of resamples.
        seed: Seed of the resampling (a study passes the cell's seed).

    Returns:
        ``(n_boot, n)`` float64 counts; every row sums to ``n``.
    """
    rng = np.random.default_rng(seed)
    out = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    out.flags.writeable = False
    return out


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _scene_confusions(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int,
                      ignore_index: int | None) -> np.ndarray:  # fmt: skip
    """``(N, K * K)`` confusion counts per scene (pixels of ``ignore_index`` left out)."""
    n = len(y_true)
    t = y_true.reshape(n, -1).astype(np.int64)
    p = y_pred.reshape(n, -1).astype(np.int64)
    valid = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        valid &= t != ignore_index
    idx = np.where(valid, t * num_classes + np.clip(p, 0, num_classes - 1), num_classes**2)
    out = np.zeros((n, num_classes**2 + 1), dtype=np.float64)
    np.add.at(out, (np.repeat(np.arange(n), t.shape[1]), idx.ravel()), 1.0)
    return out[:, :-1]


def _iou_from_confusions(cm: np.ndarray, k: int) -> np.ndarray:
    """mIoU of each row of ``(B, K * K)`` confusion sums (classes absent from both skipped)."""
    cm = cm.reshape(len(cm), k, k)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    union = cm.sum(axis=1) + cm.sum(axis=2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return np.nanmean(iou, axis=1)


def bootstrap_interval(
    metric: str,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    n_boot: int | None = None,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a metric over test scenes.

    Args:
        metric: ``accuracy``, ``macro_accuracy``, ``miou`` or ``map``.
        y_true: Labels: ``(N,)`` classes, ``(N, H, W)`` label maps (``miou``, and pixel
            ``accuracy`` of segmentation) or ``(N, K)`` 0/1 indicators (``map``).
        y_pred: Predicted classes of the same shape, or ``(N, K)`` scores for ``map``.
        num_classes: Required for ``miou``.
        ignore_index: Unlabelled pixels, left out of segmentation metrics.
        n_boot: Resamples (default :data:`N_BOOT`, :data:`N_BOOT_SLOW` for ``map``).
        seed: Seed of the resampling.
        level: Confidence level.

    Returns:
        ``(low, high)``; NaN if no resample defines the metric.

    Raises:
        ValueError: for an unknown metric, shape mismatch or a missing ``num_classes``.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) != len(y_pred) or len(y_true) == 0:
        raise ValueError(f"bootstrap_interval: {len(y_true)} labels vs {len(y_pred)} predictions")
    n = len(y_true)
    if metric == "map":
        w = resample_counts(n, n_boot or N_BOOT_SLOW, seed)
        vals = []
        for row in w:
            idx = np.repeat(np.arange(n), row.astype(np.int64))
            if y_true[idx].sum(axis=0).max() == 0:
                continue
            vals.append(multilabel_map(y_true[idx], y_pred[idx]))
        return _percentiles(np.asarray(vals), level)
    w = resample_counts(n, n_boot or N_BOOT, seed)
    if y_true.ndim > 1 or metric == "miou":  # scenes of pixels: per-scene confusion counts
        k = num_classes if num_classes is not None else int(max(y_true.max(), y_pred.max())) + 1
        if metric == "miou" and num_classes is None:
            raise ValueError("bootstrap_interval: miou needs num_classes")
        conf = w @ _scene_confusions(y_true, y_pred, k, ignore_index)  # (B, K*K)
        if metric == "miou":
            return _percentiles(_iou_from_confusions(conf, k), level)
        if metric == "accuracy":
            diag = conf.reshape(n_boot or N_BOOT, k, k).trace(axis1=1, axis2=2)
            return _percentiles(diag / conf.sum(axis=1), level)
        raise ValueError(f"bootstrap_interval: {metric!r} is not defined on label maps")
    correct = (y_true == y_pred).astype(np.float64)
    if metric == "accuracy":
        return _percentiles(w @ correct / n, level)
    if metric == "macro_accuracy":
        classes = np.unique(y_true)
        onehot = (y_true[:, None] == classes[None, :]).astype(np.float64)  # (N, C)
        hits, totals = w @ (onehot * correct[:, None]), w @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(totals > 0, hits / totals, np.nan)
        return _percentiles(np.nanmean(recall, axis=1), level)
    raise ValueError(
        f"bootstrap_interval: unknown metric {metric!r}; valid: accuracy, macro_accuracy, miou, map"
    )


def wilson_interval(p: float, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (an accuracy on ``n`` independent items).

    Args:
        p: Observed proportion.
        n: Number of items.
        level: Confidence level.

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: if ``n < 1`` or ``p`` is outside [0, 1].
    """
    if n < 1 or not 0.0 <= p <= 1.0:
        raise ValueError(f"wilson_interval: need n >= 1 and p in [0, 1], got p={p}, n={n}")
    z = float(sps.norm.ppf(0.5 + level / 2))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def seed_interval(
    values: Sequence[float] | np.ndarray, level: float = CI_LEVEL
) -> tuple[float, float]:
    """Student-t interval of the mean over seeds (NaN for fewer than two seeds).

    Args:
        values: One value per seed.
        level: Confidence level.

    Returns:
        ``(low, high)``.
    """
    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if arr.size < 2:
        return float("nan"), float("nan")
    half = float(sps.t.ppf(0.5 + level / 2, arr.size - 1)) * arr.std(ddof=1) / math.sqrt(arr.size)
    return float(arr.mean() - half), float(arr.mean() + half)


def ratio_interval(
    num: float, num_ci: tuple[float, float], den: float, den_ci: tuple[float, float]
) -> tuple[float, float]:
    """Delta-method interval of ``num / den`` from two intervals treated as independent
    normal ones (each half-width = z * SE). Conservative when the errors are positively
    correlated, as for a variant and its full model scored on the same test scenes.

    Args:
        num: Numerator (the variant's metric).
        num_ci: Its interval.
        den: Denominator (the full model's metric).
        den_ci: Its interval.

    Returns:
        ``(low, high)``; NaN if an input is missing or ``den <= 0``.
    """
    vals = [num, den, *num_ci, *den_ci]
    if not all(np.isfinite(vals)) or den <= 0:
        return float("nan"), float("nan")
    r = num / den
    se_n, se_d = (num_ci[1] - num_ci[0]) / 2, (den_ci[1] - den_ci[0]) / 2  # in units of z * SE
    half = math.sqrt((se_n / den) ** 2 + (r * se_d / den) ** 2)
    return r - half, r + half


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two intervals share a point (the report then calls the two values
    indistinguishable). A missing interval (NaN) never separates two values."""
    if not all(np.isfinite([*a, *b])):
        return True
    return a[0] <= b[1] and b[0] <= a[1]
