"""The token-model contract shared by MAPEX and the dense group-channel ViT.

:class:`TokenEncoder` owns the :class:`~mapex_analysis.models.tokenizer.ModalityTokenizer`, the
CLS token, the blocks and the final norm, and implements the project's model contract
(``tokenize``, ``encode``, ``forward_features``, ``forward_head``, ``forward_intermediates``,
``forward``). Subclasses only say how one block runs (:meth:`TokenEncoder.run_block`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from mapex_analysis.models.contract import take_indices
from mapex_analysis.models.moe import RoutingInfo, RoutingStats
from mapex_analysis.models.tokenizer import ModalityTokenizer
from mapex_analysis.options import Pool

__all__ = ["TokenEncoder"]


class TokenEncoder(nn.Module):
    """Base class: tokenizer + CLS + blocks + norm.

    Args:
        modalities: Modalities the model accepts.
        img_size: Square input size in pixels.
        patch_size: Patch size in pixels.
        embed_dim: Token width.
        pool: ``"cls"`` or ``"mean"`` (mean over patch tokens) for :meth:`forward_head`.

    Raises:
        ValueError: for an unknown pool.
    """

    blocks: nn.ModuleList

    def __init__(
        self,
        modalities: Sequence[str],
        img_size: int,
        patch_size: int,
        embed_dim: int,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"unknown pool {pool!r}; valid pools: cls, mean")
        self.tokenizer = ModalityTokenizer(modalities, img_size, patch_size, embed_dim)
        self.tokenizer.owner = type(self).__name__  # named in input errors
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.patch_size = patch_size
        self.img_size = img_size
        self.pool: Pool = cast(Pool, pool)
        self.num_prefix_tokens = 1  # the CLS token

    # -- contract attributes --------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities the model accepts (read from its patch embeddings)."""
        return self.tokenizer.modalities

    @property
    def patch_embed(self) -> nn.ModuleDict:
        """``{modality: timm PatchEmbed}``."""
        return self.tokenizer.patch_embed

    @property
    def modality_embed(self) -> nn.ParameterDict:
        """``{modality: (D,) learned modality embedding}``."""
        return self.tokenizer.modality_embed

    # -- blocks ---------------------------------------------------------------------------
    def uses_positions(self) -> bool:
        """Whether :meth:`run_block` reads the per-token position embedding ``pos``.

        The base blocks do not, so :meth:`encode` skips building ``pos`` (``None``).
        """
        return False

    def run_block(
        self,
        i: int,
        x: torch.Tensor,
        modality_index: torch.Tensor,
        pos: torch.Tensor | None,
        with_aux: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, RoutingStats | None, torch.Tensor | None]:
        """Run block ``i``; return ``(tokens, aux_loss, stats, mi_loss)`` (``None`` each where
        the block has no router).

        The base implementation calls ``self.blocks[i](x)`` (a dense timm ``Block``).
        ``pos`` is ``(B, 1 + N, D)`` when :meth:`uses_positions` says so, else ``None``.
        ``with_aux=False``: the caller does not need the load-balance loss (MoE blocks may
        skip computing it and return ``None``).
        """
        return self.blocks[i](x), None, None, None

    # -- contract methods -----------------------------------------------------------------
    def tokenize(self, x: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, N, D)`` (position + modality embedding added) and ``(B, N)`` indices.

        Args:
            x: ``{modality: (B, C, H, W)}`` in physical units, any non-empty subset of
                :attr:`modalities`.

        Returns:
            ``(tokens, modality_index)``; ``modality_index`` indexes :attr:`modalities`.

        Raises:
            ModalityError: for an unknown modality or an empty dict.
            BandError: for a wrong band count (naming the expected bands).
        """
        t = self.tokenizer(x)
        return t.tokens, t.modality_index

    def _prepare(
        self, tokens: torch.Tensor, modality_index: torch.Tensor, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        B, N, D = tokens.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(tokens.dtype), tokens], dim=1)
        cls_idx = torch.full((B, 1), -1, dtype=torch.long, device=tokens.device)
        idx = torch.cat([cls_idx, modality_index.to(tokens.device)], dim=1)  # (B, 1+N)
        if not self.uses_positions():  # nothing reads it: do not build it on every call
            return x, idx, None
        if positions is None:
            positions = self.tokenizer.positions_from_index(modality_index)
        table = cast(torch.Tensor, self.tokenizer.pos_embed).to(tokens.dtype)
        # index_select on the flattened index: advanced indexing is several times slower on CPU
        pos = table.index_select(0, positions.reshape(-1).to(table.device)).view(B, N, D)
        pos = torch.cat([pos.new_zeros(B, 1, D), pos], dim=1)  # CLS: no position
        return x, idx, pos

    def _run(
        self,
        tokens: torch.Tensor,
        modality_index: torch.Tensor,
        positions: torch.Tensor | None,
        keep: set[int] | None,
        with_aux: bool = True,
    ) -> tuple[torch.Tensor, RoutingInfo, list[torch.Tensor]]:
        x, idx, pos = self._prepare(tokens, modality_index, positions)
        aux = tokens.new_zeros(())
        mi = tokens.new_zeros(())
        stats: list[RoutingStats | None] = []
        inter: list[torch.Tensor] = []
        for i in range(len(self.blocks)):
            x, a, st, b = self.run_block(i, x, idx, pos, with_aux)
            if a is not None:
                aux = aux + a
            if b is not None:
                mi = mi + b
            stats.append(st)
            if keep is not None and i in keep:
                inter.append(x)
        return self.norm(x), RoutingInfo(aux_loss=aux, stats=stats, mi_loss=mi), inter

    def encode(
        self,
        tokens: torch.Tensor,
        modality_index: torch.Tensor,
        *,
        return_routing: bool = False,
        positions: torch.Tensor | None = None,
    ) -> Any:
        """Run the blocks on tokens from :meth:`tokenize` (or a masked subset of them).

        Args:
            tokens: ``(B, N, D)``.
            modality_index: ``(B, N)``.
            return_routing: Also return the :class:`RoutingInfo`.
            positions: ``(B, N)`` patch index of each token; by default derived from the layout
                :meth:`tokenize` produces. Pass it for masked subsets.

        Returns:
            ``(B, 1 + N, D)`` normalised tokens, CLS first; with ``return_routing`` a tuple
            ``(tokens, RoutingInfo)``.
        """
        # the load-balance loss is computed only for a caller that receives it
        out, info, _ = self._run(tokens, modality_index, positions, None, return_routing)
        return (out, info) if return_routing else out

    def forward_features(
        self, x: Mapping[str, torch.Tensor], *, return_routing: bool = False
    ) -> Any:
        """``encode(*tokenize(x))``: ``(B, 1 + N, D)`` (and :class:`RoutingInfo`)."""
        return self.encode(*self.tokenize(x), return_routing=return_routing)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ``(B, 1 + N, D)`` tokens to ``(B, D)`` per :attr:`pool`, then ``head``.

        The encoder is headless (``head`` is the identity), so ``pre_logits`` (stop before
        ``head``, timm's meaning) gives the same features.
        """
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)
        return pooled if pre_logits else cast(torch.Tensor, self.head(pooled))

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pooled features ``(B, D)``."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Mapping[str, torch.Tensor],
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> Any:
        """Tokens ``(B, 1 + N, D)`` after selected blocks (timm's semantics).

        Args:
            x: Modality batch.
            indices: ``None`` (all blocks), an int ``n`` (the last ``n`` blocks) or block
                indices (negative counts from the end); see :func:`take_indices`.
            norm: Apply the final norm to the intermediates.
            intermediates_only: Return only the intermediates.

        Returns:
            ``(final tokens, [one tensor per selected block, in block order])``, or only the
            list with ``intermediates_only``.

        Raises:
            IndexError: for an index or count out of range.
        """
        keep = set(take_indices(len(self.blocks), indices))
        out, _, inter = self._run(*self.tokenize(x), None, keep, with_aux=False)
        if norm:
            inter = [self.norm(t) for t in inter]
        return inter if intermediates_only else (out, inter)
