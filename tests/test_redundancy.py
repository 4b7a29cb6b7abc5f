"""Redundancy measures on hand-made feature matrices (slimmability paper measures)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mapex_analysis.measure.redundancy import (
    effective_dimensionality,
    explained_variance_ratio,
    mean_abs_correlation,
    redundancy_metrics,
    spectrum_slope,
)


def _orthonormal_centred(n: int, d: int, seed: int = 0) -> np.ndarray:
    """``(n, d)`` matrix with zero-mean orthonormal columns.

    QR of a centred matrix: each Q column is a combination of centred columns, so it is centred.
    """
    a = np.random.default_rng(seed).standard_normal((n, d))
    q, _ = np.linalg.qr(a - a.mean(axis=0))
    return q


def test_identical_columns_have_correlation_one() -> None:
    x = np.random.default_rng(0).standard_normal(50)
    F = np.stack([x, x, x, x], axis=1)
    assert mean_abs_correlation(F) == pytest.approx(1.0, abs=1e-12)
    # anti-proportional and scaled columns are as redundant: |r| = 1
    F2 = np.stack([x, -2.0 * x, 3.0 * x + 1.0], axis=1)
    assert mean_abs_correlation(F2) == pytest.approx(1.0, abs=1e-12)


def test_correlation_hand_derived() -> None:
    # x = 1,2,3,4 and y = 1,3,2,4: deviations (-1.5,-.5,.5,1.5) and (-1.5,.5,-.5,1.5);
    # sum of products 2.25-.25-.25+2.25 = 4, sum of squares 5 each -> r = 4/5 = 0.8.
    F = np.array([[1, 1], [2, 3], [3, 2], [4, 4]], dtype=float)
    assert mean_abs_correlation(F) == pytest.approx(0.8, abs=1e-12)


def test_constant_feature_left_out_and_counted() -> None:
    F = np.array([[1, 1, 7], [2, 3, 7], [3, 2, 7], [4, 4, 7]], dtype=float)
    rep = redundancy_metrics(F)
    assert rep.n_constant_features == 1
    assert rep.mean_abs_correlation == pytest.approx(0.8, abs=1e-12)


def test_isotropic_gaussian_has_effective_dimensionality_close_to_d() -> None:
    # Sample covariance of N iid N(0, I_D) rows: PR ~ D / (1 + D/N) = 16 / 1.0008 = 15.99.
    F = np.random.default_rng(1).standard_normal((20000, 16))
    rep = redundancy_metrics(F)
    assert 15.5 < rep.effective_dimensionality <= 16.0
    assert abs(rep.spectrum_slope) < 0.1
    assert rep.mean_abs_correlation < 0.02
    assert rep.fit_components == 16


def test_rank_one_matrix() -> None:
    rng = np.random.default_rng(2)
    u, v = rng.standard_normal(40), rng.standard_normal(6)
    F = np.outer(u, v)
    assert effective_dimensionality(F) == pytest.approx(1.0, abs=1e-9)
    assert mean_abs_correlation(F) == pytest.approx(1.0, abs=1e-9)
    slope, r = spectrum_slope(F)
    assert r == 1 and math.isnan(slope)


def test_two_component_spectrum_hand_derived() -> None:
    # Eigenvalues 3 and 1: ratios (0.75, 0.25); PR = (3+1)^2/(9+1) = 1.6;
    # slope = (log .25 - log .75) / (log 2 - log 1) = -log2(3) = -1.5849625.
    q = _orthonormal_centred(30, 2)
    F = q * np.sqrt([3.0, 1.0])
    np.testing.assert_allclose(explained_variance_ratio(F), [0.75, 0.25], atol=1e-12)
    assert effective_dimensionality(F) == pytest.approx(1.6, abs=1e-12)
    slope, r = spectrum_slope(F)
    assert r == 2
    assert slope == pytest.approx(-math.log2(3.0), abs=1e-12)


def test_power_law_spectrum_slope_is_exponent() -> None:
    # Eigenvalues l_i = i^-2 (i = 1..8): log ratio is exactly linear in log i with slope -2.
    q = _orthonormal_centred(200, 8, seed=3)
    idx = np.arange(1, 9, dtype=float)
    F = q * np.sqrt(idx**-2.0)
    slope, r = spectrum_slope(F)
    assert r == 8
    assert slope == pytest.approx(-2.0, abs=1e-9)
    # Fit range capped at 4 components: still -2 on an exact power law.
    assert spectrum_slope(F, max_components=4) == (pytest.approx(-2.0, abs=1e-9), 4)


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        redundancy_metrics(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        redundancy_metrics(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="at least 2 non-constant"):
        mean_abs_correlation(np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]]))
    with pytest.raises(ValueError, match="zero variance"):
        effective_dimensionality(np.ones((4, 3)))
    with pytest.raises(ValueError, match="max_components must be >= 2"):
        spectrum_slope(np.eye(3), max_components=1)
