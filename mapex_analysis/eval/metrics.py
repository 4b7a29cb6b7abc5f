"""Task metrics, retention and seed aggregation.

Every metric returns a plain ``float`` in [0, 1] (fractions, not percent) and is computed by
scikit-learn where scikit-learn has it, so numbers match what other benchmarks report:

* :func:`accuracy`: overall accuracy (``sklearn.metrics.accuracy_score``);
* :func:`macro_accuracy`: mean per-class recall, a.k.a. balanced accuracy
  (``sklearn.metrics.balanced_accuracy_score``);
* :func:`multilabel_map`: macro mean average precision over labels
  (``sklearn.metrics.average_precision_score(average="macro")``), the GEO-Bench BigEarthNet
  metric used by the slimmability paper (Hackel et al., arXiv 2601.22841);
* :func:`mean_iou`: segmentation mIoU over the classes present in truth or prediction.

:func:`retention` is ``metric(variant) / metric(full)`` (slimmability paper); :func:`mean_std`
and :func:`summarize_seeds` aggregate a metric over seeds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

__all__ = [
    "METRICS",
    "SeedSummary",
    "accuracy",
    "confusion_matrix",
    "macro_accuracy",
    "mean_iou",
    "mean_std",
    "multilabel_map",
    "retention",
    "summarize_seeds",
]

logger = logging.getLogger(__name__)


def _check_same_length(y_true: np.ndarray, y_other: np.ndarray, what: str) -> None:
    if len(y_true) != len(y_other):
        raise ValueError(
            f"{what}: y_true has {len(y_true)} samples but the prediction has {len(y_other)}"
        )
    if len(y_true) == 0:
        raise ValueError(f"{what}: no samples")


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Overall accuracy: the fraction of samples whose predicted class equals the label.

    Args:
        y_true: Integer labels, shape ``(N,)``.
        y_pred: Predicted integer labels, shape ``(N,)``.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: if the lengths differ or are zero.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    _check_same_length(y_true, y_pred, "accuracy")
    return float(skm.accuracy_score(y_true, y_pred))


def macro_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro (balanced) accuracy: the unweighted mean of per-class recall.

    Only classes present in ``y_true`` count (scikit-learn's ``balanced_accuracy_score``).

    Args:
        y_true: Integer labels, shape ``(N,)``.
        y_pred: Predicted integer labels, shape ``(N,)``.

    Returns:
        Macro accuracy in [0, 1].

    Raises:
        ValueError: if the lengths differ or are zero.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    _check_same_length(y_true, y_pred, "macro_accuracy")
    return float(skm.balanced_accuracy_score(y_true, y_pred))


def multilabel_map(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro mean average precision over labels (multi-label classification).

    Equals ``sklearn.metrics.average_precision_score(y_true, scores, average="macro")``. Labels
    with no positive sample in ``y_true`` have undefined AP and are left out of the mean
    (scikit-learn would warn and count them as 0); the number left out is logged.

    Args:
        y_true: Binary indicator matrix, shape ``(N, K)``.
        scores: Scores (probabilities or logits: only the ranking matters), shape ``(N, K)``.

    Returns:
        Macro mAP in [0, 1].

    Raises:
        ValueError: on shape mismatch, or if no label has a positive sample.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    if y_true.ndim != 2 or y_true.shape != scores.shape:
        raise ValueError(
            f"multilabel_map: y_true {y_true.shape} and scores {scores.shape} must both be (N, K)"
        )
    present = y_true.sum(axis=0) > 0
    if not present.any():
        raise ValueError("multilabel_map: no label has a positive sample; AP is undefined")
    if not present.all():
        logger.info("multilabel_map: %d label(s) without positives left out", (~present).sum())
    return float(
        skm.average_precision_score(y_true[:, present], scores[:, present], average="macro")
    )


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix ``C[i, j]`` = number of items of true class ``i`` predicted as ``j``.

    Args:
        y_true: Integer labels of any shape (flattened).
        y_pred: Predicted labels, same shape.
        num_classes: Number of classes ``K``; labels must lie in ``[0, K)``.

    Returns:
        ``(K, K)`` int64 matrix.

    Raises:
        ValueError: on shape mismatch or labels outside ``[0, K)``.
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    _check_same_length(y_true, y_pred, "confusion_matrix")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(
                f"confusion_matrix: {name} has labels in [{y.min()}, {y.max()}]; "
                f"valid labels are 0..{num_classes - 1}"
            )
    idx = y_true.astype(np.int64) * num_classes + y_pred.astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Segmentation mean intersection-over-union.

    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``, averaged over the classes that occur in the truth
    or the prediction (a class absent from both has undefined IoU and is skipped).

    Args:
        y_true: Integer label map(s), any shape.
        y_pred: Predicted label map(s), same shape.
        num_classes: Number of classes.

    Returns:
        mIoU in [0, 1].

    Raises:
        ValueError: on shape mismatch or labels outside ``[0, num_classes)``.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"mean_iou: y_true {y_true.shape} and y_pred {y_pred.shape} differ")
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    valid = union > 0
    return float(np.mean(tp[valid] / union[valid]))


#: Metric functions by name, as study YAML files name them.
METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "macro_accuracy": macro_accuracy,
    "map": multilabel_map,
    "miou": mean_iou,
}


def retention(variant: float, full: float) -> float:
    """Retention ``metric(variant) / metric(full)`` (slimmability paper, arXiv 2601.22841).

    Args:
        variant: Metric of the pruned or slimmed model.
        full: Metric of the full model, same task and protocol.

    Returns:
        The ratio (1.0 = nothing lost; it may exceed 1).

    Raises:
        ValueError: if ``full`` is not a positive finite number.
    """
    if not math.isfinite(full) or full <= 0:
        raise ValueError(f"retention: full-model metric must be positive and finite, got {full}")
    return float(variant) / float(full)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0.0 for a single value).

    Args:
        values: One metric value per seed.

    Returns:
        ``(mean, std)``.

    Raises:
        ValueError: for an empty sequence.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_std: no values")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


@dataclass(frozen=True)
class SeedSummary:
    """A metric over several seeds.

    Attributes:
        seeds: The seeds, in run order.
        values: The metric for each seed.
        mean: Mean over seeds.
        std: Sample standard deviation over seeds (``ddof=1``; 0.0 for one seed).
    """

    seeds: tuple[int, ...]
    values: tuple[float, ...]
    mean: float
    std: float


def summarize_seeds(fn: Callable[[int], float], seeds: Sequence[int]) -> SeedSummary:
    """Run ``fn(seed)`` for every seed and summarise.

    Args:
        fn: Returns the metric for one seed (e.g. a probe on a seeded few-shot split).
        seeds: Seeds to run, e.g. ``range(5)`` (the slimmability protocol uses 5).

    Returns:
        The :class:`SeedSummary`.

    Raises:
        ValueError: if ``seeds`` is empty.
    """
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("summarize_seeds: give at least one seed")
    values = tuple(float(fn(s)) for s in seeds)
    mean, std = mean_std(values)
    return SeedSummary(seeds, values, mean, std)
