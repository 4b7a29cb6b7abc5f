"""What pretraining bought: k-NN accuracy vs random init, and router specialisation.

:func:`evaluate_pretraining` loads a pretrained checkpoint, builds the same architecture with
random initialisation, extracts frozen pooled features of both on SynthEO land cover
(:func:`mapex_analysis.eval.extract_features`) and scores a k-NN probe (k = 5,
:func:`mapex_analysis.eval.probes.knn_probe`). For MoE models it also sums the routing counts
over the land-cover test scenes (:func:`mapex_analysis.measure.specialization.collect_routing`)
and reports, per modality, the share of its routed assignments that land on its most used
expert(s) (:func:`top_expert_share`), averaged over the MoE layers.

:class:`KnnMonitor` runs the same k-NN probe *during* pretraining (``mapex-study pretrain
CONFIG --knn-every N``): at the start (the random initialisation, which is the random-init twin
:func:`evaluate_pretraining` builds, since both seed with the config's seed) and every ``N``
steps, logged as ``knn/accuracy`` next to the losses. This is how the recipe in
``studies/pretrain/`` was chosen.

:func:`evaluate_static_pruning` checks MAPEX's promise on a checkpoint: static pruning to one
modality removes experts that carried (almost) none of its tokens and keeps its k-NN accuracy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from mapex_analysis.checkpoint import load_model
from mapex_analysis.data import SynthEO
from mapex_analysis.eval.features import extract_features
from mapex_analysis.eval.probes import knn_probe
from mapex_analysis.factory import create_model
from mapex_analysis.measure.specialization import (
    collect_routing,
    modality_entropy_bits,
    mutual_information_bits,
    own_group_share,
)
from mapex_analysis.models.contract import is_moe
from mapex_analysis.ops.prune import prune_experts

__all__ = [
    "KnnMonitor",
    "LandcoverKnnProbe",
    "PretrainEvaluation",
    "PruningEvaluation",
    "evaluate_pretraining",
    "evaluate_static_pruning",
    "top_expert_share",
]

logger = logging.getLogger(__name__)


def top_expert_share(counts: Any, top: int = 1) -> np.ndarray:
    """Share of each modality's routed assignments on its ``top`` most used experts.

    Args:
        counts: ``(M, E)`` counts (tokens of modality ``m`` routed to expert ``e``).
        top: How many experts (per modality, its own most used ones).

    Returns:
        ``(M,)`` shares in [0, 1]; NaN for a modality without tokens. A uniform router over
        ``E`` experts gives ``top / E``.

    Raises:
        ValueError: if ``counts`` is not 2-D or ``top`` is not in ``[1, E]``.
    """
    c = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=float)
    if c.ndim != 2:
        raise ValueError(f"counts must be (modalities, experts), got shape {c.shape}")
    if not 1 <= top <= c.shape[1]:
        raise ValueError(f"top must be in [1, {c.shape[1]}], got {top}")
    totals = c.sum(axis=1)
    best = -np.sort(-c, axis=1)[:, :top].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, best / np.where(totals > 0, totals, 1), np.nan)


@dataclass
class PretrainEvaluation:
    """Result of :func:`evaluate_pretraining`.

    Attributes:
        checkpoint: The evaluated checkpoint directory.
        knn_pretrained: k-NN test accuracy of the pretrained features.
        knn_random: k-NN test accuracy of the random-initialised features.
        k: Neighbours.
        n_train: Training scenes of the probe.
        n_test: Test scenes of the probe.
        top1_share: Modality -> mean over MoE layers of the share on its top-1 expert.
        top2_share: Modality -> mean over MoE layers of the share on its top-2 experts.
        num_experts: Routed experts per MoE layer (0 for dense models).
    """

    checkpoint: str
    knn_pretrained: float
    knn_random: float
    k: int
    n_train: int
    n_test: int
    top1_share: dict[str, float] = field(default_factory=dict)
    top2_share: dict[str, float] = field(default_factory=dict)
    num_experts: int = 0

    @property
    def margin(self) -> float:
        """``knn_pretrained - knn_random`` (accuracy points as a fraction)."""
        return self.knn_pretrained - self.knn_random


class LandcoverKnnProbe:
    """k-NN on frozen pooled features of SynthEO land-cover scenes (the pretraining check).

    The scenes (``n_train`` / ``n_test`` of seed ``seed``, the encoder's modalities and image
    size) are generated on the first :meth:`score` and reused afterwards.

    Args:
        n_train: Training scenes.
        n_test: Test scenes.
        k: Neighbours.
        seed: SynthEO seed.
        batch_size: Scenes per forward pass.
        cache_dir: SynthEO cache directory (``None``: its default).
        eval_split: The SynthEO split scored (``val`` by default: recipes chosen with this
            probe are never chosen on the ``test`` split the studies report).
    """

    def __init__(
        self,
        n_train: int = 2000,
        n_test: int = 1000,
        k: int = 5,
        seed: int = 0,
        batch_size: int = 250,
        cache_dir: str | Path | None = None,
        eval_split: str = "val",
    ) -> None:
        self.n_train, self.n_test, self.k, self.seed = n_train, n_test, k, seed
        self.batch_size, self.cache_dir = batch_size, cache_dir
        self.eval_split = eval_split
        self.splits: dict[str, Any] | None = None

    def scenes(self, encoder: torch.nn.Module) -> dict[str, Any]:
        """SynthEO ``train`` scenes and the scored scenes (``eval_split``, under the key
        ``test``) for ``encoder``'s modalities and size."""
        net: Any = encoder
        if self.splits is None:
            self.splits = {
                key: SynthEO("landcover", split, seed=self.seed, n=n,
                             modalities=tuple(net.modalities), img_size=int(net.img_size),
                             cache_dir=self.cache_dir)
                for key, split, n in (("train", "train", self.n_train),
                                      ("test", self.eval_split, self.n_test))
            }  # fmt: skip
        return self.splits

    def score(self, encoder: torch.nn.Module) -> float:
        """k-NN test accuracy of ``encoder``'s pooled features (its train mode is restored)."""
        net: Any = encoder
        mods: tuple[str, ...] = tuple(net.modalities)
        feats = extract_features(
            encoder, self.scenes(encoder), modalities=mods, batch_size=self.batch_size
        )
        res = knn_probe(feats.train.X, feats.train.y, feats.test.X, feats.test.y, k=self.k)
        return float(res.metrics["accuracy"])


