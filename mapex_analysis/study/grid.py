"""The study grid: variants (chains of operator plans), cells and their content-hashed ids.

Grid (per model label, with ``A`` the model's modalities and ``P`` each prune set):

* ``base`` fed ``A`` (the reference every retention and relative cost is taken against);
* ``base`` fed ``P`` (the full model restricted to a task's modalities; for dense and
  supervised models this is their per-modality row of the seed-style tables);
* ``prune[P]`` fed ``P`` (MAPEX models only);
* ``slim[s,mode,order]`` fed ``A`` (and fed ``P`` with ``slim.modality_sets``);
* ``prune[P]+slim[s,mode,order]`` fed ``P`` (prune-then-slim, ``slim.apply_to: [pruned]``).

Each (model, variant, modalities) has one *cost* cell (the ``cost`` measurements) and one
*eval* cell per (task, seed) (probes and the ``eval`` measurements). A cell's id hashes
everything that determines its rows, so a finished cell is never recomputed and a changed
config or checkpoint never reuses stale rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from mapex_analysis.models.contract import modalities_of
from mapex_analysis.ops.prune import PrunePlan
from mapex_analysis.ops.slim import SlimPlan, slim_signature, slimmable_modules
from mapex_analysis.options import DEFAULT_MODALITIES
from mapex_analysis.study.context import build_base, data_modalities
from mapex_analysis.study.measures import selected
from mapex_analysis.study.provenance import model_fingerprint
from mapex_analysis.study.schema import ModelConfig, Study

__all__ = [
    "Cell",
    "SlimKey",
    "Step",
    "Variant",
    "collapsed_widths",
    "distinct_widths",
    "plan_grid",
    "slim_key_of",
    "sorted_modalities",
    "step_key",
    "takes_subsets",
]

#: One operator of a variant: a pruning request (``kept_experts`` is decided when applied, from
#: calibration data) or a slimming plan.
Step = PrunePlan | SlimPlan


def step_key(step: Step) -> str:
    """``prune[sar]``, ``prune[sar,routing@0.95]`` or ``slim[0.25,attn+mlp,first]``."""
    if isinstance(step, PrunePlan):
        how = "" if step.strategy == "static" else f",routing@{step.coverage:g}"
        return f"prune[{'+'.join(step.modalities)}{how}]"
    return f"slim[{step.s:g},{step.mode},{step.order}]"


@dataclass(frozen=True, eq=False)
class Variant:
    """A chain of operator plans applied to a model, in order (empty: the base model).

    Attributes:
        steps: The plans.
    """

    steps: tuple[Step, ...] = ()

    @classmethod
    def of(
        cls,
        *,
        prune: tuple[str, ...] | None = None,
        strategy: str = "static",
        coverage: float = 0.99,
        width: float | None = None,
        mode: str = "attn+mlp",
        order: str = "first",
        seed: int = 0,
    ) -> Variant:
        """Prune-then-slim variant from keyword arguments (either part optional)."""
        steps: list[Step] = []
        if prune is not None:
            steps.append(PrunePlan(tuple(prune), strategy=strategy, coverage=coverage))
        if width is not None:
            steps.append(SlimPlan(width, mode=mode, order=order, seed=seed))
        return cls(tuple(steps))

    @property
    def key(self) -> str:
        """``base``, or the steps' keys joined by ``+`` (``prune[sar]+slim[0.5,mlp,first]``)."""
        return "+".join(step_key(s) for s in self.steps) or "base"

    @property
    def operator(self) -> str:
        """``none``, ``prune``, ``slim`` or ``prune+slim``."""
        names = ["prune" if isinstance(s, PrunePlan) else "slim" for s in self.steps]
        return "+".join(names) or "none"

    @property
    def prune(self) -> PrunePlan | None:
        """The pruning step, if any."""
        return next((s for s in self.steps if isinstance(s, PrunePlan)), None)

    @property
    def slim(self) -> SlimPlan | None:
        """The slimming step, if any."""
        return next((s for s in self.steps if isinstance(s, SlimPlan)), None)

    @property
    def kind(self) -> str:
        """``base``, ``prune`` (static), ``prune_routing``, ``slim`` or ``prune+slim`` (the
        names of ``finetune.variants``)."""
        p = self.prune
        if p is not None and self.slim is None and p.strategy != "static":
            return "prune_routing"
        return "base" if not self.steps else self.operator

    @property
    def width(self) -> float | None:
        """The slimming width, or ``None`` for an unslimmed variant."""
        return self.slim.s if self.slim is not None else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Variant) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


