"""Modality-aware expert pruning of MAPEX models.

MAPEX (Hanna, Scheibenreif, Borth; arXiv 2507.07527) pretrains a mixture-of-modality-experts
ViT and, for a task that only has some modalities, keeps only the experts specialised for
them. :func:`prune_experts` returns a new, physically smaller model for a modality subset:

* ``static``: keep, in every MoE layer, the routed experts whose group
  (``MoEMLP.expert_groups``) is a kept modality, plus all shared experts;
* ``routing``: run calibration batches of the kept modalities and keep, per layer, the smallest
  set of routed experts that carries ``coverage`` of those modalities' routing assignments
  (experts ranked by assignment count; ties go to the lower index).

The patch embeddings and modality embeddings of dropped modalities go, and so do the dropped
experts with their router rows (``router.proj`` rows and the modality router's prior entries;
the priors of dropped modalities go entirely). Removing an expert is exactly masking its router logit to ``-inf`` before
the top-k. A selected expert's gate depends only on its own logit (``sigmoid`` for the learned
routers, ``1`` for the deterministic one; see :mod:`mapex_analysis.models.moe`), so removing
experts that no token selected leaves every output unchanged: if no calibration token reached
a removed expert, the outputs on those calibration batches are unchanged.
``traffic_to_removed`` reports, per layer and overall, the share of calibration routing
assignments that went to removed experts.

Planning is data (:class:`PrunePlan`, JSON-able, with the kept experts per layer so a
checkpoint replays it exactly); the surgery is :func:`apply_prune_plan`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from mapex_analysis.modalities import ModalityError
from mapex_analysis.models.contract import modalities_of, moe_layers, num_params
from mapex_analysis.ops.record import record_op
from mapex_analysis.options import PRUNE_STRATEGIES, PruneStrategy

__all__ = [
    "PRUNE_STRATEGIES",
    "PrunePlan",
    "PruneStrategy",
    "apply_prune_plan",
    "calibration_counts",
    "moe_layers",
    "prune_experts",
]

logger = logging.getLogger(__name__)


def _check_moe(model: nn.Module) -> dict[str, Any]:
    layers = moe_layers(model)
    if not layers:
        raise TypeError(
            f"{type(model).__name__} has no mixture-of-experts layer (MoEMLP in model.blocks); "
            "prune_experts works on MAPEX models (e.g. mapex_tiny); use slim_width for dense "
            "models"
        )
    return layers


def _check_modalities(model: nn.Module, modalities: Sequence[str] | str) -> tuple[str, ...]:
    """Validate a modality subset; return it in the model's token order."""
    own = modalities_of(model)
    if isinstance(modalities, str):
        modalities = [modalities]
    wanted = list(modalities)
    if not wanted:
        raise ModalityError(f"empty modality list; prune to a non-empty subset of {', '.join(own)}")
    bad = [m for m in wanted if m not in own]
    if bad:
        raise ModalityError(
            f"{type(model).__name__} has no modality {', '.join(map(repr, bad))}; "
            f"valid modalities: {', '.join(own)}"
        )
    return tuple(m for m in own if m in wanted)


def _check_coverage(coverage: Any) -> float:
    if (
        isinstance(coverage, bool)
        or not isinstance(coverage, int | float)
        or not math.isfinite(coverage)
        or not 0.0 < coverage <= 1.0
    ):
        raise ValueError(f"coverage must be a share in (0, 1], got {coverage!r}")
    return float(coverage)


