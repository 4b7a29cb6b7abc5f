"""Contrastive pretraining between two modality views of the same scene (SimCLR-style).

The two views of a scene are two **disjoint modality subsets** of it (e.g. rgb+nir vs
sar+ele), drawn once per batch: the encoder (any
:class:`~mapex_analysis.models.token_model.TokenEncoder`) pools each view to ``(B, D)``, a
two-layer projection head (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020) maps it to ``proj_dim``, and the loss is the symmetric
normalised-temperature cross-entropy (NT-Xent / InfoNCE) that makes each scene's two views
each other's match among the batch. The projection head is dropped after pretraining (only
the encoder is saved), as in SimCLR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mapex_analysis.models.token_model import TokenEncoder

__all__ = ["ContrastiveObjective", "ContrastiveOutput", "modality_views", "nt_xent"]


def modality_views(
    modalities: Sequence[str], rng: np.random.Generator
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Two disjoint, non-empty modality subsets covering ``modalities`` (a random split).

    Args:
        modalities: The batch's modalities (at least two).
        rng: The draw's generator.

    Returns:
        ``(view_a, view_b)``, each in the input's order.

    Raises:
        ValueError: for fewer than two modalities.
    """
    mods = list(modalities)
    if len(mods) < 2:
        raise ValueError(
            f"contrastive views are modality subsets and need >= 2 modalities, got {mods}"
        )
    perm = rng.permutation(len(mods))
    k = int(rng.integers(1, len(mods)))
    a = {mods[i] for i in perm[:k]}
    return tuple(m for m in mods if m in a), tuple(m for m in mods if m not in a)


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float) -> Tensor:
    """Symmetric NT-Xent: cross-entropy of each view's match among the other view's batch.

    Args:
        z_a: ``(B, P)`` projections of view a (any scale; normalised here).
        z_b: ``(B, P)`` projections of view b.
        temperature: Softmax temperature.

    Returns:
        The scalar loss (``log B`` for unrelated views, 0 for perfectly matched ones as
        the temperature goes to 0).
    """
    a, b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
    logits = a @ b.t() / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@dataclass
class ContrastiveOutput:
    """One contrastive pass: ``loss`` (NT-Xent) and the projections of the two views."""

    loss: Tensor
    z_a: Tensor
    z_b: Tensor


class ContrastiveObjective(nn.Module):
    """Encoder + projection head + NT-Xent between two modality views.

    Args:
        encoder: The token encoder being pretrained (its pooled ``forward`` is used).
        proj_dim: Projection width.
        temperature: NT-Xent temperature (SimCLR: 0.1-0.5).

    ``forward((view_a, view_b))`` takes two modality dicts of the same scenes.
    """

    def __init__(self, encoder: TokenEncoder, proj_dim: int = 64, temperature: float = 0.2):
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        d = int(encoder.embed_dim)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, proj_dim))

    def forward(
        self, views: tuple[Mapping[str, Tensor], Mapping[str, Tensor]]
    ) -> ContrastiveOutput:
        view_a, view_b = views
        z_a = self.head(self.encoder(view_a))
        z_b = self.head(self.encoder(view_b))
        return ContrastiveOutput(nt_xent(z_a, z_b, self.temperature), z_a, z_b)
