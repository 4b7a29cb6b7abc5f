"""Operators that make a foundation model smaller and record what they did.

* :func:`prune_experts`: modality-aware expert pruning of MAPEX models (keep the experts of
  the task's modalities);
* :func:`slim_width`: post-hoc uniform width slimming of any model built from timm blocks;
* :func:`apply_plan`: replay a recorded plan (checkpoint loading, studies);
* :class:`SlimmableNetwork` / :func:`sandwich_step`: shared-weight sub-networks at the widths
  ``slim_width`` builds, for slimmable (sandwich-rule) training.

Each returns a new, physically smaller model carrying ``applied_ops`` (JSON-able plans),
``model_spec`` and ``op_report`` (what was kept, per layer; see :mod:`.record`).
"""

from mapex_analysis.ops.plan import OPERATORS, apply_plan
from mapex_analysis.ops.prune import PRUNE_STRATEGIES, PrunePlan, prune_experts
from mapex_analysis.ops.slim import SLIM_MODES, SLIM_ORDERS, SLIM_WIDTHS, SlimPlan, slim_width
from mapex_analysis.ops.slimmable import SlimmableNetwork, sandwich_step, sandwich_widths

__all__ = [
    "OPERATORS",
    "PRUNE_STRATEGIES",
    "SLIM_MODES",
    "SLIM_ORDERS",
    "SLIM_WIDTHS",
    "PrunePlan",
    "SlimPlan",
    "SlimmableNetwork",
    "apply_plan",
    "prune_experts",
    "sandwich_step",
    "sandwich_widths",
    "slim_width",
]
