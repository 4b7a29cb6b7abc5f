"""Frozen-feature probes: k-NN and linear (logistic regression), for every task kind.

Thin on scikit-learn: the predictions *are* scikit-learn's, so a number from this module can be
compared with any benchmark that uses the same estimator settings.

* :func:`knn_probe`: ``KNeighborsClassifier`` (brute force, uniform weights), ``k = 5`` and L2 by
  default (slimmability protocol, arXiv 2601.22841; the MAPEX group also reports k = 10),
  ``metric="cosine"`` and standardised features on request.
* :func:`linear_probe`: ``StandardScaler`` + ``LogisticRegression(max_iter=1000)``.
* :func:`knn_multilabel_probe`: k-NN with per-label voting (score = share of the k neighbours
  carrying the label), scored by macro mAP.
* :func:`linear_multilabel_probe`: one-vs-rest logistic regression, scored by macro mAP.
* :func:`segmentation_probe`: a linear probe on patch tokens trained on each patch's majority
  pixel label; its patch predictions are painted back to pixels and scored by mIoU.

:func:`run_probe` dispatches on the task kind (``multiclass``, ``binary``, ``multilabel``,
``segmentation``) so a study names a protocol, not a function.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mapex_analysis.eval.metrics import accuracy, macro_accuracy, mean_iou, multilabel_map
from mapex_analysis.eval.stats import bootstrap_interval

__all__ = [
    "PROTOCOLS",
    "ProbeResult",
    "knn_multilabel_probe",
    "knn_probe",
    "linear_multilabel_probe",
    "linear_probe",
    "patch_majority_labels",
    "run_probe",
    "segmentation_probe",
]

logger = logging.getLogger(__name__)

KnnMetric = Literal["l2", "cosine"]
_SK_METRIC = {"l2": "euclidean", "cosine": "cosine"}
#: Probe protocols :func:`run_probe` accepts.
PROTOCOLS = ("knn", "linear")
#: Fixed iteration budget of every logistic regression (part of the protocol).
LINEAR_MAX_ITER = 1000

#: BLAS / OpenMP threads of a probe fit. The probes' matrices are small (thousands of rows,
#: about a hundred features): extra threads only add synchronisation, and next to torch's own
#: threads or other Dask workers they oversubscribe the cores. One thread gave bit-identical
#: coefficients and cut the segmentation probe's fit from 6.6 s to 0.31 s on the 2-core
#: machine while another process used both cores (benchmarks/bench_study.py).
PROBE_THREADS = 1


@dataclass
class ProbeResult:
    """The outcome of one probe.

    Attributes:
        predictions: Predicted labels: ``(N,)`` class ids, ``(N, K)`` 0/1 for multi-label,
            ``(N, H, W)`` label maps for segmentation.
        scores: Class scores from the estimator (``predict_proba`` for k-NN, probabilities for
            the linear probe), or ``None`` for segmentation.
        metrics: Metric name -> value in [0, 1] (``accuracy``, ``macro_accuracy``, ``map``,
            ``miou``).
        estimator: The fitted scikit-learn estimator.
        intervals: Metric name -> 95 % bootstrap interval over test scenes
            (:func:`~mapex_analysis.eval.stats.bootstrap_interval`), filled by
            :func:`run_probe` for every metric of ``metrics`` except the patch-level
            ``patch_miou``.
    """

    predictions: np.ndarray
    scores: np.ndarray | None
    metrics: dict[str, float]
    estimator: Any = field(repr=False)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)


def _check_xy(train_X: np.ndarray, train_y: np.ndarray, test_X: np.ndarray, test_y: np.ndarray):
    if train_X.ndim != 2 or test_X.ndim != 2:
        raise ValueError(
            f"probe features must be (N, D); got train {train_X.shape}, test {test_X.shape}"
        )
    if train_X.shape[1] != test_X.shape[1]:
        raise ValueError(
            f"train and test features differ in width: {train_X.shape[1]} vs {test_X.shape[1]}"
        )
    if len(train_X) != len(train_y) or len(test_X) != len(test_y):
        raise ValueError(
            f"features and labels differ in length: train {len(train_X)} vs {len(train_y)}, "
            f"test {len(test_X)} vs {len(test_y)}"
        )


def _check_knn(k: int, metric: str, n_train: int) -> None:
    if metric not in _SK_METRIC:
        raise ValueError(f"unknown k-NN metric {metric!r}; valid: {', '.join(_SK_METRIC)}")
    if not 1 <= k <= n_train:
        raise ValueError(f"k must be in [1, {n_train}] (the training-set size), got {k}")


def _knn(k: int, metric: str, standardize: bool) -> Pipeline:
    steps: list[Any] = [StandardScaler()] if standardize else []
    steps.append(KNeighborsClassifier(n_neighbors=k, metric=_SK_METRIC[metric], algorithm="brute"))
    return make_pipeline(*steps)


def _class_result(est: Pipeline, test_X: np.ndarray, test_y: np.ndarray) -> ProbeResult:
    """Predictions, class probabilities, ``accuracy`` and ``macro_accuracy`` of a fitted probe."""
    pred = est.predict(test_X)
    return ProbeResult(
        pred,
        est.predict_proba(test_X),
        {"accuracy": accuracy(test_y, pred), "macro_accuracy": macro_accuracy(test_y, pred)},
        est,
    )


def knn_probe(
    train_X: np.ndarray,
    train_y: np.ndarray,
    test_X: np.ndarray,
    test_y: np.ndarray,
    *,
    k: int = 5,
    metric: KnnMetric = "l2",
    standardize: bool = False,
) -> ProbeResult:
    """k-nearest-neighbour probe for multi-class (or binary) labels.

    Args:
        train_X: Training features ``(N, D)``.
        train_y: Training labels ``(N,)``.
        test_X: Test features ``(M, D)``.
        test_y: Test labels ``(M,)``.
        k: Number of neighbours (5: the slimmability protocol).
        metric: ``"l2"`` (Euclidean) or ``"cosine"``.
        standardize: Standardise features with the training mean/std first.

    Returns:
        :class:`ProbeResult` with ``accuracy`` and ``macro_accuracy``.

    Raises:
        ValueError: for mismatched shapes, an unknown metric or ``k`` outside ``[1, N]``.
    """
    _check_xy(train_X, train_y, test_X, test_y)
    _check_knn(k, metric, len(train_X))
    est = _knn(k, metric, standardize).fit(train_X, train_y)
    return _class_result(est, test_X, test_y)


def _logreg(C: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=LINEAR_MAX_ITER, random_state=seed)


def linear_probe(
    train_X: np.ndarray,
    train_y: np.ndarray,
    test_X: np.ndarray,
    test_y: np.ndarray,
    *,
    C: float = 1.0,
    seed: int = 0,
) -> ProbeResult:
    """Linear probe: standardised features + multinomial logistic regression.

    Args:
        train_X: Training features ``(N, D)``.
        train_y: Training labels ``(N,)``.
        test_X: Test features ``(M, D)``.
        test_y: Test labels ``(M,)``.
        C: Inverse L2 regularisation strength.
        seed: ``random_state`` of the solver.

    Returns:
        :class:`ProbeResult` with ``accuracy`` and ``macro_accuracy``.

    Raises:
        ValueError: for mismatched shapes.
    """
    _check_xy(train_X, train_y, test_X, test_y)
    est = make_pipeline(StandardScaler(), _logreg(C, seed)).fit(train_X, train_y)
    return _class_result(est, test_X, test_y)


def knn_multilabel_probe(
    train_X: np.ndarray,
    train_Y: np.ndarray,
    test_X: np.ndarray,
    test_Y: np.ndarray,
    *,
    k: int = 5,
    metric: KnnMetric = "l2",
    standardize: bool = False,
) -> ProbeResult:
    """k-NN with label voting for multi-label targets.

    scikit-learn's ``KNeighborsClassifier`` fitted on the ``(N, K)`` indicator matrix: the
    score of label ``j`` is the share of the ``k`` neighbours carrying it (its
    ``predict_proba``), the prediction is the neighbours' majority vote (its ``predict``).

    Args:
        train_X: Training features ``(N, D)``.
        train_Y: Training indicator matrix ``(N, K)``.
        test_X: Test features ``(M, D)``.
        test_Y: Test indicator matrix ``(M, K)``.
        k: Number of neighbours.
        metric: ``"l2"`` or ``"cosine"``.
        standardize: Standardise features first.

    Returns:
        :class:`ProbeResult` with ``map`` (macro mAP of the vote shares).

    Raises:
        ValueError: for mismatched shapes, an unknown metric or a bad ``k``.
    """
    _check_xy(train_X, train_Y, test_X, test_Y)
    _check_knn(k, metric, len(train_X))
    train_Y = np.asarray(train_Y).astype(np.int64)
    est = _knn(k, metric, standardize).fit(train_X, train_Y)
    pred = est.predict(test_X)
    clf = est[-1]
    scores = np.zeros(test_Y.shape, dtype=np.float64)
    for j, proba in enumerate(est.predict_proba(test_X)):
        # A label constant in the training set has a single class column.
        classes = list(clf.classes_[j])
        if 1 in classes:
            scores[:, j] = proba[:, classes.index(1)]
    return ProbeResult(pred, scores, {"map": multilabel_map(test_Y, scores)}, est)


def linear_multilabel_probe(
    train_X: np.ndarray,
    train_Y: np.ndarray,
    test_X: np.ndarray,
    test_Y: np.ndarray,
    *,
    C: float = 1.0,
    seed: int = 0,
) -> ProbeResult:
    """One-vs-rest logistic regression on standardised features, scored by macro mAP.

    Args:
        train_X: Training features ``(N, D)``.
        train_Y: Training indicator matrix ``(N, K)``.
        test_X: Test features ``(M, D)``.
        test_Y: Test indicator matrix ``(M, K)``.
        C: Inverse L2 regularisation strength.
        seed: ``random_state`` of the solver.

    Returns:
        :class:`ProbeResult` with ``map``; ``scores`` are per-label probabilities.

    Raises:
        ValueError: for mismatched shapes.
    """
    _check_xy(train_X, train_Y, test_X, test_Y)
    est = make_pipeline(StandardScaler(), OneVsRestClassifier(_logreg(C, seed)))
    est.fit(train_X, np.asarray(train_Y).astype(np.int64))
    scores = est.predict_proba(test_X)
    return ProbeResult(est.predict(test_X), scores, {"map": multilabel_map(test_Y, scores)}, est)


def _grid(num_patches: int, height: int, width: int) -> tuple[int, int, int]:
    """Patch grid ``(gh, gw, patch)`` for ``num_patches`` square patches of an H x W map."""
    g = math.isqrt(num_patches)
    if g * g != num_patches or height % g or width % g or height // g != width // g:
        raise ValueError(
            f"{num_patches} patch tokens do not tile a {height}x{width} label map "
            "with a square grid of square patches"
        )
    return g, g, height // g


def patch_majority_labels(masks: np.ndarray, grid: int, num_classes: int) -> np.ndarray:
    """Majority pixel label of every patch (ties go to the smaller class id).

    Pixels whose label is outside ``[0, num_classes)`` (an ignore value such as 255) are not
    counted; a patch with no labelled pixel gets ``-1``.

    Args:
        masks: Label maps ``(N, H, W)``, ``H = W = grid * patch``.
        grid: Patches per side.
        num_classes: Number of classes.

    Returns:
        ``(N, grid * grid)`` int64 labels in raster (row-major) patch order.
    """
    n, h, w = masks.shape
    p = h // grid
    # (N, gh, p, gw, p) -> (N, gh, gw, p*p)
    blocks = masks.reshape(n, grid, p, grid, p).transpose(0, 1, 3, 2, 4).reshape(n, grid * grid, -1)
    counts = (blocks[..., None] == np.arange(num_classes)).sum(axis=2)  # (N, P, C)
    labels = counts.argmax(axis=-1).astype(np.int64)
    labels[counts.sum(axis=-1) == 0] = -1
    return labels


def segmentation_probe(
    train_X: np.ndarray,
    train_masks: np.ndarray,
    test_X: np.ndarray,
    test_masks: np.ndarray,
    *,
    num_classes: int,
    C: float = 1.0,
    seed: int = 0,
    ignore_index: int | None = None,
) -> ProbeResult:
    """Linear segmentation probe on patch tokens.

    Every patch token is labelled with its patch's majority pixel class; a standardised
    logistic regression is fit on all training patch tokens; each test patch's predicted class
    is painted over its pixels and compared with the full-resolution test masks.

    Args:
        train_X: Training patch tokens ``(N, P, D)`` in raster order (``P`` a square number).
        train_masks: Training label maps ``(N, H, W)``.
        test_X: Test patch tokens ``(M, P, D)``.
        test_masks: Test label maps ``(M, H, W)``.
        num_classes: Number of classes.
        C: Inverse L2 regularisation strength.
        seed: ``random_state`` of the solver.
        ignore_index: Label of unlabelled pixels (no data): they train nothing (a patch with
            no labelled pixel is left out) and are left out of every metric.

    Returns:
        :class:`ProbeResult` with pixel-level ``miou`` and ``accuracy`` and patch-level
        ``patch_miou``; ``predictions`` are ``(M, H, W)`` label maps.

    Raises:
        ValueError: if shapes do not match or the patches do not tile the masks.
    """
    if train_X.ndim != 3 or test_X.ndim != 3:
        raise ValueError(
            f"segmentation probe needs patch tokens (N, P, D); got {train_X.shape}, {test_X.shape}"
        )
    if train_masks.ndim != 3 or test_masks.ndim != 3:
        raise ValueError(
            f"segmentation masks must be (N, H, W); got {train_masks.shape}, {test_masks.shape}"
        )
    if len(train_X) != len(train_masks) or len(test_X) != len(test_masks):
        raise ValueError("patch tokens and masks differ in number of samples")
    n, p_tok, d = train_X.shape
    gh, gw, p = _grid(p_tok, *train_masks.shape[1:])
    train_lab = patch_majority_labels(train_masks, gh, num_classes)
    test_lab = patch_majority_labels(test_masks, gh, num_classes)
    labelled = train_lab.ravel() >= 0
    if not labelled.any():
        raise ValueError("segmentation probe: no training patch has a labelled pixel")
    est = make_pipeline(StandardScaler(), _logreg(C, seed))
    est.fit(train_X.reshape(-1, d)[labelled], train_lab.ravel()[labelled])
    patch_pred = est.predict(test_X.reshape(-1, test_X.shape[-1])).reshape(len(test_X), gh, gw)
    pixel_pred = np.repeat(np.repeat(patch_pred, p, axis=1), p, axis=2)
    pix = test_masks != ignore_index if ignore_index is not None else np.ones_like(test_masks, bool)
    pat = test_lab >= 0
    flat_pred = patch_pred.reshape(len(test_X), -1)
    return ProbeResult(
        pixel_pred,
        None,
        {
            "miou": mean_iou(test_masks[pix], pixel_pred[pix], num_classes),
            "accuracy": accuracy(test_masks[pix], pixel_pred[pix]),
            "patch_miou": mean_iou(test_lab[pat], flat_pred[pat], num_classes),
        },
        est,
    )


def run_probe(
    protocol: str,
    kind: str,
    train_X: np.ndarray,
    train_y: np.ndarray,
    test_X: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int | None = None,
    ci_seed: int = 0,
    **kwargs: Any,
) -> ProbeResult:
    """Run the probe a study names, for a task kind.

    Args:
        protocol: ``"knn"`` or ``"linear"``.
        kind: Task kind: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or
            ``"segmentation"`` (segmentation supports ``"linear"`` only).
        train_X: Training features.
        train_y: Training labels.
        test_X: Test features.
        test_y: Test labels.
        num_classes: Required for segmentation.
        ci_seed: Seed of the bootstrap resampling of the intervals.
        **kwargs: Passed to the probe (``k``, ``metric``, ``standardize``, ``C``, ``seed``,
            ``ignore_index``).

    Returns:
        The probe's :class:`ProbeResult`, with a 95 % bootstrap interval over test scenes
        for each metric.

    Raises:
        ValueError: for an unknown protocol or kind, or a combination that does not exist.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown probe protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    with threadpool_limits(limits=PROBE_THREADS):
        res = _run_probe(protocol, kind, train_X, train_y, test_X, test_y,
                         num_classes=num_classes, **kwargs)  # fmt: skip
    ignore = kwargs.get("ignore_index")
    for name in res.metrics:
        if name == "patch_miou":
            continue
        pred = res.scores if name == "map" else res.predictions
        assert pred is not None
        res.intervals[name] = bootstrap_interval(name, test_y, pred, num_classes=num_classes,
                                                 ignore_index=ignore, seed=ci_seed)  # fmt: skip
    return res


def _run_probe(
    protocol: str,
    kind: str,
    train_X: np.ndarray,
    train_y: np.ndarray,
    test_X: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int | None = None,
    **kwargs: Any,
) -> ProbeResult:
    fn: Callable[..., ProbeResult]
    if kind in ("multiclass", "binary"):
        fn = knn_probe if protocol == "knn" else linear_probe
        return fn(train_X, train_y, test_X, test_y, **kwargs)
    if kind == "multilabel":
        fn = knn_multilabel_probe if protocol == "knn" else linear_multilabel_probe
        return fn(train_X, train_y, test_X, test_y, **kwargs)
    if kind == "segmentation":
        if protocol != "linear":
            raise ValueError("segmentation supports the 'linear' probe protocol only")
        if num_classes is None:
            raise ValueError("segmentation probe needs num_classes")
        return segmentation_probe(
            train_X, train_y, test_X, test_y, num_classes=num_classes, **kwargs
        )
    raise ValueError(
        f"unknown task kind {kind!r}; valid: multiclass, binary, multilabel, segmentation"
    )
