"""MAPEX: a ViT whose MLPs are mixtures of modality experts.

Our reading of MAPEX (Hanna, Scheibenreif, Borth, arXiv 2507.07527, and its slides; the authors'
code is not public):
per-modality patch embeddings, 2-D sin-cos position embedding plus a learned modality
embedding (:mod:`mapex_analysis.models.tokenizer`), the tokens of all present modalities
concatenated after a CLS token, then blocks of shared timm ``Attention`` and a
:class:`~mapex_analysis.models.moe.MoEMLP` (in every ``moe_every``-th block; the others keep a
dense timm ``Mlp`` of the same hidden size). Any non-empty subset of the modalities can be fed.

Registered sizes: ``mapex_test`` (tests), ``mapex_tiny`` (the CPU study model) and
``mapex_base`` (paper scale, ~128 M parameters). Expert hidden size is ``mlp_ratio * D`` with
``mlp_ratio = 1`` by default, so one modality expert plus the shared expert give a token the
same active MLP hidden size (``2 D``) in every size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from timm.layers import Attention, Mlp
from torch import nn

from mapex_analysis.modalities import DEFAULT_MODALITIES
from mapex_analysis.models.moe import MoEMLP, MoEOutput, RoutingStats
from mapex_analysis.models.registry import register_model
from mapex_analysis.models.token_model import TokenEncoder

__all__ = ["MAPEX", "MAPEXBlock", "mapex_base", "mapex_test", "mapex_tiny"]


class MAPEXBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        hidden: MLP / expert hidden size.
        modalities: Modality groups of the experts.
        moe: Use a :class:`MoEMLP` (else a dense timm ``Mlp``).
        **moe_kwargs: ``experts_per_modality``, ``shared_experts``, ``top_k``, ``router``,
            ``prior_init``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden: int,
        modalities: Sequence[str],
        *,
        moe: bool = True,
        **moe_kwargs: Any,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp: nn.Module = (
            MoEMLP(dim, hidden, modalities, **moe_kwargs) if moe else Mlp(dim, hidden)
        )

    def forward(
        self,
        x: torch.Tensor,
        modality_index: torch.Tensor,
        modalities: Sequence[str],
        pos: torch.Tensor | None = None,
        with_aux: bool = True,
    ) -> tuple[torch.Tensor, MoEOutput | None]:
        """Apply the block.

        Args:
            x: ``(B, N, D)`` tokens.
            modality_index: ``(B, N)`` (``-1`` for CLS).
            modalities: What the index refers to.
            pos: ``(B, N, D)`` position embedding per token (for the ``pos_embed`` router).
            with_aux: Compute the MoE load-balance loss (see :meth:`MoEMLP.forward`).

        Returns:
            ``(tokens, MoEOutput or None)``; the output's ``out`` is already added to ``x``.
        """
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        if isinstance(self.mlp, MoEMLP):
            res = self.mlp(h, modality_index, modalities, pos, with_aux=with_aux)
            return x + res.out, res
        return x + self.mlp(h), None


class MAPEX(TokenEncoder):
    """Mixture-of-modality-experts ViT encoder (see the module docstring).

    Args:
        modalities: Modalities (each gets a patch embedding and an expert group).
        img_size: Square input size in pixels.
        patch_size: Patch size in pixels.
        embed_dim: Width ``D``.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: Expert hidden size over ``D``.
        experts_per_modality: Routed experts per modality group.
        shared_experts: Experts every token uses.
        top_k: Routed experts per token.
        router: ``deterministic``, ``pos_embed`` or ``modality``.
        prior_init: Initial own-group logit prior of the ``modality`` router.
        moe_every: Every ``moe_every``-th block has an MoE (0-based block indices
            ``moe_every - 1``, ``2 * moe_every - 1``...); ``1`` = every block.
        pool: ``"cls"`` or ``"mean"``.

    Raises:
        ValueError: for ``moe_every < 1`` or an invalid MoE configuration.
    """

    def __init__(
        self,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        img_size: int = 32,
        patch_size: int = 8,
        embed_dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 1.0,
        experts_per_modality: int = 1,
        shared_experts: int = 1,
        top_k: int = 1,
        router: str = "modality",
        moe_every: int = 1,
        pool: str = "cls",
        prior_init: float = 2.0,
    ) -> None:
        super().__init__(modalities, img_size, patch_size, embed_dim, pool)
        if moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {moe_every}")
        hidden = int(embed_dim * mlp_ratio)
        self.router_kind = router
        self.blocks = nn.ModuleList(
            MAPEXBlock(
                embed_dim,
                num_heads,
                hidden,
                self.modalities,
                moe=(i + 1) % moe_every == 0,
                experts_per_modality=experts_per_modality,
                shared_experts=shared_experts,
                top_k=top_k,
                router=router,
                prior_init=prior_init,
            )
            for i in range(depth)
        )

    def uses_positions(self) -> bool:
        """Only the ``pos_embed`` router reads per-token position embeddings."""
        return any(
            isinstance(b.mlp, MoEMLP) and b.mlp.router.kind == "pos_embed" for b in self.blocks
        )

    def run_block(
        self,
        i: int,
        x: torch.Tensor,
        modality_index: torch.Tensor,
        pos: torch.Tensor | None,
        with_aux: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, RoutingStats | None, torch.Tensor | None]:
        """Run MAPEX block ``i`` with the model's current modalities."""
        block = cast(MAPEXBlock, self.blocks[i])
        x, res = block(x, modality_index, self.modalities, pos, with_aux)
        if res is None:
            return x, None, None, None
        return x, res.aux_loss, res.stats, res.mi_loss


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> MAPEX:
    return MAPEX(**dict(defaults, **overrides))


@register_model(family="mapex", description="MAPEX test size: width 32, depth 2, patch 8, 16 px")
def mapex_test(**kwargs: Any) -> MAPEX:
    """MAPEX test size: width 32, depth 2, 2 heads, patch 8 on 16x16 scenes."""
    return _build(dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2), kwargs)


@register_model(
    family="mapex",
    description="MAPEX CPU study model: width 128, depth 6, patch 8, 32 px, 6x2+1 experts",
)
def mapex_tiny(**kwargs: Any) -> MAPEX:
    """MAPEX tiny: width 128, depth 6, 4 heads, patch 8 on 32x32, 2 experts/modality + 1 shared.

    Two routed experts per modality (top-1) give the learned routers room to differ from the
    deterministic one: with one expert per modality, a router that keeps a modality on its own
    group *is* the deterministic router. The active MLP per token is unchanged (one routed
    expert plus the shared one, hidden ``2 D``).
    """
    return _build(
        dict(
            img_size=32,
            patch_size=8,
            embed_dim=128,
            depth=6,
            num_heads=4,
            experts_per_modality=2,
        ),
        kwargs,
    )


@register_model(
    family="mapex",
    description="MAPEX base: width 768, depth 12, 12 heads, patch 16, 224 px, ~128 M params",
)
def mapex_base(**kwargs: Any) -> MAPEX:
    """MAPEX base: width 768, depth 12, 12 heads, patch 16 on 224x224, 6 + 1 experts of 768."""
    return _build(dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)