def evaluate_pretraining(
    checkpoint: str | Path,
    *,
    n_train: int = 2000,
    n_test: int = 1000,
    k: int = 5,
    seed: int = 0,
    batch_size: int = 250,
    cache_dir: str | Path | None = None,
) -> PretrainEvaluation:
    """Compare a pretrained checkpoint with its random-initialised twin.

    Args:
        checkpoint: A checkpoint directory written by ``save_model`` (e.g. ``models/mapex_tiny``).
        n_train: SynthEO land-cover training scenes (seed ``seed``).
        n_test: SynthEO land-cover test scenes.
        k: Neighbours of the k-NN probe.
        seed: SynthEO seed and the random twin's initialisation seed.
        batch_size: Scenes per forward pass.
        cache_dir: SynthEO cache directory (``None``: its default).

    Returns:
        :class:`PretrainEvaluation`.

    Raises:
        CheckpointError: for a missing or corrupted checkpoint.
    """
    pretrained: Any = load_model(checkpoint)
    spec = pretrained.model_spec
    torch.manual_seed(seed)
    random_init = create_model(spec["name"], **spec["kwargs"]).eval()
    mods: tuple[str, ...] = tuple(pretrained.modalities)
    probe = LandcoverKnnProbe(n_train, n_test, k, seed, batch_size, cache_dir)
    acc: dict[str, float] = {}
    for name, model in (("pretrained", pretrained), ("random", random_init)):
        acc[name] = probe.score(model)
        logger.info("%s %s: k-NN (k=%d) accuracy %.4f", checkpoint, name, k, acc[name])
    splits = probe.scenes(pretrained)
    out = PretrainEvaluation(str(checkpoint), acc["pretrained"], acc["random"], k, n_train, n_test)
    if is_moe(pretrained):
        layers = [
            c
            for c in collect_routing(
                pretrained, splits["test"].arrays(), modalities=mods, batch_size=batch_size
            )
            if c is not None
        ]
        top1 = np.nanmean([top_expert_share(c.counts, 1) for c in layers], axis=0)
        e = layers[0].counts.shape[1]
        top2 = np.nanmean([top_expert_share(c.counts, min(2, e)) for c in layers], axis=0)
        out.top1_share = {m: float(v) for m, v in zip(mods, top1, strict=True)}
        out.top2_share = {m: float(v) for m, v in zip(mods, top2, strict=True)}
        out.num_experts = int(e)
    return out


