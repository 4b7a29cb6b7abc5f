"""Expert specialisation from the routing statistics of mixture-of-modality-experts layers.

Input: per MoE layer, a count matrix ``counts[m, e]`` = number of tokens of modality ``m``
whose top-k includes routed expert ``e`` (``RoutingStats.counts`` of
:mod:`mapex_analysis.models.moe`, summed over batches), with the row modalities and the
modality group owning each routed expert (``expert_groups``). Shared experts see every token
and carry no routing decision, so they are not part of ``counts``.

With top-k routing a token is counted once for each of its ``k`` experts, so every measure
below is over routing *assignments*: ``p(e | m) = counts[m, e] / sum_e counts[m, e]``, and the
joint ``p(m, e) = counts[m, e] / sum counts``. Measures:

* **routing frequency** ``p(e | m)`` per (layer, modality, expert);
* **normalised routing entropy** per modality ``H(E | M = m) / log E`` in [0, 1]: 0 when a
  modality always goes to one expert, 1 when it is spread uniformly over all ``E`` experts
  (undefined, NaN, for ``E = 1``);
* **mutual information** ``I(M; E) = sum p(m, e) log2(p(m, e) / (p(m) p(e)))`` in **bits**
  (0 when routing ignores the modality; ``H(M)`` when every modality has experts of its own);
  ``H(M)`` in bits is reported next to it, as MI depends on the modality mix of the data;
* **own-group share** per modality: share of its assignments that land on experts of its own
  group (NaN for a modality that owns no routed expert, e.g. after pruning).

:func:`collect_routing` runs a MoE model over data and sums the counts per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import entropy
from torch import nn

__all__ = [
    "LayerSpecialization",
    "RoutingCounts",
    "RoutingRecorder",
    "SpecializationReport",
    "collect_routing",
    "modality_entropy_bits",
    "mutual_information_bits",
    "normalized_routing_entropy",
    "own_group_share",
    "routing_frequency",
    "specialization_metrics",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingCounts:
    """Routing counts of one MoE layer, summed over batches.

    Attributes:
        counts: ``(M, E)`` int64 ``counts[m, e]``: tokens of modality ``m`` routed to routed
            expert ``e`` (top-k: once per selected expert).
        modalities: The ``M`` row modalities.
        expert_groups: The modality owning each of the ``E`` routed experts.
    """

    counts: np.ndarray
    modalities: tuple[str, ...]
    expert_groups: tuple[str, ...]


def _counts(counts: Any) -> np.ndarray:
    c = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    if c.ndim != 2:
        raise ValueError(f"routing counts must be an (M, E) matrix, got shape {c.shape}")
    if (c < 0).any():
        raise ValueError("routing counts must be non-negative")
    return c.astype(np.float64)


def routing_frequency(counts: Any) -> np.ndarray:
    """``p(e | m)``: each modality's share of routing assignments per expert.

    Args:
        counts: ``(M, E)`` count matrix (numpy or torch).

    Returns:
        ``(M, E)`` float64; rows sum to 1, rows of modalities with no tokens are NaN.

    Raises:
        ValueError: for a malformed matrix.
    """
    c = _counts(counts)
    rows = c.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, c / np.where(rows > 0, rows, 1.0), np.nan)


def normalized_routing_entropy(counts: Any) -> np.ndarray:
    """``H(E | M = m) / log E`` per modality.

    Args:
        counts: ``(M, E)`` count matrix.

    Returns:
        ``(M,)`` values in [0, 1]; NaN for modalities with no tokens or when ``E = 1``.

    Raises:
        ValueError: for a malformed matrix.
    """
    p = routing_frequency(counts)
    n_experts = p.shape[1]
    if n_experts < 2:
        return np.full(p.shape[0], np.nan)
    h = np.array([entropy(row, base=n_experts) if not np.isnan(row).any() else np.nan
                  for row in p])  # fmt: skip
    return h + 0.0  # + 0.0 turns -0.0 into 0.0


def _entropy_bits(p: np.ndarray) -> float:
    return float(entropy(p.ravel(), base=2))


def mutual_information_bits(counts: Any) -> float:
    """Mutual information ``I(M; E)`` between token modality and routed expert, in bits.

    Args:
        counts: ``(M, E)`` count matrix.

    Returns:
        ``I(M; E) = H(M) + H(E) - H(M, E)`` in bits, ``>= 0``.

    Raises:
        ValueError: for a malformed matrix or one with no tokens.
    """
    c = _counts(counts)
    total = c.sum()
    if total <= 0:
        raise ValueError("routing counts are all zero; no token was routed")
    joint = c / total
    mi = _entropy_bits(joint.sum(1)) + _entropy_bits(joint.sum(0)) - _entropy_bits(joint.ravel())
    return max(mi, 0.0)  # clip float rounding below zero


def modality_entropy_bits(counts: Any) -> float:
    """``H(M)`` in bits of the modality mix of the routed assignments (upper bound of MI).

    Raises:
        ValueError: for a malformed matrix or one with no tokens.
    """
    c = _counts(counts)
    if c.sum() <= 0:
        raise ValueError("routing counts are all zero; no token was routed")
    return _entropy_bits(c.sum(axis=1) / c.sum())


def own_group_share(
    counts: Any, modalities: Sequence[str], expert_groups: Sequence[str]
) -> np.ndarray:
    """Share of each modality's assignments that land on experts of its own group.

    Args:
        counts: ``(M, E)`` count matrix.
        modalities: Row modalities (``M``).
        expert_groups: Owning modality of each routed expert (``E``).

    Returns:
        ``(M,)`` shares in [0, 1]; NaN where a modality has no tokens or owns no expert.

    Raises:
        ValueError: if the names do not match the matrix shape.
    """
    c = _counts(counts)
    if len(modalities) != c.shape[0] or len(expert_groups) != c.shape[1]:
        raise ValueError(
            f"counts {c.shape} do not match {len(modalities)} modalities x "
            f"{len(expert_groups)} expert groups"
        )
    groups = np.asarray(expert_groups)
    out = np.full(c.shape[0], np.nan)
    for i, m in enumerate(modalities):
        own = groups == m
        if own.any() and c[i].sum() > 0:
            out[i] = c[i, own].sum() / c[i].sum()
    return out


@dataclass(frozen=True)
class LayerSpecialization:
    """Specialisation measures of one MoE layer.

    Attributes:
        layer: Block index.
        modalities: Row modalities.
        expert_groups: Owner of each routed expert.
        counts: ``(M, E)`` counts.
        frequency: ``(M, E)`` ``p(e | m)``.
        entropy: ``(M,)`` normalised routing entropy.
        own_group_share: ``(M,)`` share on own group.
        mutual_information_bits: ``I(M; E)`` in bits.
        modality_entropy_bits: ``H(M)`` in bits.
    """

    layer: int
    modalities: tuple[str, ...]
    expert_groups: tuple[str, ...]
    counts: np.ndarray
    frequency: np.ndarray
    entropy: np.ndarray
    own_group_share: np.ndarray
    mutual_information_bits: float
    modality_entropy_bits: float


@dataclass(frozen=True)
class SpecializationReport:
    """Specialisation of every MoE layer of a model.

    Attributes:
        layers: One :class:`LayerSpecialization` per MoE layer (blocks without MoE skipped).
    """

    layers: tuple[LayerSpecialization, ...]

    def rows(self) -> list[dict[str, Any]]:
        """Tidy long-format rows ``{layer, modality, expert, metric, value, unit}``.

        ``expert`` is the routed-expert index for ``routing_frequency`` and ``None`` for the
        per-modality and per-layer measures (``modality`` is ``None`` for the latter).
        """
        rows: list[dict[str, Any]] = []
        for ly in self.layers:
            for i, m in enumerate(ly.modalities):
                for e, g in enumerate(ly.expert_groups):
                    rows.append(
                        dict(layer=ly.layer, modality=m, expert=e, expert_group=g,
                             metric="routing_frequency", value=float(ly.frequency[i, e]),
                             unit="fraction")
                    )  # fmt: skip
                for metric, vals in (
                    ("routing_entropy_normalized", ly.entropy),
                    ("own_group_share", ly.own_group_share),
                ):
                    rows.append(
                        dict(layer=ly.layer, modality=m, expert=None, expert_group=None,
                             metric=metric, value=float(vals[i]), unit="fraction")
                    )  # fmt: skip
            for metric, value in (
                ("mutual_information", ly.mutual_information_bits),
                ("modality_entropy", ly.modality_entropy_bits),
            ):
                rows.append(
                    dict(layer=ly.layer, modality=None, expert=None, expert_group=None,
                         metric=metric, value=value, unit="bits")
                )  # fmt: skip
        return rows


def specialization_metrics(stats: Any) -> SpecializationReport:
    """Specialisation measures for every MoE layer.

    Args:
        stats: Per-layer routing statistics: a ``RoutingInfo`` (its ``stats``), or a sequence
            with one entry per block, each ``None`` (block without MoE) or an object with
            ``counts`` ``(M, E)``, ``modalities`` and ``expert_groups`` (``RoutingStats`` or
            :class:`RoutingCounts`).

    Returns:
        The :class:`SpecializationReport`.

    Raises:
        ValueError: if no layer has routing statistics, or a layer has no routed tokens.
    """
    per_layer = getattr(stats, "stats", stats)
    layers = []
    for i, st in enumerate(per_layer):
        if st is None:
            continue
        c = _counts(st.counts)
        mods, groups = tuple(st.modalities), tuple(st.expert_groups)
        layers.append(
            LayerSpecialization(
                layer=i,
                modalities=mods,
                expert_groups=groups,
                counts=c.astype(np.int64),
                frequency=routing_frequency(c),
                entropy=normalized_routing_entropy(c),
                own_group_share=own_group_share(c, mods, groups),
                mutual_information_bits=mutual_information_bits(c),
                modality_entropy_bits=modality_entropy_bits(c),
            )
        )
    if not layers:
        raise ValueError("no layer has routing statistics; is this a mixture-of-experts model?")
    return SpecializationReport(tuple(layers))


def _add(total: RoutingCounts | None, batch: RoutingCounts) -> RoutingCounts:
    if total is None:
        return batch
    return RoutingCounts(total.counts + batch.counts, total.modalities, total.expert_groups)


class RoutingRecorder:
    """Sums a MoE token model's routing counts over the forward passes that run while it is
    active, so that a pass the caller makes anyway (feature extraction) also yields what
    :func:`collect_routing` would collect with a pass of its own.

    It hooks each block's ``mlp``; a mixture returns its routing statistics with its output
    (``output.stats.counts``, ``(M, E)``), a dense MLP returns a tensor and is skipped::

        with RoutingRecorder(model) as rec:
            extract_features(model, test_split, modalities=mods)
        counts = rec.counts(len(test_split))  # None unless exactly that many samples passed

    Args:
        model: A token model with ``blocks`` (each with an ``mlp``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.blocks = list(getattr(model, "blocks", ()))
        self.totals: list[RoutingCounts | None] = [None] * len(self.blocks)
        self.samples = 0
        self._handles: list[Any] = []
        self._first: int | None = None

    def __enter__(self) -> RoutingRecorder:
        for i, block in enumerate(self.blocks):
            mlp = getattr(block, "mlp", None)
            if isinstance(mlp, nn.Module):
                self._handles.append(mlp.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            st = getattr(output, "stats", None)
            if st is None or getattr(st, "counts", None) is None:
                return
            if self._first is None:
                self._first = i
            if i == self._first:
                self.samples += int(args[0].shape[0])
            batch = RoutingCounts(_counts(st.counts).astype(np.int64), tuple(st.modalities),
                                  tuple(st.expert_groups))  # fmt: skip
            self.totals[i] = _add(self.totals[i], batch)

        return hook

    def counts(self, samples: int) -> list[RoutingCounts | None] | None:
        """Per-block counts (``None`` for blocks without a mixture), or ``None`` when the
        passes did not cover exactly ``samples`` samples (e.g. features came from the cache)."""
        if self._first is None or self.samples != samples:
            return None
        return list(self.totals)


def collect_routing(
    model: nn.Module,
    data: Mapping[str, np.ndarray | torch.Tensor],
    *,
    modalities: Sequence[str],
    batch_size: int = 64,
) -> list[RoutingCounts | None]:
    """Run a MoE model frozen over data and sum its routing counts per layer.

    Args:
        model: A token model whose ``encode(..., return_routing=True)`` returns
            ``(tokens, RoutingInfo)``.
        data: ``{modality: (N, C, H, W)}`` arrays (physical units); other keys are ignored.
        modalities: Modalities to feed.
        batch_size: Samples per forward pass.

    Returns:
        One :class:`RoutingCounts` per block (``None`` for blocks without MoE).

    Raises:
        KeyError: naming a modality missing from ``data``.
        ValueError: if the model returns no routing statistics.
    """
    for m in modalities:
        if m not in data:
            raise KeyError(f"modality {m!r} is not in the data; available: {', '.join(data)}")
    n = len(data[modalities[0]])
    totals: list[RoutingCounts | None] | None = None
    net: Any = model  # encode/tokenize: contract methods
    was_training = model.training
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                x = {
                    m: torch.as_tensor(data[m][start : start + batch_size]).to(dev)
                    for m in modalities
                }
                _, info = net.encode(*net.tokenize(x), return_routing=True)
                batch = [
                    None
                    if st is None
                    else RoutingCounts(
                        _counts(st.counts).astype(np.int64),
                        tuple(st.modalities),
                        tuple(st.expert_groups),
                    )
                    for st in info.stats
                ]
                if totals is None:
                    totals = batch
                    continue
                totals = [
                    None if a is None or b is None else _add(a, b)
                    for a, b in zip(totals, batch, strict=True)
                ]
    finally:
        model.train(was_training)
    if totals is None:
        raise ValueError("no data: the first modality has 0 samples")
    logger.info("routing counts collected over %d samples, %d layers", n, len(totals))
    return totals
