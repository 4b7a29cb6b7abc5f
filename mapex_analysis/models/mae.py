"""Masked autoencoding over all modality tokens (MAE, He et al. 2022, applied per modality).

The objective, split into small steps as in MAE's ``models_mae.py``:

1. :func:`patchify` each modality's *normalised* image (band statistics of
   :mod:`mapex_analysis.modalities`) into ``(B, L, C * p * p)`` targets; with
   ``norm_pix_loss`` each patch is further standardised (MAE's option).
2. :meth:`MaskedAutoencoder.random_masking`: keep a random ``1 - mask_ratio`` of *all* tokens
   of all modalities (one permutation over the concatenated sequence, per sample). With
   ``mask_mode="positions"`` whole patch positions are kept or removed in every modality at
   once (still ``mask_ratio`` of all tokens when every modality covers the same grid), so a
   masked patch can only be inferred from other positions, never copied across modalities
   from the same place.
3. The encoder (any :class:`~mapex_analysis.models.token_model.TokenEncoder`: MAPEX or the
   group-channel ViT) runs on the kept tokens with their true patch positions.
4. A light decoder (timm ``Block``s) sees the kept tokens plus a mask token at every removed
   slot, each tagged with the decoder's own sin-cos position and modality embeddings.
5. A per-modality linear head predicts each token's patch; the loss is the MSE on masked
   tokens, averaged per modality and then over the present modalities (so a 1-band modality
   weighs as much as a 3-band one). The encoder's MoE load-balance loss is added with weight
   ``aux_weight`` and its mutual-information loss with weight ``mi_weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from mapex_analysis.modalities import get_modality, normalize
from mapex_analysis.models.moe import RoutingInfo
from mapex_analysis.models.token_model import TokenEncoder

__all__ = ["MASK_MODES", "MAEOutput", "MaskMode", "MaskedAutoencoder", "patchify"]

#: How :meth:`MaskedAutoencoder.random_masking` draws the removed tokens.
MaskMode = Literal["tokens", "positions"]
MASK_MODES: tuple[str, ...] = get_args(MaskMode)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B, L, C * p * p)``, patches in row-major order (as PatchEmbed).

    Args:
        x: Images with any channel count.
        patch_size: Square patch size ``p`` dividing ``H`` and ``W``.

    Returns:
        Patches, each flattened channel-first.

    Raises:
        ValueError: if ``p`` does not divide the image size.
    """
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"patch size {p} does not divide image size {(H, W)}")
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


@dataclass
class MAEOutput:
    """Result of one masked-autoencoding pass.

    Attributes:
        loss: ``recon_loss + aux_weight * aux_loss + mi_weight * mi_loss`` (what is
            optimised).
        recon_loss: Mean over present modalities of the masked-patch MSE.
        aux_loss: Encoder load-balance loss (0 for dense encoders).
        mi_loss: Encoder mutual-information loss ``-I(M; G)`` (modality vs expert group) summed over MoE layers, nats (0
            for dense encoders and the deterministic router).
        per_modality: Masked-patch MSE of each present modality (detached).
        routing: The encoder's routing information.
        mask: ``(B, N)`` 1 where a token was masked.
        predictions: Per present modality the decoder's ``(B, L, C * p * p)`` patch
            predictions (what slimmable training distils from the full width).
        prediction_masks: Per present modality ``(B, L)``, 1 where the token was masked (the
            tokens its loss scores).
    """

    loss: torch.Tensor
    recon_loss: torch.Tensor
    aux_loss: torch.Tensor
    mi_loss: torch.Tensor
    per_modality: dict[str, torch.Tensor]
    routing: RoutingInfo
    mask: torch.Tensor
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)
    prediction_masks: dict[str, torch.Tensor] = field(default_factory=dict)


