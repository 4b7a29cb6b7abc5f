"""A SatMAE-style group-channel ViT (Cong et al., arXiv 2207.08051) behind the adapter contract.

SatMAE's multi-spectral encoder patch-embeds each group of bands separately, adds a group
(channel-group) embedding and a position embedding, and runs plain ViT blocks over the tokens
of all groups. The project already has that model, built from timm parts:
:class:`mapex_analysis.models.vit.GroupChannelViT` (one timm ``PatchEmbed`` per modality,
learned modality embedding, 2-D sin-cos position embedding, timm ``Block``s). This adapter wraps
it (``self.model``) at SatMAE's published size (ViT-B/16 at 224 px, MLP ratio 4) with one
group per project modality (SatMAE groups RGB+NIR, red edge and SWIR; here the groups are the
project's modalities). It is the SatMAE baseline of the MAPEX seed tables; no SatMAE weights
are ported: ``weights=`` takes a local checkpoint in the wrapped model's key format.

The wrapped model normalises with the project's band statistics and tokenises itself, so the
adapter delegates ``forward_features``/``forward_head``/``forward_intermediates`` to it; pooling
is the CLS token after the final norm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from mapex_analysis.modalities import DEFAULT_MODALITIES
from mapex_analysis.models.adapters.base import (
    Adapter,
    build,
    modality_bands,
    project_normalization,
)
from mapex_analysis.models.registry import register_model
from mapex_analysis.models.vit import GroupChannelViT

__all__ = ["SatMAEAdapter"]


class SatMAEAdapter(Adapter):
    """SatMAE-style group-channel ViT over the project's modalities.

    Args:
        modalities: Band groups (modality names).
        img_size: Input size in pixels.
        patch_size: Patch size.
        embed_dim: Width.
        depth: Number of timm ``Block``s.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden size over width (SatMAE: 4).
    """

    family = "satmae"
    model: GroupChannelViT
    variable_bands = True

    def __init__(
        self,
        *,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
    ) -> None:
        bands = modality_bands(modalities)
        super().__init__(
            modalities=modalities,
            bands=bands,
            normalization=project_normalization(bands),
            pool="cls",
            num_features=embed_dim,
            img_size=img_size,
            patch_size=patch_size,
        )
        self.model = GroupChannelViT(
            modalities=modalities,
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            pool="cls",
        )

    def _upstream_tokens(self, x: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        self.input_bands(x)  # names the accepted modalities and bands on a bad key
        tokens = self.model.forward_features(x)  # (B, 1 + N, D), normed
        return tokens, self.model.forward_head(tokens)

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """The wrapped model's CLS pooling.

        Args:
            tokens: ``(B, 1 + N, D)`` from :meth:`forward_features`.
            pre_logits: Kept for the contract; there is no classifier.

        Returns:
            ``(B, D)``.
        """
        return self.model.forward_head(tokens, pre_logits=pre_logits)

    def forward_intermediates(
        self,
        x: Mapping[str, Tensor],
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> Any:
        """The wrapped model's :meth:`forward_intermediates` (same semantics)."""
        self.input_bands(x)
        return self.model.forward_intermediates(x, indices, norm, intermediates_only)


@register_model(family="satmae", accepts_weights=True, description="SatMAE-style test size")
def satmae_test(weights: str | Path | None = None, **kwargs: Any) -> SatMAEAdapter:
    """SatMAE-style group-channel ViT, tiny (32 px, patch 8, width 32, depth 2)."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return build(SatMAEAdapter, weights, **{**cfg, **kwargs})  # type: ignore[return-value]


@register_model(
    family="satmae",
    accepts_weights=True,
    weights="random init or a local file (wrapped model's keys)",
    description="SatMAE-style group-channel ViT of mapex_tiny's size (width 128, depth 6)",
)
def satmae_tiny(weights: str | Path | None = None, **kwargs: Any) -> SatMAEAdapter:
    """SatMAE-style group-channel ViT: width 128, depth 6, 4 heads, patch 8 on 32 px."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=128, depth=6, num_heads=4)
    return build(SatMAEAdapter, weights, **{**cfg, **kwargs})  # type: ignore[return-value]


@register_model(
    family="satmae",
    accepts_weights=True,
    weights="random init or a local file (wrapped model's keys)",
    description="SatMAE-style group-channel ViT-B/16, 224 px (the seed tables' SatMAE)",
)
def satmae_base(weights: str | Path | None = None, **kwargs: Any) -> SatMAEAdapter:
    """SatMAE-style group-channel ViT-Base/16 at 224 px, six modality groups."""
    return build(SatMAEAdapter, weights, **kwargs)  # type: ignore[return-value]