@dataclass(frozen=True)
class Cell:
    """One unit of work whose rows are written together.

    Attributes:
        kind: ``cost`` (the cost measurements) or ``eval`` (probes and feature measures).
        model: Model label.
        variant: The operator chain.
        modalities: Modalities fed.
        task: Task (``eval`` cells).
        seed: Seed (``eval`` cells).
    """

    kind: Literal["cost", "eval"]
    model: str
    variant: Variant
    modalities: tuple[str, ...]
    task: str = ""
    seed: int = -1

    def cell_id(self, study: Study) -> str:
        """Stable id from everything that determines the cell's rows."""
        cfg = study.models[self.model]
        payload = {
            "study": study.name,
            "kind": self.kind,
            "model": self.model,
            # which widths and operators a model gets decides which cells exist, not the rows
            # of this one (its variant key holds its own width), so adding widths reruns nothing
            "model_cfg": cfg.model_dump(
                mode="json",
                exclude={
                    "slim_widths",
                    "slim_set_widths",
                    "operators",
                    "protocols",
                    "compare_with",
                    "tasks",
                },  # fmt: skip
            ),
            "weights": model_fingerprint(cfg),
            "variant": self.variant.key,
            "slim_seed": study.operators.slim.seed if study.operators.slim else 0,
            "prune": study.operators.prune.model_dump(mode="json")
            if study.operators.prune
            else None,
            "modalities": list(self.modalities),
            "task": self.task,
            "seed": self.seed,
        }
        if self.kind == "eval":
            payload |= {
                "data": study.data.model_dump(mode="json"),
                "protocols": list(cfg.protocols or study.protocols),
                "knn_k": study.knn_k,
                "finetune": study.finetune.model_dump(mode="json"),
                "measure": sorted(selected(study.measurements, "eval")),
                "attribution_samples": study.attribution_samples,
            }
        else:
            payload |= {
                "measure": sorted(selected(study.measurements, "cost")),
                "slim_widths": cfg.slim_widths,
                "latency": study.latency.model_dump(mode="json"),
            }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    def describe(self) -> str:
        """One line for progress bars and the dry-run listing."""
        where = f" {self.task} seed {self.seed}" if self.kind == "eval" else ""
        return f"{self.kind:4s} {self.model} {self.variant.key} @{'+'.join(self.modalities)}{where}"


def sorted_modalities(declared: tuple[str, ...]) -> tuple[str, ...]:
    """A model's modalities in the default modality order, then the others in their order
    (``coastal``, ``atmospheric``)."""
    return tuple(m for m in DEFAULT_MODALITIES if m in declared) + tuple(
        m for m in declared if m not in DEFAULT_MODALITIES
    )


def takes_subsets(model: Any) -> bool:
    """Whether a model can be fed a subset of its modalities (not so for a fixed-band adapter
    without a fill policy: a 13-band model fed RGB alone lacks ten bands)."""
    return bool(getattr(model, "variable_bands", True)) or getattr(model, "fill", None) is not None


#: ``key(s, mode) -> hashable``: what a slimmed model at width ``s`` keeps (two widths with
#: the same key give the same model; :func:`mapex_analysis.ops.slim.slim_signature`).
SlimKey = Callable[[float, str], Hashable]


def slim_key_of(model: nn.Module) -> SlimKey | None:
    """The :data:`SlimKey` of a model, or ``None`` when it has nothing :func:`slim_width`
    narrows (then no width is collapsed)."""
    if not any(slimmable_modules(model)):
        return None
    return functools.partial(slim_signature, model)


def distinct_widths(
    widths: list[float], mode: str, order: str, key: SlimKey | None
) -> tuple[list[float], dict[float, float]]:
    """The widths that give distinct slimmed models (and differ from the full model), and for
    each dropped width the kept width it duplicates (``1.0``: the full model itself).

    Only deterministic orders collapse (``random`` draws per width); without ``key`` nothing
    does.
    """
    if key is None or order == "random":
        return list(widths), {}
    seen = {key(1.0, mode): 1.0}
    dropped: dict[float, float] = {}
    for w in sorted(widths, reverse=True):
        k = key(w, mode)
        if k in seen:
            dropped[w] = seen[k]
        else:
            seen[k] = w
    return [w for w in widths if w not in dropped], dropped


def collapsed_widths(
    study: Study, slim_keys: dict[str, SlimKey | None]
) -> dict[str, dict[str, dict[str, float]]]:
    """Per model and slimming ``mode,order``: each width of its grids that was not planned
    because a wider one (or the full model, ``1.0``) gives the same model -> that width."""
    slim = study.operators.slim
    out: dict[str, dict[str, dict[str, float]]] = {}
    if slim is None:
        return out
    for label, cfg in study.models.items():
        if "slim" not in cfg.operators:
            continue
        ws = set(slim.width_list(override=cfg.slim_widths)) | set(cfg.slim_set_widths or [])
        ws |= set(slim.width_list(pruned=True))
        for mode in slim.modes:
            for order in slim.orders:
                _, dropped = distinct_widths(sorted(w for w in ws if w < 1.0), mode, order,
                                             slim_keys.get(label))  # fmt: skip
                if dropped:
                    out.setdefault(label, {})[f"{mode},{order}"] = {
                        f"{w:g}": rep for w, rep in sorted(dropped.items())
                    }
    return out


