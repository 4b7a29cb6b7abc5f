"""Panopticon (Waldmann et al., arXiv 2503.10845) behind the adapter contract.

Wraps :class:`torchgeo.models.Panopticon`: a DINOv2 ViT-B/14 (timm ``Block``s) whose patch
embedding fuses any set of channels by cross-attention over per-channel embeddings. Each channel
is identified by ``chn_ids``: optical channels by their centre wavelength **in nanometres**
(from :func:`mapex_analysis.modalities.wavelengths`, never typed by hand), SAR channels by
Panopticon's negative polarisation codes (:data:`SAR_CHANNEL_IDS`: ``-1`` VV, ``-2`` VH, orbit
direction unknown; the code indexes transmit/receive/orbit embeddings as in Panopticon's
``sentinel1.yaml``). Elevation has no channel id and is not accepted.

Pooling: the timm head's ``"token"`` pool (CLS token after the final norm); ``forward_features``
returns the final normed tokens ``(B, 1 + N, 768)``. The upstream constructor always builds the
full DINOv2 ViT-B/14 backbone (``timm.create_model("vit_base_patch14_dinov2")``, width 768, 12
blocks); only the channel-attention width ``attn_dim`` and the image size are arguments. A smaller
configuration can therefore only be had by removing blocks: ``depth`` keeps the first ``depth``
blocks through timm's own ``VisionTransformer.prune_intermediate_layers`` (final norm and pooling
kept). ``panopticon_test`` uses 2 blocks (~14.2 M parameters instead of ~98 M); the width stays
768. Normalisation: the project's per-band statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchgeo.models import Panopticon
from torchgeo.models.copernicusfm import resize_abs_pos_embed
from torchgeo.models.panopticon import Panopticon_Weights

from mapex_analysis.modalities import get_band, wavelengths
from mapex_analysis.models.adapters.base import (
    Adapter,
    FillPolicy,
    build,
    modality_bands,
    project_normalization,
)
from mapex_analysis.models.registry import register_model

__all__ = ["SAR_CHANNEL_IDS", "PanopticonAdapter"]

#: Panopticon's channel ids of the Sentinel-1 polarisations (orbit direction unknown).
SAR_CHANNEL_IDS: dict[str, float] = {"VV": -1.0, "VH": -2.0}

_MODALITIES: tuple[str, ...] = ("rgb", "red_edge", "nir", "swir", "sar")
_PATCH = 14  # fixed by the upstream DINOv2 backbone
_UPSTREAM_DEPTH = 12  # blocks of the upstream backbone, timm's vit_base_patch14_dinov2


class PanopticonAdapter(Adapter):
    """Panopticon on modality dicts: optical channel ids in nm, any band subset.

    Args:
        img_size: Input size in pixels (a multiple of 14).
        attn_dim: Width of the channel attention of the patch embedding.
        depth: Number of backbone blocks kept (``None``: all 12 of the upstream model).
        modalities: Accepted modalities (subset of rgb, red_edge, nir, swir, sar).
        fill: Not used (any band subset is taken); accepted for a uniform API.

    Raises:
        ValueError: for ``depth`` outside ``[1, 12]``.
    """

    family = "panopticon"
    model: Panopticon
    variable_bands = True
    #: Panopticon's teacher checkpoint stores a DINOv2 mask token the encoder never uses.
    unused_keys = frozenset({"mask_token"})

    def __init__(
        self,
        *,
        img_size: int = 224,
        attn_dim: int = 2304,
        depth: int | None = None,
        modalities: Sequence[str] = _MODALITIES,
        fill: FillPolicy | None = None,
    ) -> None:
        if depth is not None and not 1 <= depth <= _UPSTREAM_DEPTH:
            raise ValueError(f"Panopticon depth must be in [1, {_UPSTREAM_DEPTH}], got {depth}")
        bands = modality_bands(modalities)
        super().__init__(
            modalities=modalities,
            bands=bands,
            normalization=project_normalization(bands),
            pool="cls",
            num_features=768,
            img_size=img_size,
            patch_size=_PATCH,
            fill=fill,
        )
        self.model = Panopticon(attn_dim=attn_dim, embed_dim=768, img_size=img_size)
        vit: Any = self.model.model  # a timm VisionTransformer (typed nn.Module upstream)
        if depth is not None:
            # keep blocks 0 .. depth - 1, the final norm and the CLS pooling
            vit.prune_intermediate_layers([depth - 1], prune_norm=False, prune_head=False)
        self.num_features = int(vit.num_features)
        self.embed_dim = self.num_features
        self.weight_enums = tuple(Panopticon_Weights)

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        """The DINOv2 backbone's timm ``Block``s (a view onto ``self.model``)."""
        vit: Any = self.model.model
        blocks: nn.Sequential = vit.blocks
        return blocks

    def channel_ids(self, bands: Sequence[str]) -> list[float]:
        """Panopticon channel ids of ``bands``: wavelength in nm, or the SAR code."""
        return [
            SAR_CHANNEL_IDS[b] if get_band(b).wavelength_nm is None else wavelengths([b])[0]
            for b in bands
        ]

    def _upstream_tokens(self, x: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        inp, bands = self.prepare_input(x)
        ids = torch.tensor(self.channel_ids(bands), dtype=inp.dtype, device=inp.device)
        chn_ids = ids.unsqueeze(0).expand(inp.shape[0], -1).clone()  # (B, C); mutated upstream
        vit: Any = self.model.model
        # the final normed tokens and the pooled (B, 768)
        return self._run_reading(vit.norm, lambda: self.model({"imgs": inp, "chn_ids": chn_ids}))

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """The timm head's pooling (CLS token) of the final tokens.

        Args:
            tokens: ``(B, 1 + N, D)`` from :meth:`forward_features`.
            pre_logits: Kept for the contract; there is no classifier.

        Returns:
            ``(B, D)``.
        """
        vit: Any = self.model.model
        out: Tensor = vit.forward_head(tokens, pre_logits=True)
        return out

    def _upstream_state_target(self) -> nn.Module:
        vit: nn.Module = self.model.model
        return vit

    def _prepare_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        # The published weights are at 518 px; torchgeo resizes the position embedding.
        pos = state.get("pos_embed")
        vit: Any = self.model.model
        own = vit.pos_embed
        if pos is not None and pos.dim() == 3 and pos.shape[-1] == own.shape[-1]:
            old = int(round((pos.shape[1] - 1) ** 0.5))
            new = self.img_size // _PATCH
            if old != new and old * old == pos.shape[1] - 1:
                state = {**state, "pos_embed": resize_abs_pos_embed(pos, new, old)}
        return state


@register_model(family="panopticon", accepts_weights=True, description="Panopticon test size")
def panopticon_test(weights: str | Path | None = None, **kwargs: Any) -> PanopticonAdapter:
    """Panopticon at a small size for tests (28 px, channel attention 48, 2 of 12 blocks).

    The upstream constructor fixes the backbone width at 768 (see the module docstring).
    """
    cfg = dict(img_size=28, attn_dim=48, depth=2)
    return build(PanopticonAdapter, weights, **{**cfg, **kwargs})  # type: ignore[return-value]


@register_model(
    family="panopticon",
    accepts_weights=True,
    weights="torchgeo Panopticon_Weights.VIT_BASE14 or a local file",
    description="Panopticon ViT-B/14, 224 px, any optical/SAR channels",
)
def panopticon_base(weights: str | Path | None = None, **kwargs: Any) -> PanopticonAdapter:
    """Panopticon ViT-Base/14 at 224 px."""
    return build(PanopticonAdapter, weights, **kwargs)  # type: ignore[return-value]
