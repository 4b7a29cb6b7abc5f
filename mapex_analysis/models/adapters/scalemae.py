"""Scale-MAE (Reed et al., arXiv 2212.14532) behind the adapter contract.

Wraps :class:`torchgeo.models.ScaleMAE`, a timm ``VisionTransformer`` whose position embedding
is computed from the ground sample distance (``res``). Input: Sentinel-2 R, G, B (the fMoW RGB
weights), with the ImageNet statistics of the published transforms (reflectance in [0, 1] taken
as the 8-bit intensity / 255). Pooling: CLS token after the final norm (timm ``"token"``).

Registered: ``scalemae_test`` (tiny) and ``scalemae_large`` (ViT-L/16, 224 px, ~303 M
parameters; weights ``ScaleMAELarge16_Weights.FMOW_RGB`` or a local file in its key format).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchgeo.models import ScaleMAE
from torchgeo.models.scale_mae import ScaleMAELarge16_Weights, interpolate_pos_embed

from mapex_analysis.modalities import bands_of
from mapex_analysis.models.adapters.base import FillPolicy, build
from mapex_analysis.models.adapters.timm_vit import IMAGENET_RGB, TimmViTAdapter
from mapex_analysis.models.registry import register_model

__all__ = ["ScaleMAEAdapter"]


class ScaleMAEAdapter(TimmViTAdapter):
    """Scale-MAE on Sentinel-2 RGB.

    Args:
        img_size: Input size in pixels.
        patch_size: Patch size.
        embed_dim: Width.
        depth: Number of blocks.
        num_heads: Attention heads.
        res: Ground sample distance factor of the GSD position embedding (upstream default
            1.0).
        fill: Fill policy for missing bands (``None``: error).
    """

    family = "scalemae"
    unused_keys = frozenset({"head.weight", "head.bias", "mask_token"})

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        res: float = 1.0,
        fill: FillPolicy | None = None,
    ) -> None:
        model = ScaleMAE(
            res=res,
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_classes=0,
        )
        super().__init__(
            modalities=("rgb",),
            bands=bands_of("rgb"),
            normalization=IMAGENET_RGB,
            pool="cls",
            num_features=embed_dim,
            img_size=img_size,
            patch_size=patch_size,
            num_prefix_tokens=model.num_prefix_tokens,
            fill=fill,
        )
        self._init_vit(model)
        self.weight_enums = tuple(ScaleMAELarge16_Weights)

    def _prepare_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        # A checkpoint at another image size: torchgeo's own position-embedding interpolation.
        pos = state.get("pos_embed")
        own: Any = self.model.pos_embed
        if pos is not None and tuple(pos.shape) != tuple(own.shape):
            model: Any = self.model
            state = interpolate_pos_embed(model, dict(state))
        return state


@register_model(family="scalemae", accepts_weights=True, description="Scale-MAE test size")
def scalemae_test(weights: str | Path | None = None, **kwargs: Any) -> ScaleMAEAdapter:
    """Scale-MAE at a tiny random-init size for tests (32 px, patch 8, width 32, depth 2)."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return build(ScaleMAEAdapter, weights, **{**cfg, **kwargs})  # type: ignore[return-value]


@register_model(
    family="scalemae",
    accepts_weights=True,
    weights="torchgeo ScaleMAELarge16_Weights.FMOW_RGB or a local file",
    description="Scale-MAE ViT-L/16, 224 px, RGB (~303 M parameters)",
)
def scalemae_large(weights: str | Path | None = None, **kwargs: Any) -> ScaleMAEAdapter:
    """Scale-MAE ViT-Large/16 at 224 px (the MAPEX paper's Scale-MAE baseline)."""
    return build(ScaleMAEAdapter, weights, **kwargs)  # type: ignore[return-value]