@dataclass(frozen=True)
class PrunePlan:
    """An expert-pruning plan: what :func:`prune_experts` did, as data.

    Attributes:
        modalities: Kept modalities, in the model's token order.
        strategy: ``static`` or ``routing``.
        coverage: Routed-traffic share the ``routing`` strategy keeps.
        kept_experts: ``{"blocks.<i>.mlp": [kept routed expert indices]}`` (indices into
            that layer's experts before pruning).
    """

    modalities: tuple[str, ...]
    strategy: str = "static"
    coverage: float = 0.99
    kept_experts: dict[str, list[int]] = field(default_factory=dict)

    op: ClassVar[str] = "prune_experts"

    def __post_init__(self) -> None:
        if self.strategy not in PRUNE_STRATEGIES:
            raise ValueError(
                f"unknown pruning strategy {self.strategy!r}; valid strategies: "
                f"{list(PRUNE_STRATEGIES)}"
            )
        object.__setattr__(self, "coverage", _check_coverage(self.coverage))
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if not self.modalities:
            raise ModalityError("a pruning plan needs at least one kept modality")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able plan recorded in ``model.applied_ops`` and checkpoint specs."""
        return {
            "op": self.op,
            "modalities": list(self.modalities),
            "strategy": self.strategy,
            "coverage": self.coverage,
            "kept_experts": {k: list(v) for k, v in self.kept_experts.items()},
        }

    @classmethod
    def from_dict(cls, plan: Mapping[str, Any]) -> PrunePlan:
        """Rebuild a plan written by :meth:`to_dict`.

        Args:
            plan: ``{"op": "prune_experts", "modalities", "strategy", "coverage",
                "kept_experts"}``.

        Returns:
            The validated plan.

        Raises:
            ValueError: for another operator, missing or unknown keys, or invalid values.
        """
        if plan.get("op") != cls.op:
            raise ValueError(f"not a {cls.op} plan: op={plan.get('op')!r}")
        valid = {"op", "modalities", "strategy", "coverage", "kept_experts"}
        unknown = sorted(set(plan) - valid)
        if unknown:
            raise ValueError(
                f"unknown keys {unknown} in {cls.op} plan; valid keys: {sorted(valid)}"
            )
        missing = sorted({"modalities", "kept_experts"} - set(plan))
        if missing:
            raise ValueError(f"{cls.op} plan lacks {missing}: {dict(plan)}")
        kept = {str(k): [int(i) for i in v] for k, v in dict(plan["kept_experts"]).items()}
        return cls(
            modalities=tuple(plan["modalities"]),
            strategy=plan.get("strategy", "static"),
            coverage=plan.get("coverage", 0.99),
            kept_experts=kept,
        )


# --------------------------------------------------------------------------------------------
# calibration


def calibration_counts(
    model: nn.Module,
    calibration: Iterable[Mapping[str, Tensor]] | Mapping[str, Tensor],
    modalities: Sequence[str],
) -> dict[str, Tensor]:
    """Routing assignments of the given modalities' tokens per MoE layer and routed expert.

    Each calibration batch is restricted to ``modalities`` (other keys, such as ``label``,
    are ignored), as a task with only those modalities would feed the model, and run through
    ``model.forward_features(..., return_routing=True)`` in eval mode without gradients.

    Args:
        model: A MAPEX model.
        calibration: Batches ``{modality: (B, C, H, W)}`` in physical units (a single
            batch dict is taken as one batch).
        modalities: The modalities whose tokens are counted.

    Returns:
        ``{"blocks.<i>.mlp": (E,) LongTensor}``: number of tokens whose top-k included each
        routed expert, summed over the batches.

    Raises:
        ValueError: if ``calibration`` yields no batch, a batch that is not a modality dict,
            or a batch that lacks one of the modalities (named).
    """
    batches: Iterable[Any] = [calibration] if isinstance(calibration, Mapping) else calibration
    layers = _check_moe(model)
    index = {int(name.split(".")[1]): name for name in layers}
    totals = {name: torch.zeros(moe.num_experts, dtype=torch.long) for name, moe in layers.items()}
    encoder: Any = model  # the token-model contract (forward_features with routing)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, Mapping):
                    raise ValueError(
                        "a calibration batch is a modality dict {modality: (B, C, H, W)}, "
                        f"got {type(batch).__name__}"
                    )
                missing = [m for m in modalities if m not in batch]
                if missing:
                    raise ValueError(
                        f"calibration batch {n_batches} lacks the pruned-to modalities "
                        f"{missing} (kept: {list(modalities)}); it holds {sorted(batch)}"
                    )
                x = {m: batch[m].to(device) for m in modalities}
                _, info = encoder.forward_features(x, return_routing=True)
                for i, stats in enumerate(info.stats):
                    if i not in index or stats is None:
                        continue
                    rows = [r for r, m in enumerate(stats.modalities) if m in modalities]
                    totals[index[i]] += stats.counts[rows].sum(dim=0).cpu()
                n_batches += 1
    finally:
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration yielded no batch; pass an iterable of modality dicts")
    return totals


def _coverage_set(counts: Tensor, coverage: float) -> list[int]:
    """Smallest expert set carrying ``coverage`` of the assignments (ties: lower index)."""
    total = int(counts.sum())
    if total == 0:
        return []
    order = torch.argsort(-counts, stable=True).tolist()
    kept, carried = [], 0
    for e in order:
        if carried >= coverage * total or int(counts[e]) == 0:
            break
        kept.append(int(e))
        carried += int(counts[e])
    return sorted(kept)


# --------------------------------------------------------------------------------------------
# surgery


def _slice_rows(layer: nn.Linear, idx: list[int]) -> nn.Linear:
    rows = torch.tensor(idx, dtype=torch.long, device=layer.weight.device)
    # type(layer): the router's RouterProj stays a RouterProj (same parameters, faster layout)
    new = type(layer)(layer.in_features, len(idx), bias=layer.bias is not None, device="meta")
    new.weight = nn.Parameter(
        layer.weight.detach().index_select(0, rows).clone(),
        requires_grad=layer.weight.requires_grad,
    )
    if layer.bias is not None:
        new.bias = nn.Parameter(
            layer.bias.detach().index_select(0, rows).clone(),
            requires_grad=layer.bias.requires_grad,
        )
    new.train(layer.training)
    return new


def _prune_layer(moe: Any, kept: list[int], modalities: Sequence[str]) -> None:
    """Keep the routed experts ``kept`` of one MoEMLP (in place) and drop router state of
    modalities that are no longer fed."""
    moe.experts = nn.ModuleList(moe.experts[i] for i in kept)
    moe.expert_groups = [moe.expert_groups[i] for i in kept]
    moe.router.proj = _slice_rows(moe.router.proj, kept)
    cols = torch.tensor(kept, dtype=torch.long)
    for m in list(moe.router.prior.keys()):
        if m not in modalities:
            del moe.router.prior[m]
        else:
            old = moe.router.prior[m]
            moe.router.prior[m] = nn.Parameter(
                old.detach().index_select(0, cols.to(old.device)).clone(),
                requires_grad=old.requires_grad,
            )


def apply_prune_plan(
    model: nn.Module, plan: PrunePlan, *, counts: Mapping[str, Tensor] | None = None
) -> nn.Module:
    """Apply a :class:`PrunePlan` to a copy of ``model``.

    Args:
        model: A MAPEX model with the plan's layers.
        plan: The plan (its ``kept_experts`` name every MoE layer).
        counts: Calibration assignment counts per layer (from :func:`calibration_counts`),
            to report ``traffic_to_removed``; ``None`` reports it as ``None``.

    Returns:
        The pruned model, carrying ``applied_ops``, ``model_spec`` and ``op_report``.

    Raises:
        TypeError: if the model has no MoE layer.
        ModalityError: if the plan keeps a modality the model lacks.
        ValueError: if the plan's layers or expert indices do not match the model.
    """
    layers = _check_moe(model)
    mods = _check_modalities(model, plan.modalities)
    if set(plan.kept_experts) != set(layers):
        raise ValueError(
            f"plan names MoE layers {sorted(plan.kept_experts)}, the model has {sorted(layers)}"
        )
    for name, kept in plan.kept_experts.items():
        n = layers[name].num_experts
        bad = [i for i in kept if not 0 <= i < n]
        if bad or len(set(kept)) != len(kept):
            raise ValueError(
                f"{name}: kept experts {kept} must be distinct indices in [0, {n}); bad: {bad}"
            )
    out: Any = copy.deepcopy(model)  # a token model: patch_embed / modality_embed dicts
    params_before = num_params(model)
    dropped = [m for m in modalities_of(model) if m not in mods]
    for m in dropped:
        del out.patch_embed[m]
        del out.modality_embed[m]
    out_layers = moe_layers(out)
    report_layers: list[dict[str, Any]] = []
    removed_total, assigned_total = 0, 0
    for name, moe in out_layers.items():
        kept = sorted(plan.kept_experts[name])
        groups = list(moe.expert_groups)
        removed = [i for i in range(len(groups)) if i not in kept]
        row: dict[str, Any] = {
            "module": name,
            "experts_before": len(groups),
            "kept": kept,
            "kept_groups": [groups[i] for i in kept],
            "removed": removed,
            "removed_groups": [groups[i] for i in removed],
            "shared_experts": len(moe.shared_experts),
        }
        if counts is not None:
            c = counts[name]
            assigned, to_removed = int(c.sum()), int(c[removed].sum()) if removed else 0
            row["calibration_counts"] = [int(v) for v in c]
            row["traffic_to_removed"] = to_removed / assigned if assigned else 0.0
            removed_total += to_removed
            assigned_total += assigned
        report_layers.append(row)
        _prune_layer(moe, kept, mods)
    traffic: dict[str, Any] | None = None
    if counts is not None:
        traffic = {
            "overall": removed_total / assigned_total if assigned_total else 0.0,
            "per_layer": {r["module"]: r["traffic_to_removed"] for r in report_layers},
            "assignments": assigned_total,
        }
    report = {
        **plan.to_dict(),
        "dropped_modalities": dropped,
        "params_before": params_before,
        "params_after": num_params(out),
        "traffic_to_removed": traffic,
        "layers": report_layers,
    }
    record_op(model, out, plan.to_dict(), report)
    logger.info(
        "prune_experts %s to %s: params %d -> %d, traffic to removed experts %s",
        plan.strategy,
        list(mods),
        params_before,
        report["params_after"],
        "n/a" if traffic is None else f"{traffic['overall']:.4f}",
    )
    return out


def prune_experts(
    model: nn.Module,
    modalities: Sequence[str] | str,
    *,
    strategy: str = "static",
    calibration: Iterable[Mapping[str, Tensor]] | Mapping[str, Tensor] | None = None,
    coverage: float = 0.99,
) -> nn.Module:
    """Prune a MAPEX model to the experts a modality subset needs.

    Args:
        model: A MAPEX model (token model whose blocks hold ``MoEMLP`` layers).
        modalities: Modalities the task has (a name or a list), a non-empty subset of
            ``model.modalities``.
        strategy: ``"static"``: keep the routed experts of those modalities' groups and the
            shared experts. ``"routing"``: keep per layer the smallest routed-expert set
            carrying ``coverage`` of the modalities' routing assignments on ``calibration``
            (shared experts always stay).
        calibration: Iterable of modality batches ``{modality: (B, C, H, W)}`` (physical
            units; other modalities and ``label`` are ignored), or a single such batch. Required for ``routing``;
            with ``static`` it is optional and only used to report ``traffic_to_removed``.
        coverage: Share in (0, 1] of the routed assignments the ``routing`` strategy keeps.

    Returns:
        A new, smaller model: dropped modalities lose their patch and modality embeddings
        (and router priors), removed experts their MLPs and router rows. It carries
        ``applied_ops`` (source ops plus this :class:`PrunePlan`), ``model_spec`` and
        ``op_report`` (kept/removed experts and their groups per layer, parameters before
        and after, and ``traffic_to_removed`` = ``{"overall", "per_layer", "assignments"}``
        shares of calibration assignments that went to removed experts, ``None`` without
        calibration).

    Raises:
        TypeError: if the model has no mixture-of-experts layer (names the model class).
        ModalityError: (a ``ValueError``) for an empty modality list or a modality the model
            lacks (lists the valid ones).
        ValueError: for an unknown strategy, ``coverage`` outside (0, 1], ``routing``
            without calibration, or calibration without usable batches.
    """
    layers = _check_moe(model)
    mods = _check_modalities(model, modalities)
    if strategy not in PRUNE_STRATEGIES:
        raise ValueError(
            f"unknown pruning strategy {strategy!r}; valid strategies: {list(PRUNE_STRATEGIES)}"
        )
    coverage = _check_coverage(coverage)
    if strategy == "routing" and calibration is None:
        raise ValueError("strategy 'routing' needs calibration batches (calibration=None)")
    counts = calibration_counts(model, calibration, mods) if calibration is not None else None
    kept: dict[str, list[int]] = {}
    for name, moe in layers.items():
        if strategy == "static":
            kept[name] = [i for i, g in enumerate(moe.expert_groups) if g in mods]
        else:
            kept[name] = _coverage_set(cast(dict[str, Tensor], counts)[name], coverage)
    plan = PrunePlan(modalities=mods, strategy=strategy, coverage=coverage, kept_experts=kept)
    return apply_prune_plan(model, plan, counts=counts)
