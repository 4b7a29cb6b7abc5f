"""Frozen features, probes, short fine-tuning and task metrics (retention protocol).

See :mod:`.features` (extraction + cache), :mod:`.probes` (k-NN, linear, multi-label,
segmentation), :mod:`.finetune` and :mod:`.metrics`.
"""

from mapex_analysis.eval.features import Features, SplitFeatures, extract_features
from mapex_analysis.eval.finetune import FinetuneResult, finetune
from mapex_analysis.eval.metrics import (
    SeedSummary,
    accuracy,
    macro_accuracy,
    mean_iou,
    mean_std,
    multilabel_map,
    retention,
    summarize_seeds,
)
from mapex_analysis.eval.probes import (
    ProbeResult,
    knn_multilabel_probe,
    knn_probe,
    linear_multilabel_probe,
    linear_probe,
    run_probe,
    segmentation_probe,
)

__all__ = [
    "Features",
    "FinetuneResult",
    "ProbeResult",
    "SeedSummary",
    "SplitFeatures",
    "accuracy",
    "extract_features",
    "finetune",
    "knn_multilabel_probe",
    "knn_probe",
    "linear_multilabel_probe",
    "linear_probe",
    "macro_accuracy",
    "mean_iou",
    "mean_std",
    "multilabel_map",
    "retention",
    "run_probe",
    "segmentation_probe",
    "summarize_seeds",
]
