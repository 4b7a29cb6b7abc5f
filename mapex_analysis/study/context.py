"""What the cells of one study share inside a process: built models, their variants, data.

A :class:`StudyContext` builds each base model once, applies a variant's operator plans once
(the last few variants are kept, least recently used first out) and generates each task split
once; cells in the serial loop and on a Dask worker read from it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from mapex_analysis.data import SynthEO
from mapex_analysis.data.materialize import EmptySourceError, SourceSplit, load_split
from mapex_analysis.data.sources import SOURCES
from mapex_analysis.device import device_name, resolve_device
from mapex_analysis.factory import create_model
from mapex_analysis.modalities import MODALITIES
from mapex_analysis.ops.prune import PrunePlan, prune_experts
from mapex_analysis.ops.slim import slim_width
from mapex_analysis.options import DEFAULT_MODALITIES
from mapex_analysis.study.schema import ModelConfig, Study

__all__ = ["StudyContext", "build_base", "data_modalities", "seed_everything"]

#: Variant models kept per process (a pruned ``mapex_base`` is hundreds of MB).
VARIANT_CACHE = 8
#: Pruned models kept per process as starting points of prune-then-slim variants.
PRUNED_CACHE = 2
#: Task splits kept per process (every split of 4 tasks x 3 seeds: cells cycle through them).
DATA_CACHE = 32


def seed_everything(seed: int) -> None:
    """Seed model init and torch-side randomness (probes and data take explicit seeds)."""
    torch.manual_seed(seed)


def build_base(cfg: ModelConfig) -> nn.Module:
    """The unmodified model of a study entry (seeded random init for registry names, then the
    entry's ``weights`` file loaded strictly when given).

    Args:
        cfg: The model entry.

    Returns:
        The model in eval mode.
    """
    if cfg.is_checkpoint:
        model = create_model(cfg.source)
    else:
        kwargs = dict(cfg.kwargs)
        if cfg.router is not None:
            kwargs.setdefault("router", cfg.router)
        seed_everything(cfg.init_seed)
        model = create_model(cfg.source, weights=cfg.weights, **kwargs)
    return model.eval()


def data_modalities(study: Study) -> tuple[str, ...]:
    """The modalities the study's data carries: SynthEO's six, or every registered modality a
    real source's bands fully cover (EuroSAT: the six Sentinel-2 groups; MMFlood: sar, ele).
    A cost-only study (``protocols: []``) reads no data: every registered modality."""
    if not study.protocols:
        return tuple(MODALITIES)
    if not study.data.is_real:
        return DEFAULT_MODALITIES
    return SOURCES[study.data.source].covered_modalities()


class StudyContext:
    """Models, variants and data of one study, built on first use and cached.

    Args:
        study: The validated study.
    """

    def __init__(self, study: Study) -> None:
        self.study = study
        self.device = resolve_device(study.device)
        self.device_name = device_name(self.device)
        self.study_dir = study.study_dir
        self.base = functools.cache(self._build_base)
        self._steps: dict[str, tuple[Any, ...]] = {}
        self._variants = functools.lru_cache(maxsize=VARIANT_CACHE)(self._build_variant)
        self._pruned = functools.lru_cache(maxsize=PRUNED_CACHE)(self._build_pruned)
        self._prune_plans: dict[tuple[str, str, float], PrunePlan] = {}
        self.dataset = functools.lru_cache(maxsize=DATA_CACHE)(self._build_dataset)

    def _build_base(self, label: str) -> nn.Module:
        return build_base(self.study.models[label]).to(self.device)

    def model(self, label: str, variant: Any) -> nn.Module:
        """The model of ``label`` with ``variant``'s operator plans applied, in eval mode."""
        self._steps[variant.key] = variant.steps  # plans are not hashable; their key is
        return self._variants(label, variant.key)

    def _build_variant(self, label: str, key: str) -> nn.Module:
        steps = self._steps[key]
        model = self.base(label)
        if steps and isinstance(steps[0], PrunePlan) and len(steps) > 1:
            # prune-then-slim: every width of one prune set starts from the same pruned model
            # (pruned and calibrated once, kept in a small cache of its own)
            p = steps[0]
            pkey = ("+".join(p.modalities), p.strategy, float(p.coverage))
            self._prune_plans[pkey] = p
            model, steps = self._pruned(label, pkey), steps[1:]
        for step in steps:
            if isinstance(step, PrunePlan):
                model = self._prune(model, step)
            else:
                model = slim_width(model, step.s, mode=step.mode, order=step.order,  # type: ignore[arg-type]
                                   seed=step.seed)  # fmt: skip
        return model.to(self.device).eval()  # new sub-modules join the study's device

    def _build_pruned(self, label: str, pkey: tuple[str, str, float]) -> nn.Module:
        return self._prune(self.base(label), self._prune_plans[pkey])

    def _prune(self, model: nn.Module, step: PrunePlan) -> nn.Module:
        """Prune with calibration data always given (the first task's ``train`` split, seed
        of the first study seed), so every pruned model reports ``traffic_to_removed``."""
        cfg = self.study.operators.prune
        assert cfg is not None  # a prune step exists only with a prune config
        mods = step.modalities
        # a cost-only study has no task: SynthEO land cover calibrates its pruned models
        task = self.study.tasks[0] if self.study.tasks else "landcover"
        arrays = self.dataset(task, self.study.seeds[0], "train").arrays()
        n, bs = cfg.calibration_samples, self.study.data.batch_size
        calibration = [
            {m: torch.as_tensor(arrays[m][i : min(i + bs, n)]).to(self.device) for m in mods}
            for i in range(0, min(n, len(arrays[mods[0]])), bs)
        ]
        return prune_experts(model, list(mods), strategy=step.strategy,  # type: ignore[arg-type]
                             calibration=calibration, coverage=step.coverage)  # fmt: skip

    def _build_dataset(self, task: str, seed: int, split: str) -> SynthEO | SourceSplit:
        d = self.study.data
        if d.is_real:
            assert d.root is not None  # validated
            try:
                return load_split(
                    d.source,
                    d.root,
                    d.splits[split],  # type: ignore[index]
                    n=d.n(split),
                    seed=d.seed + seed,
                    img_size=d.img_size,
                    resize=d.resize,
                    modalities=SOURCES[d.source].covered_modalities(),
                    study_split=split,
                    options=d.options,
                )
            except EmptySourceError as err:
                key = "n_train" if split == "train" else "n_test"
                raise EmptySourceError(
                    f"data.{key} = {d.n(split) or 'all'}, data.splits.{split} = "
                    f"{d.splits[split]!r}: {err}"  # type: ignore[index]
                ) from None
        return SynthEO(
            task,
            split,
            seed=d.seed + seed,
            n=d.n(split),
            img_size=d.img_size,
            clouds=d.clouds,
        )
