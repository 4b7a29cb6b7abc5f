"""Frozen features, probes, short fine-tuning and task metrics (retention protocol).

See :mod:`.features` (extraction + cache), :mod:`.probes` (k-NN, linear, multi-label,
segmentation), :mod:`.finetune`, :mod:`.metrics` and :mod:`.stats` (bootstrap, binomial and
seed intervals).
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
from mapex_analysis.eval.stats import (
    bootstrap_interval,
    intervals_overlap,
    ratio_interval,
    seed_interval,
    wilson_interval,
)

__all__ = [
    "Features",
    "FinetuneResult",
    "ProbeResult",
    "SeedSummary",
    "SplitFeatures",
    "accuracy",
    "bootstrap_interval",
    "extract_features",
    "finetune",
    "intervals_overlap",
    "knn_multilabel_probe",
    "knn_probe",
    "linear_multilabel_probe",
    "linear_probe",
    "macro_accuracy",
    "mean_iou",
    "mean_std",
    "multilabel_map",
    "ratio_interval",
    "retention",
    "run_probe",
    "seed_interval",
    "segmentation_probe",
    "summarize_seeds",
    "wilson_interval",
]