def _variants(
    study: Study,
    cfg: ModelConfig,
    mods: tuple[str, ...],
    subsets: bool = True,
    slim_key: SlimKey | None = None,
) -> list[tuple[Variant, tuple]]:
    out: list[tuple[Variant, tuple[str, ...]]] = [(Variant(), mods)]
    prune = study.operators.prune if "prune" in cfg.operators else None
    slim = study.operators.slim if "slim" in cfg.operators else None
    slim_seed = study.operators.slim.seed if study.operators.slim else 0
    # Input-restricted references exist for every prune set, even where pruning does not apply
    # (but not for models that cannot be fed a subset of their inputs).
    sets = (
        study.operators.prune.expanded(mods)
        if study.operators.prune is not None and subsets
        else []
    )
    sets = [s for s in sets if s != mods]
    plans = prune.plans() if prune is not None else []
    default_cov = prune.coverage if prune is not None else 0.99

    def pruned(s: tuple[str, ...], strategy: str, coverage: float | None) -> PrunePlan:
        return PrunePlan(
            s, strategy=strategy, coverage=default_cov if coverage is None else coverage
        )

    for s in sets:
        out.append((Variant(), s))
        if prune is not None and cfg.role == "mapex":
            out += [(Variant((pruned(s, st, c),)), s) for st, c in plans]
    if slim is not None:
        # widths on all the model's modalities, and widths on each prune set's modalities
        # (``modality_sets`` repeats the former there; ``slim_set_widths`` adds its own)
        base_widths = (
            [w for w in slim.width_list(override=cfg.slim_widths) if w < 1.0]
            if "base" in slim.apply_to
            else []
        )
        set_widths = list(base_widths) if slim.modality_sets else []
        set_widths += [w for w in cfg.slim_set_widths or [] if w < 1.0 and w not in set_widths]
        pruned_widths = (
            [w for w in slim.width_list(pruned=True) if w < 1.0]
            if "pruned" in slim.apply_to and prune is not None and cfg.role == "mapex"
            else []
        )
        for mode in slim.modes:
            for order in slim.orders:

                def slimmed(w: float, mode: str = mode, order: str = order) -> SlimPlan:
                    return SlimPlan(w, mode=mode, order=order, seed=slim_seed)

                def distinct(ws: list[float], mode: str = mode, order: str = order) -> list:
                    return distinct_widths(ws, mode, order, slim_key)[0]

                out += [(Variant((slimmed(w),)), mods) for w in distinct(base_widths)]
                out += [(Variant((slimmed(w),)), s) for w in distinct(set_widths) for s in sets]
                st0, c0 = plans[0] if plans else ("static", None)
                out += [(Variant((pruned(s, st0, c0), slimmed(w))), s)
                        for w in distinct(pruned_widths) for s in sets]  # fmt: skip
    return out


def plan_grid(
    study: Study,
    modalities: dict[str, tuple[str, ...]] | None = None,
    subsets: dict[str, bool] | None = None,
    slim_keys: dict[str, SlimKey | None] | None = None,
) -> list[Cell]:
    """Every cell of the study, cost cells first, in a stable order.

    Slimming widths that give the same model as a wider width of the same grid (the same
    kept dims per head and MLP units: :func:`distinct_widths`) are planned once, at the widest.

    Args:
        study: The validated study.
        modalities: Model label -> its modalities; default: read from each built model and
            restricted to those the study's data carries (a MAPEX model on EuroSAT is fed its
            four Sentinel-2 modalities).
        subsets: Model label -> whether it can be fed a subset of its modalities
            (:func:`takes_subsets`); default: read from each built model.
        slim_keys: Model label -> its :data:`SlimKey` (:func:`slim_key_of`); default: from
            each model this function builds (none: no width collapsed).

    Returns:
        The cells.
    """
    declared = dict(modalities or {})
    partial = dict(subsets or {})
    keys = dict(slim_keys or {})
    carried = data_modalities(study)
    fed_by: dict[str, tuple[str, ...]] = {}
    for label, cfg in study.models.items():
        if label not in declared or label not in partial:
            built = build_base(cfg)
            declared.setdefault(label, sorted_modalities(modalities_of(built)))
            partial.setdefault(label, takes_subsets(built))
            keys.setdefault(label, slim_key_of(built))
        fed = tuple(m for m in declared[label] if m in carried)
        if not fed:
            raise ValueError(
                f"models.{label}: {cfg.source} takes modalities {', '.join(declared[label])}, "
                f"none of which data.source {study.data.source} carries ({', '.join(carried)})"
            )
        fed_by[label] = fed
    want_cost = bool(selected(study.measurements, "cost"))
    cost: list[Cell] = []
    evals: list[Cell] = []
    for label, cfg in study.models.items():
        for variant, mods in _variants(study, cfg, fed_by[label], partial[label],
                                       keys.get(label)):  # fmt: skip
            if want_cost:
                cost.append(Cell("cost", label, variant, mods))
            if not (cfg.protocols or study.protocols):
                continue  # cost only
            for task in cfg.tasks or study.tasks:
                for seed in study.seeds:
                    evals.append(Cell("eval", label, variant, mods, task, seed))
    return cost + evals
