"""Dense group-channel ViT: the modality-grouped tokens of MAPEX through plain timm ``Block``s.

Each modality (channel group) is patch-embedded separately and tagged with a learned modality
embedding plus the 2-D sin-cos position embedding (the SatMAE group-channel scheme, shared with
MAPEX through :class:`~mapex_analysis.models.tokenizer.ModalityTokenizer`). The blocks are timm
:class:`~timm.models.vision_transformer.Block`, so width slimming and every timm-based operator
apply unchanged. Any modality groups, image size and patch size work.

Registered: ``vit_mae_test`` and ``vit_mae_tiny`` (width 128, depth 6, 4 heads, patch 8 on
32x32, the size of ``mapex_tiny``; MLP ratio 2, i.e. the active MLP hidden size of a
``mapex_tiny`` token: one routed expert of 128 plus one shared expert of 128).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models.vision_transformer import Block
from torch import nn

from mapex_analysis.modalities import DEFAULT_MODALITIES
from mapex_analysis.models.registry import register_model
from mapex_analysis.models.token_model import TokenEncoder

__all__ = ["GroupChannelViT", "vit_mae_test", "vit_mae_tiny"]


class GroupChannelViT(TokenEncoder):
    """Dense ViT over per-modality tokens.

    Args:
        modalities: Channel groups (modality names).
        img_size: Square input size in pixels.
        patch_size: Patch size in pixels.
        embed_dim: Width.
        depth: Number of timm ``Block``s.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden size over width.
        pool: ``"cls"`` or ``"mean"``.
    """

    def __init__(
        self,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        img_size: int = 32,
        patch_size: int = 8,
        embed_dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        pool: str = "cls",
    ) -> None:
        super().__init__(modalities, img_size, patch_size, embed_dim, pool)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)
        )


@register_model(family="vit", description="Group-channel ViT test size: width 32, depth 2")
def vit_mae_test(**kwargs: Any) -> GroupChannelViT:
    """Group-channel ViT test size: width 32, depth 2, 2 heads, patch 8 on 16x16."""
    defaults = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return GroupChannelViT(**dict(defaults, **kwargs))


@register_model(
    family="vit",
    description="Dense group-channel ViT of mapex_tiny's width/depth (MAE baseline)",
)
def vit_mae_tiny(**kwargs: Any) -> GroupChannelViT:
    """Dense group-channel ViT: width 128, depth 6, 4 heads, patch 8 on 32x32, MLP ratio 2."""
    defaults = dict(img_size=32, patch_size=8, embed_dim=128, depth=6, num_heads=4)
    return GroupChannelViT(**dict(defaults, **kwargs))
