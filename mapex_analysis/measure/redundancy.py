"""Representational redundancy of a feature matrix (slimmability paper, arXiv 2601.22841).

Three measures of how redundant the ``D`` feature dimensions of an encoder are on a data set,
computed on an ``(N, D)`` matrix of frozen features (rows = samples):

* **mean absolute feature correlation**: the mean of ``|r_ij|`` over all pairs ``i != j`` of
  the Pearson correlation matrix of the features. 1 when all features are (anti-)proportional,
  about 0 for independent features. Constant features have no correlation; they are left out
  and counted in the report.
* **explained-variance spectrum slope**: the eigenvalues ``l_1 >= l_2 >= ...`` of the feature
  covariance, as explained-variance ratios ``l_i / sum(l)``, are fit by a straight line in
  log-log space, ``log(ratio_i) = a + slope * log(i)``. Fit range: components ``i = 1 .. r``
  where ``r`` is the number of components whose ratio exceeds ``rel_tol`` (default 1e-10, so
  numerically-zero directions of a rank-deficient matrix do not enter), capped at
  ``max_components`` when given. A steep (very negative) slope means few directions carry the
  variance; an isotropic spectrum has slope 0.
* **effective dimensionality**: the participation ratio ``(sum l)^2 / sum(l^2)``; 1 for a
  rank-1 matrix, ``D`` for an isotropic one.

CKA is deliberately not used (the paper does not use it).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "RedundancyReport",
    "effective_dimensionality",
    "explained_variance_ratio",
    "mean_abs_correlation",
    "redundancy_metrics",
    "spectrum_slope",
]

logger = logging.getLogger(__name__)


def _as_matrix(features: np.ndarray, *, min_rows: int = 2) -> np.ndarray:
    F = np.asarray(features, dtype=np.float64)
    if F.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, D) matrix, got shape {F.shape}")
    if F.shape[0] < min_rows or F.shape[1] < 1:
        raise ValueError(f"need at least {min_rows} samples and 1 feature, got shape {F.shape}")
    if not np.isfinite(F).all():
        raise ValueError("features contain NaN or infinite values")
    return F


def _constant_columns(F: np.ndarray) -> np.ndarray:
    """Boolean mask of columns whose spread is zero up to float rounding."""
    spread = F.max(axis=0) - F.min(axis=0)
    scale = np.maximum(np.abs(F).max(axis=0), 1.0)
    return spread <= 1e-12 * scale


def mean_abs_correlation(features: np.ndarray) -> float:
    """Mean absolute off-diagonal Pearson correlation between feature dimensions.

    Args:
        features: ``(N, D)`` matrix, ``N >= 2``.

    Returns:
        Mean of ``|r_ij|`` over ordered pairs ``i != j`` of non-constant features, in [0, 1].

    Raises:
        ValueError: for a malformed matrix, or fewer than two non-constant features.
    """
    F = _as_matrix(features)
    const = _constant_columns(F)
    if const.any():
        logger.info("mean_abs_correlation: %d constant feature(s) left out", int(const.sum()))
    F = F[:, ~const]
    d = F.shape[1]
    if d < 2:
        raise ValueError(
            f"mean_abs_correlation needs at least 2 non-constant features, got {d} "
            f"({int(const.sum())} constant)"
        )
    r = np.corrcoef(F, rowvar=False)
    off = np.abs(r[~np.eye(d, dtype=bool)])
    return float(np.clip(off, 0.0, 1.0).mean())


def explained_variance_ratio(features: np.ndarray) -> np.ndarray:
    """Explained-variance ratios of the principal components, largest first.

    Args:
        features: ``(N, D)`` matrix, ``N >= 2``.

    Returns:
        ``(min(N, D),)`` float64 ratios ``l_i / sum(l)`` summing to 1.

    Raises:
        ValueError: for a malformed matrix or one with zero total variance.
    """
    F = _as_matrix(features)
    centred = F - F.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    var = s**2 / (F.shape[0] - 1)  # covariance eigenvalues, descending
    total = var.sum()
    if total <= 0:
        raise ValueError("features have zero variance; the spectrum is undefined")
    return var / total


def spectrum_slope(
    features: np.ndarray, *, rel_tol: float = 1e-10, max_components: int | None = None
) -> tuple[float, int]:
    """Log-log slope of the explained-variance-ratio spectrum against component index.

    Least-squares line through ``(log i, log ratio_i)`` for ``i = 1 .. r`` (``r``: components
    with ratio above ``rel_tol``, capped at ``max_components``).

    Args:
        features: ``(N, D)`` matrix.
        rel_tol: Ratios at or below this are numerically zero and left out of the fit.
        max_components: Upper end of the fit range, or ``None`` for all.

    Returns:
        ``(slope, r)``; ``slope`` is NaN when fewer than 2 components are above ``rel_tol``.

    Raises:
        ValueError: for a malformed matrix, or ``max_components < 2``.
    """
    if max_components is not None and max_components < 2:
        raise ValueError(f"max_components must be >= 2 to fit a line, got {max_components}")
    ratio = explained_variance_ratio(features)
    r = int((ratio > rel_tol).sum())
    if max_components is not None:
        r = min(r, max_components)
    if r < 2:
        logger.info("spectrum_slope: %d component(s) above %g; slope undefined", r, rel_tol)
        return float("nan"), r
    idx = np.arange(1, r + 1, dtype=np.float64)
    slope = np.polyfit(np.log(idx), np.log(ratio[:r]), 1)[0]
    return float(slope), r


def effective_dimensionality(features: np.ndarray) -> float:
    """Participation ratio ``(sum l)^2 / sum(l^2)`` of the covariance eigenvalues.

    Args:
        features: ``(N, D)`` matrix.

    Returns:
        A number in ``[1, min(N, D)]``.

    Raises:
        ValueError: for a malformed matrix or one with zero variance.
    """
    ratio = explained_variance_ratio(features)  # scale-free: (sum r)^2 / sum r^2 with sum r = 1
    return float(1.0 / np.sum(ratio**2))


@dataclass(frozen=True)
class RedundancyReport:
    """The three redundancy measures of one feature matrix.

    Attributes:
        mean_abs_correlation: Mean ``|r_ij|``, ``i != j`` (constant features left out).
        spectrum_slope: Log-log slope of the explained-variance-ratio spectrum.
        effective_dimensionality: Participation ratio.
        n_samples: ``N``.
        n_features: ``D``.
        n_constant_features: Features left out of the correlation.
        fit_components: Components ``1 .. fit_components`` in the slope fit.
    """

    mean_abs_correlation: float
    spectrum_slope: float
    effective_dimensionality: float
    n_samples: int
    n_features: int
    n_constant_features: int
    fit_components: int

    def to_dict(self) -> dict[str, Any]:
        """The report as a plain dict (for results tables)."""
        return asdict(self)


def redundancy_metrics(
    features: np.ndarray, *, rel_tol: float = 1e-10, max_components: int | None = None
) -> RedundancyReport:
    """All redundancy measures of a feature matrix.

    Args:
        features: ``(N, D)`` frozen features (rows = samples).
        rel_tol: See :func:`spectrum_slope`.
        max_components: See :func:`spectrum_slope`.

    Returns:
        The :class:`RedundancyReport`.

    Raises:
        ValueError: for a malformed matrix, fewer than two non-constant features, or zero
            variance.
    """
    F = _as_matrix(features)
    slope, r = spectrum_slope(F, rel_tol=rel_tol, max_components=max_components)
    return RedundancyReport(
        mean_abs_correlation=mean_abs_correlation(F),
        spectrum_slope=slope,
        effective_dimensionality=effective_dimensionality(F),
        n_samples=F.shape[0],
        n_features=F.shape[1],
        n_constant_features=int(_constant_columns(F).sum()),
        fit_components=r,
    )
