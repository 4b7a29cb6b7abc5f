"""Closed option sets, defined once, free of heavy dependencies.

The study schema validates YAML against these ``Literal`` types without importing torch; the
operators, models and data modules import the same names, so a value the schema accepts is a
value the code runs. Each ``Literal`` has a tuple of its values for messages and loops.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "DEFAULT_MODALITIES",
    "DEVICE_PATTERN",
    "FILL_POLICIES",
    "Precision",
    "OPERATORS",
    "POOLS",
    "PROTOCOLS",
    "PRUNE_STRATEGIES",
    "ROLES",
    "ROUTERS",
    "SLIM_MODES",
    "SLIM_ORDERS",
    "SLIM_TARGETS",
    "SLIM_WIDTHS",
    "FillPolicy",
    "Operator",
    "Pool",
    "Protocol",
    "PruneStrategy",
    "Role",
    "Router",
    "SlimMode",
    "SlimOrder",
    "SlimTarget",
]

#: The six default modality groups, in model order (their bands: :mod:`mapex_analysis.modalities`).
DEFAULT_MODALITIES: tuple[str, ...] = ("rgb", "red_edge", "nir", "swir", "sar", "ele")

Operator = Literal["prune", "slim"]
#: The operators a study composes: modality-aware expert pruning, post-hoc width slimming.
OPERATORS: tuple[str, ...] = get_args(Operator)

PruneStrategy = Literal["static", "routing"]
#: ``static``: keep the task modalities' expert groups; ``routing``: keep the experts that carry
#: a coverage share of calibration traffic.
PRUNE_STRATEGIES: tuple[str, ...] = get_args(PruneStrategy)

SlimMode = Literal["attn+mlp", "attn", "mlp"]
#: Which sub-layers are slimmed: attention only, MLP only, or both.
SLIM_MODES: tuple[str, ...] = get_args(SlimMode)

SlimOrder = Literal["first", "last", "random", "magnitude"]
#: Which dims are kept: the first ones (the paper), the last ones, a seeded random subset, or
#: the ones with the largest weight norms.
SLIM_ORDERS: tuple[str, ...] = get_args(SlimOrder)

SlimTarget = Literal["base", "pruned"]
#: What a study slims: the base model, the pruned models, or both.
SLIM_TARGETS: tuple[str, ...] = get_args(SlimTarget)

_MANTISSAS = (1.0, 2.0, 2.5, 3.33, 4.0, 5.0, 6.0, 6.67, 7.5, 8.0)
#: The slimmability paper's 31-width grid: {1, 2, 2.5, 3.33, 4, 5, 6, 6.67, 7.5, 8} x 10^-3,
#: 10^-2, 10^-1, plus 1.0, ascending.
SLIM_WIDTHS: tuple[float, ...] = tuple(
    sorted({round(m * 10.0**e, 6) for m in _MANTISSAS for e in (-3, -2, -1)} | {1.0})
)

Router = Literal["deterministic", "pos_embed", "modality"]
#: MAPEX router kinds (see :mod:`mapex_analysis.models.moe`).
ROUTERS: tuple[str, ...] = get_args(Router)

Protocol = Literal["knn", "linear", "finetune"]
#: Evaluation protocols: frozen-feature k-NN and linear probes, short fine-tuning.
PROTOCOLS: tuple[str, ...] = get_args(Protocol)

Role = Literal["mapex", "dense", "supervised"]
#: What a study model stands for in the tables.
ROLES: tuple[str, ...] = get_args(Role)

Pool = Literal["cls", "mean"]
#: How a model pools its tokens into one feature vector: the CLS token or the patch-token mean.
POOLS: tuple[str, ...] = get_args(Pool)

FillPolicy = Literal["zeros", "mean"]
#: How an adapter may fill bands the data lacks when the caller asks (``None``: an error).
FILL_POLICIES: tuple[str, ...] = get_args(FillPolicy)

#: Device strings of studies and ``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
DEVICE_PATTERN = r"auto|cpu|cuda(?::(\d+))?"

#: Numeric precision of feature extraction (``bf16`` / ``fp16``: autocast).
Precision = Literal["fp32", "bf16", "fp16"]
