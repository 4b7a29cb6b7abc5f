"""Modality tokenisation shared by MAPEX and the dense group-channel ViT.

Each modality has its own timm :class:`~timm.layers.PatchEmbed` (``in_chans`` = its band count).
A token is ``patch_embed[m](normalize(m, x_m)) + pos + modality_embed[m]`` with ``pos`` the fixed
2-D sin-cos position embedding of its patch (timm's ``build_sincos2d_pos_embed``) and
``modality_embed[m]`` a learned vector. The tokens of the present modalities are concatenated
in the tokenizer's modality order (not the input dict's order), so a batch gives the same
sequence however its dict was built.

Pruning a modality means deleting ``patch_embed[m]`` and ``modality_embed[m]``; the tokenizer's
``modalities`` are read from ``patch_embed`` on every call, so nothing goes stale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from timm.layers import PatchEmbed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import nn

from mapex_analysis.modalities import (
    BandError,
    ModalityError,
    get_modality,
    normalize,
    validate_modalities,
)
from mapex_analysis.modalities import check_inputs as check_units_of

__all__ = ["ModalityTokenizer", "Tokens"]


@dataclass
class Tokens:
    """Tokens of a batch before the encoder.

    Attributes:
        tokens: ``(B, N, D)`` with position and modality embeddings added.
        modality_index: ``(B, N)`` index into ``modalities``.
        positions: ``(B, N)`` patch index of each token in the ``grid x grid`` layout.
        modalities: What ``modality_index`` refers to.
    """

    tokens: torch.Tensor
    modality_index: torch.Tensor
    positions: torch.Tensor
    modalities: tuple[str, ...]


class ModalityTokenizer(nn.Module):
    """Per-modality patch embeddings plus position and modality embeddings.

    Args:
        modalities: Modality names (see :mod:`mapex_analysis.modalities`).
        img_size: Square input size in pixels.
        patch_size: Square patch size in pixels.
        embed_dim: Token width ``D`` (divisible by 4 for the 2-D sin-cos embedding).

    Raises:
        ModalityError: for an empty, duplicate or unknown modality.
        ValueError: if ``img_size`` is not a multiple of ``patch_size`` or ``embed_dim`` is not
            divisible by 4.
    """

    def __init__(
        self, modalities: Sequence[str], img_size: int, patch_size: int, embed_dim: int
    ) -> None:
        super().__init__()
        self.owner: str = type(self).__name__  # the model named in input errors
        mods = validate_modalities(modalities)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % 4:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 (2-D sin-cos)")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid = img_size // patch_size
        self.patch_embed = nn.ModuleDict(
            {
                m: PatchEmbed(img_size, patch_size, get_modality(m).num_bands, embed_dim)
                for m in mods
            }
        )
        self.modality_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(embed_dim)) for m in mods}
        )
        for p in self.modality_embed.values():
            nn.init.normal_(p, std=0.02)
        pos = build_sincos2d_pos_embed([self.grid, self.grid], embed_dim)  # (L, D)
        self.register_buffer("pos_embed", pos.float(), persistent=False)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities the tokenizer accepts, in token order."""
        return tuple(self.patch_embed.keys())

    @property
    def num_patches(self) -> int:
        """Patches per modality, ``(img_size / patch_size) ** 2``."""
        return self.grid * self.grid

    def check_inputs(self, x: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        """Validate a modality batch and return its modalities in token order.

        Args:
            x: ``{modality: (B, C, H, W)}``.

        Returns:
            The present modalities, ordered as :attr:`modalities`.

        Raises:
            ModalityError: for an empty dict or a modality the model does not have.
            BandError: for a wrong channel count (naming the expected bands).
            ValueError: for a wrong spatial size or inconsistent batch sizes.
            UnitError: for values that cannot be in the modality's physical unit (raw digital
                numbers, linear SAR power, impossible elevations, NaN/Inf), unless
                :func:`~mapex_analysis.modalities.unit_checks` turned the checks off.
        """
        if not isinstance(x, Mapping):
            raise TypeError(f"expected a dict {{modality: tensor}}, got {type(x).__name__}")
        own = self.modalities
        present = [k for k in x if k != "label"]
        if not present:
            raise ModalityError(f"no modality given; valid modalities: {', '.join(own)}")
        for m in present:
            if m not in own:
                raise ModalityError(f"unknown modality {m!r}; valid modalities: {', '.join(own)}")
        batch = {int(x[m].shape[0]) for m in present}  # int(): sizes are tensors under jit.trace
        if len(batch) > 1:
            raise ValueError(f"modalities have different batch sizes {sorted(batch)}")
        for m in present:
            t, bands = x[m], get_modality(m).bands
            if t.dim() != 4 or t.shape[1] != len(bands):
                raise BandError(
                    f"modality {m!r} expects (B, {len(bands)}, H, W) with bands {list(bands)}, "
                    f"got shape {tuple(t.shape)}"
                )
            if tuple(t.shape[-2:]) != (self.img_size, self.img_size):
                raise ValueError(
                    f"modality {m!r} has size {tuple(t.shape[-2:])}, the model expects "
                    f"{(self.img_size, self.img_size)}"
                )
        check_units_of(x, where=self.owner)
        return tuple(m for m in own if m in x)

    def forward(self, x: Mapping[str, torch.Tensor]) -> Tokens:
        """Tokenise a batch in physical units.

        Args:
            x: ``{modality: (B, C, H, W)}`` in the units of :mod:`mapex_analysis.modalities`;
                any non-empty subset of :attr:`modalities`. A ``"label"`` key is ignored.

        Returns:
            :class:`Tokens` with ``N = len(present) * num_patches``.

        Raises:
            ModalityError, BandError, ValueError: see :meth:`check_inputs`.
        """
        present = self.check_inputs(x)
        own = self.modalities
        L = self.num_patches
        parts, index = [], []
        for m in present:
            t = self.patch_embed[m](normalize(m, x[m].float()))  # (B, L, D)
            # (L, D) position + modality embedding first: one add over the batch, not two
            parts.append(t + (self.pos_embed.to(t.dtype) + self.modality_embed[m]))
            index.append(torch.full((L,), own.index(m), dtype=torch.long))
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, N, D)
        B, N = tokens.shape[:2]
        modality_index = torch.cat(index).to(tokens.device).expand(B, N)
        positions = torch.arange(L, device=tokens.device).repeat(len(present)).expand(B, N)
        return Tokens(tokens, modality_index, positions, own)

    def positions_from_index(self, modality_index: torch.Tensor) -> torch.Tensor:
        """Patch positions of tokens laid out as :meth:`forward` lays them out.

        Each modality's tokens are consecutive patches ``0..L-1``, so a token's position is its
        rank among the tokens of its modality in the row.

        Args:
            modality_index: ``(B, N)``.

        Returns:
            ``(B, N)`` LongTensor.
        """
        onehot = torch.nn.functional.one_hot(modality_index.clamp(min=0), len(self.modalities))
        rank = onehot.cumsum(dim=1) - 1  # (B, N, M)
        return rank.gather(2, modality_index.clamp(min=0).unsqueeze(-1)).squeeze(-1) % max(
            self.num_patches, 1
        )