class MaskedAutoencoder(nn.Module):
    """MAE wrapper around a token encoder (see the module docstring).

    Args:
        encoder: A :class:`TokenEncoder` (MAPEX or GroupChannelViT).
        decoder_dim: Decoder width.
        decoder_depth: Decoder blocks.
        decoder_heads: Decoder attention heads.
        mask_ratio: Share of tokens removed, in ``[0, 1)``.
        norm_pix_loss: Standardise every target patch (MAE's option).
        aux_weight: Weight of the encoder's load-balance loss.
        mi_weight: Weight of the encoder's mutual-information loss (Mod-Squad; see
            :func:`~mapex_analysis.models.moe.mutual_information_loss`).
        mask_mode: ``"tokens"`` (each token independently) or ``"positions"`` (a patch
            position is masked in all modalities together).

    Raises:
        ValueError: for a mask ratio outside ``[0, 1)`` or an unknown mask mode.
    """

    def __init__(
        self,
        encoder: TokenEncoder,
        *,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        decoder_heads: int = 2,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        aux_weight: float = 0.01,
        mi_weight: float = 0.0,
        mask_mode: str = "tokens",
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if mask_mode not in MASK_MODES:
            raise ValueError(
                f"unknown mask_mode {mask_mode!r}; valid modes: {', '.join(MASK_MODES)}"
            )
        self.mask_mode = mask_mode
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.aux_weight = aux_weight
        self.mi_weight = mi_weight
        p, grid = encoder.patch_size, encoder.img_size // encoder.patch_size
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_modality_embed = nn.ParameterDict(
            {m: nn.Parameter(0.02 * torch.randn(decoder_dim)) for m in encoder.modalities}
        )
        pos = build_sincos2d_pos_embed([grid, grid], decoder_dim).float()  # (L, Dd)
        self.register_buffer("decoder_pos_embed", pos, persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.heads = nn.ModuleDict(
            {
                m: nn.Linear(decoder_dim, get_modality(m).num_bands * p * p)
                for m in encoder.modalities
            }
        )

    def random_masking(
        self,
        n: int,
        batch: int,
        device: torch.device,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample random split of ``n`` token slots.

        Args:
            n: Tokens per sample.
            batch: Batch size.
            device: Device of the indices.
            positions: ``(B, n)`` patch position of every token; required by
                ``mask_mode="positions"``, where all tokens of a position share one draw (ties
                broken by token order), so whole positions are kept first.

        Returns:
            ``(keep, restore)``: ``(B, K)`` indices of kept tokens, ``K = int(n * (1 -
            mask_ratio))`` (at least 1), and ``(B, n)`` the inverse permutation.

        Raises:
            ValueError: for ``mask_mode="positions"`` without ``positions``.
        """
        keep_n = max(1, int(n * (1.0 - self.mask_ratio)))
        if self.mask_mode == "positions":
            if positions is None:
                raise ValueError("mask_mode='positions' needs the tokens' patch positions")
            cells = (self.encoder.img_size // self.encoder.patch_size) ** 2
            rank = torch.rand(batch, cells, device=device).argsort(dim=1).argsort(dim=1)
            # order by the rank of the token's position, then by token order within it
            noise = rank.gather(1, positions) * n + torch.arange(n, device=device)
        else:
            noise = torch.rand(batch, n, device=device)
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        return shuffle[:, :keep_n], restore

    def targets(self, x: Mapping[str, torch.Tensor], modality: str) -> torch.Tensor:
        """Normalised patches ``(B, L, C * p * p)`` of one modality."""
        t = patchify(normalize(modality, x[modality].float()), self.encoder.patch_size)
        if self.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return t

    def forward(self, x: Mapping[str, torch.Tensor]) -> MAEOutput:
        """Mask, encode, decode and score a modality batch in physical units.

        Args:
            x: ``{modality: (B, C, H, W)}``; any non-empty subset of the encoder's modalities.

        Returns:
            :class:`MAEOutput`.
        """
        enc = self.encoder
        tok = enc.tokenizer(x)
        B, N, D = tok.tokens.shape
        keep, restore = self.random_masking(N, B, tok.tokens.device, tok.positions)
        kept = tok.tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, D))  # (B, K, D)
        kept_idx = tok.modality_index.gather(1, keep)
        kept_pos = tok.positions.gather(1, keep)
        latent, routing = enc.encode(kept, kept_idx, positions=kept_pos, return_routing=True)

        h = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        Dd = h.shape[-1]
        fill = self.mask_token.expand(B, N - keep.shape[1], Dd).to(h.dtype)
        seq = torch.cat([h[:, 1:], fill], dim=1)  # shuffled order
        seq = seq.gather(1, restore.unsqueeze(-1).expand(-1, -1, Dd))  # original order (B, N, Dd)
        table = torch.stack([self.decoder_modality_embed[m] for m in tok.modalities])  # (M, Dd)
        pos_table = cast(torch.Tensor, self.decoder_pos_embed)
        seq = seq + table[tok.modality_index] + pos_table.to(h.dtype)[tok.positions]
        seq = torch.cat([h[:, :1], seq], dim=1)
        for blk in self.decoder_blocks:
            seq = blk(seq)
        seq = self.decoder_norm(seq)[:, 1:]  # (B, N, Dd)

        mask = torch.ones(B, N, device=seq.device)
        mask.scatter_(1, keep, 0.0)
        per_mod: dict[str, torch.Tensor] = {}
        preds: dict[str, torch.Tensor] = {}
        pred_masks: dict[str, torch.Tensor] = {}
        losses = []
        for mi, m in enumerate(tok.modalities):
            sel = tok.modality_index[0] == mi  # same layout in every row
            if not bool(sel.any()):
                continue
            pred = self.heads[m](seq[:, sel])  # (B, L, C p p)
            preds[m] = pred
            err = (pred - self.targets(x, m)).pow(2).mean(-1)  # (B, L)
            w = mask[:, sel]
            pred_masks[m] = w
            loss_m = (err * w).sum() / w.sum().clamp(min=1.0)
            per_mod[m] = loss_m.detach()
            losses.append(loss_m)
        recon = torch.stack(losses).mean()
        aux = routing.aux_loss
        mi = routing.mi_loss if routing.mi_loss is not None else aux.new_zeros(())
        return MAEOutput(
            loss=recon + self.aux_weight * aux + self.mi_weight * mi,
            recon_loss=recon,
            aux_loss=aux,
            mi_loss=mi,
            per_modality=per_mod,
            routing=routing,
            mask=mask,
            predictions=preds,
            prediction_masks=pred_masks,
        )