class KnnMonitor(L.Callback):
    """Land-cover k-NN accuracy of the encoder's frozen features during pretraining.

    Scores the encoder being trained (``pl_module.encoder``) at the start of training and
    after every ``every`` optimiser steps with a :class:`LandcoverKnnProbe` (by default the
    probe of :func:`evaluate_pretraining`). Only the global-zero process scores; results are
    logged as ``knn/accuracy`` and kept in :attr:`history`.

    Args:
        every: Steps between scores (>= 1).
        probe: The probe (default: ``LandcoverKnnProbe()``).

    Raises:
        ValueError: for ``every < 1``.
    """

    def __init__(self, every: int, probe: LandcoverKnnProbe | None = None) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1 (steps between k-NN scores), got {every}")
        self.every = every
        self.probe = probe or LandcoverKnnProbe()
        #: ``(step, accuracy)`` of every score, in order.
        self.history: list[tuple[int, float]] = []

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        step = int(trainer.global_step)
        if self.history and self.history[-1][0] == step:
            return
        module: Any = pl_module
        acc = self.probe.score(module.encoder)
        self.history.append((step, acc))
        logger.info("step %d: land-cover k-NN (k=%d) accuracy %.4f", step, self.probe.k, acc)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"knn/accuracy": acc}, step=step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score the initialisation (step 0)."""
        self._record(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        """Score after every ``every``-th optimiser step."""
        if trainer.global_step % self.every == 0:
            self._record(trainer, pl_module)


@dataclass
class PruningEvaluation:
    """Result of :func:`evaluate_static_pruning` (one MAPEX checkpoint).

    Attributes:
        checkpoint: The checkpoint directory.
        split: SynthEO split scored and used as calibration (held out from any tuning).
        n_train: k-NN training scenes (``train`` split).
        n_test: Scored scenes.
        traffic_to_removed: Per modality: share of its routed assignments (the model fed that
            modality alone) that went to the experts static pruning to it removes.
        knn_full: Per modality: k-NN accuracy of the unpruned model fed that modality.
        knn_pruned: Per modality: k-NN accuracy of the model statically pruned to it.
        own_group_share: ``(layers, M)``: share of each modality's assignments on its own
            group, all modalities fed together.
        mutual_information_bits: ``I(M; E)`` per MoE layer, all modalities fed (bits).
        modality_entropy_bits: ``H(M)`` of that data (the upper bound of the MI), bits.
        modalities: The model's modalities (columns of ``own_group_share``).
    """

    checkpoint: str
    split: str
    n_train: int
    n_test: int
    traffic_to_removed: dict[str, float] = field(default_factory=dict)
    knn_full: dict[str, float] = field(default_factory=dict)
    knn_pruned: dict[str, float] = field(default_factory=dict)
    own_group_share: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    mutual_information_bits: list[float] = field(default_factory=list)
    modality_entropy_bits: float = float("nan")
    modalities: tuple[str, ...] = ()

    def knn_drop(self, modality: str) -> float:
        """``knn_full - knn_pruned`` of ``modality`` (accuracy as a fraction)."""
        return self.knn_full[modality] - self.knn_pruned[modality]


def evaluate_static_pruning(
    checkpoint: str | Path,
    *,
    n_train: int = 1000,
    n_test: int = 1000,
    split: str = "test",
    k: int = 5,
    seed: int = 0,
    batch_size: int = 250,
    knn: bool = True,
    cache_dir: str | Path | None = None,
) -> PruningEvaluation:
    """Does static modality-aware pruning of a MAPEX checkpoint lose anything?

    For every modality ``m`` of the checkpoint: feed SynthEO land-cover scenes of ``m`` alone,
    prune statically to ``m`` with those scenes as calibration (``traffic_to_removed``), and
    compare k-NN accuracy (paired: same scenes, same probe) of the pruned and the unpruned
    model fed ``m``. Also the per-layer specialisation with all modalities fed.

    Args:
        checkpoint: A MAPEX checkpoint directory.
        n_train: k-NN training scenes (``train`` split of seed ``seed``).
        n_test: Scenes of ``split`` scored (and used as calibration).
        split: The held-out split (``test`` by default; recipes are chosen on ``val``).
        k: Neighbours.
        seed: SynthEO seed.
        batch_size: Scenes per forward pass.
        knn: Score the k-NN probes (``False``: routing measures only).
        cache_dir: SynthEO cache directory.

    Returns:
        :class:`PruningEvaluation`.

    Raises:
        CheckpointError: for a missing or corrupted checkpoint.
        TypeError: if the checkpoint has no MoE layer.
    """
    model: Any = load_model(checkpoint).eval()
    mods: tuple[str, ...] = tuple(model.modalities)
    size = int(model.img_size)
    data = {
        "train": SynthEO("landcover", "train", seed=seed, n=n_train, modalities=mods,
                         img_size=size, cache_dir=cache_dir),
        "test": SynthEO("landcover", split, seed=seed, n=n_test, modalities=mods,
                        img_size=size, cache_dir=cache_dir),
    }  # fmt: skip
    held = data["test"].arrays()
    out = PruningEvaluation(str(checkpoint), split, n_train, n_test, modalities=mods)
    layers = [c for c in collect_routing(model, held, modalities=mods) if c is not None]
    out.own_group_share = np.array(
        [own_group_share(c.counts, c.modalities, c.expert_groups) for c in layers]
    )
    out.mutual_information_bits = [mutual_information_bits(c.counts) for c in layers]
    out.modality_entropy_bits = modality_entropy_bits(layers[0].counts)
    for m in mods:
        calib = [
            {m: torch.as_tensor(held[m][i : i + batch_size])} for i in range(0, n_test, batch_size)
        ]
        pruned: Any = prune_experts(model, [m], strategy="static", calibration=calib)
        out.traffic_to_removed[m] = float(pruned.op_report["traffic_to_removed"]["overall"])
        if not knn:
            continue
        for net, acc in ((model, out.knn_full), (pruned, out.knn_pruned)):
            f = extract_features(net, data, modalities=(m,), batch_size=batch_size)
            res = knn_probe(f.train.X, f.train.y, f.test.X, f.test.y, k=k)
            acc[m] = float(res.metrics["accuracy"])
        logger.info(
            "%s pruned to %s: traffic to removed %.4f, k-NN %.4f (full %.4f)",
            checkpoint, m, out.traffic_to_removed[m], out.knn_pruned[m], out.knn_full[m],
        )  # fmt: skip
    return out
