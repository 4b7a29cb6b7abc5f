"""CROMA (Fuller et al., arXiv 2311.00566) behind the adapter contract.

Wraps :class:`torchgeo.models.CROMA` in one of three variants:

* ``"sar"``: the Sentinel-1 encoder (VV, VH), features = ``sar_GAP`` (GAP-FFN of the mean
  token);
* ``"optical"``: the Sentinel-2 encoder on 12 bands (all but the cirrus band ``B10``, in the
  CROMA / SSL4EO-S12 L2A order ``B01 ... B08, B8A, B09, B11, B12``), features = ``optical_GAP``;
* ``"joint"``: both encoders and the cross-attention joint encoder, features = ``joint_GAP``
  (mean of the joint tokens).

CROMA has no CLS token (``num_prefix_tokens = 0``, ``pool = "mean"``) and uses 2-D ALiBi
attention biases instead of position embeddings. Its blocks are CROMA's own einsum attention and
FFN modules, not timm ``Attention``/``Mlp``: :func:`mapex_analysis.ops.slim_width` refuses it
with a ``TypeError`` naming the adapter class.

The optical encoder's ``B01`` and ``B09`` come from the ``coastal`` and ``atmospheric``
modalities (``B10`` of the latter is not used); fed only the six default modalities, the optical
and joint variants need an explicit ``fill`` policy. Normalisation: the project's per-band statistics
(CROMA's own pipeline normalises per dataset, outside the model).

Upstream checkpoints (``CROMABase_Weights.CROMA_VIT``) are dicts of sub-state-dicts
``{"s1_encoder", "s1_GAP_FFN", "s2_encoder", "s2_GAP_FFN", "joint_encoder"}``; the adapter
flattens them to the CROMA module's keys and loads the parts its variant has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchgeo.models import CROMA
from torchgeo.models.croma import CROMABase_Weights, CROMALarge_Weights, get_2dalibi

from mapex_analysis.models.adapters.base import (
    S2_MODALITIES,
    Adapter,
    FillPolicy,
    build,
    project_normalization,
)
from mapex_analysis.models.registry import register_model
from mapex_analysis.models.weights import WeightsError

__all__ = ["CROMA_OPTICAL_BANDS", "CROMA_SAR_BANDS", "CROMAAdapter", "alibi_bias"]

#: CROMA's 12 Sentinel-2 bands, in its channel order.
CROMA_OPTICAL_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)  # fmt: skip
#: CROMA's Sentinel-1 bands.
CROMA_SAR_BANDS: tuple[str, ...] = ("VV", "VH")

Variant = Literal["sar", "optical", "joint"]
_PARTS = {
    "sar": ("s1_encoder", "s1_GAP_FFN"),
    "optical": ("s2_encoder", "s2_GAP_FFN"),
    "joint": ("s1_encoder", "s1_GAP_FFN", "s2_encoder", "s2_GAP_FFN", "joint_encoder"),
}


def alibi_bias(num_heads: int, num_patches: int) -> Tensor:
    """CROMA's 2-D ALiBi attention bias, vectorised: ``-slope_h * distance(p_a, p_b)``.

    The slopes are read from torchgeo's :func:`~torchgeo.models.croma.get_2dalibi` on a 2x2
    grid (the bias between two neighbouring patches is ``-slope``), the distances are the
    Euclidean distances of the patch grid coordinates in row-major order, as upstream.

    Args:
        num_heads: Attention heads.
        num_patches: Number of patches (a square number).

    Returns:
        ``(1, num_heads, num_patches, num_patches)``.
    """
    side = int(math.sqrt(num_patches))
    slopes = -get_2dalibi(num_heads, 4)[0, :, 0, 1]  # (H,)
    rows, cols = torch.meshgrid(
        torch.arange(side, device=slopes.device),
        torch.arange(side, device=slopes.device),
        indexing="ij",
    )
    pts = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).double()  # (P, 2)
    dist = torch.cdist(pts, pts).float()  # (P, P)
    return (dist.unsqueeze(0) * slopes.view(-1, 1, 1) * -1).unsqueeze(0)


class CROMAAdapter(Adapter):
    """CROMA on modality dicts.

    Args:
        variant: ``"sar"``, ``"optical"`` or ``"joint"``.
        img_size: Input size in pixels (multiple of 8; CROMA's patch size is fixed at 8).
        embed_dim: Width.
        depth: Depth of the optical encoder (the SAR and joint encoders have half).
        num_heads: Heads of the joint encoder and the ALiBi bias (CROMA's encoders use 16).
        fill: Fill policy for missing bands (``None``: error).

    Raises:
        ValueError: for an unknown variant.
    """

    family = "croma"
    model: CROMA

    def __init__(
        self,
        *,
        variant: Variant = "joint",
        img_size: int = 120,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 16,
        fill: FillPolicy | None = None,
    ) -> None:
        if variant not in _PARTS:
            raise ValueError(f"unknown CROMA variant {variant!r}; valid: {sorted(_PARTS)}")
        sar, opt = variant in ("sar", "joint"), variant in ("optical", "joint")
        bands = (CROMA_SAR_BANDS if sar else ()) + (CROMA_OPTICAL_BANDS if opt else ())
        modalities = (S2_MODALITIES if opt else ()) + (("sar",) if sar else ())
        super().__init__(
            modalities=modalities,
            bands=bands,
            normalization=project_normalization(bands),
            pool="mean",
            num_features=embed_dim,
            img_size=img_size,
            patch_size=8,
            num_prefix_tokens=0,
            fill=fill,
        )
        self.variant: Variant = variant
        upstream = ["sar", "optical"] if variant == "joint" else [variant]
        if img_size % 8:
            raise ValueError(f"CROMA needs img_size to be a multiple of 8, got {img_size}")
        # CROMA builds its ALiBi bias in a Python loop over all patch pairs (~1.6 s at 120 px
        # on CPU, ~15 s on the meta device). Build at one patch and set the bias at the real
        # size from alibi_bias(), equal to torchgeo's get_2dalibi (a test checks equality).
        self.model = CROMA(
            modalities=upstream,
            encoder_dim=embed_dim,
            encoder_depth=depth,
            num_heads=num_heads,
            patch_size=8,
            image_size=8,
        )
        self.model.image_size = img_size
        self.model.num_patches = (img_size // 8) ** 2
        self.model.attn_bias = alibi_bias(num_heads, self.model.num_patches)
        self.weight_enums = (*CROMABase_Weights, *CROMALarge_Weights)

    def _encoder(self) -> Any:
        model: Any = self.model  # CROMA's parts are created conditionally (untyped)
        if self.variant == "sar":
            return model.s1_encoder.transformer
        if self.variant == "optical":
            return model.s2_encoder.transformer
        return model.joint_encoder

    @property
    def blocks(self) -> nn.ModuleList:
        """The active encoder's transformer layers (``[attention, feed-forward]`` pairs, not
        timm blocks: width slimming does not apply to CROMA)."""
        layers: nn.ModuleList = self._encoder().layers
        return layers

    def _intermediate_points(self) -> list[tuple[nn.Module, Literal["in", "out"]]]:
        # Layer i's output is the input of layer i + 1's self-attention; the last one's is the
        # input of the final norm (the residual sum is never a module output of its own).
        enc = self._encoder()
        layers = list(enc.layers)
        points: list[tuple[nn.Module, Literal["in", "out"]]] = [
            (layer[0], "in") for layer in layers[1:]
        ]
        points.append((enc.norm_out, "in"))
        return points

    def _split(self, inp: Tensor) -> dict[str, Tensor]:
        n_sar = len(CROMA_SAR_BANDS) if self.variant in ("sar", "joint") else 0
        out: dict[str, Tensor] = {}
        if n_sar:
            out["x_sar"] = inp[:, :n_sar]
        if self.variant in ("optical", "joint"):
            out["x_optical"] = inp[:, n_sar:]
        return out

    def _upstream_tokens(self, x: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        inp, _ = self.prepare_input(x)
        out = self.model(**self._split(inp))
        prefix = {"sar": "sar", "optical": "optical", "joint": "joint"}[self.variant]
        return out[f"{prefix}_encodings"], out[f"{prefix}_GAP"]

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """CROMA's pooling: GAP-FFN of the mean token (sar/optical) or the mean (joint).

        Args:
            tokens: ``(B, N, D)`` from :meth:`forward_features`.
            pre_logits: Kept for the contract; there is no classifier.

        Returns:
            ``(B, D)``.
        """
        mean = tokens.mean(dim=1)
        model: Any = self.model
        if self.variant == "sar":
            out: Tensor = model.s1_GAP_FFN(mean)
            return out
        if self.variant == "optical":
            out = model.s2_GAP_FFN(mean)
            return out
        return mean

    def _convert_state(self, state: dict[str, Any]) -> dict[str, Tensor]:
        nested = {k for k, v in state.items() if isinstance(v, Mapping)}
        if not nested:
            return super()._convert_state(state)
        flat: dict[str, Tensor] = {}
        needed = _PARTS[self.variant]
        absent = [p for p in needed if p not in state]
        if absent:
            raise WeightsError(
                f"CROMA checkpoint lacks parts {absent} needed by variant {self.variant!r}; "
                f"it has {sorted(state)}"
            )
        for part in needed:
            sub = state[part]
            for k, v in sub.items():
                if not isinstance(v, Tensor):
                    raise WeightsError(f"CROMA checkpoint entry {part}.{k} is not a tensor")
                flat[f"{part}.{k}"] = v
        # The ALiBi bias is a buffer computed from the configuration, not stored upstream.
        bias: Any = self.model.attn_bias
        flat.setdefault("attn_bias", bias.detach().clone())
        return flat


def _croma(variant: Variant, weights: str | Path | None, kwargs: dict[str, Any]) -> CROMAAdapter:
    return build(CROMAAdapter, weights, **{"variant": variant, **kwargs})  # type: ignore[return-value]


_TEST = dict(img_size=16, embed_dim=32, depth=2, num_heads=16)


@register_model(family="croma", accepts_weights=True, description="CROMA test size, joint")
def croma_test(weights: str | Path | None = None, **kwargs: Any) -> CROMAAdapter:
    """CROMA at a tiny random-init size for tests (16 px, width 32, depth 2; joint)."""
    return _croma(kwargs.pop("variant", "joint"), weights, {**_TEST, **kwargs})


@register_model(
    family="croma",
    accepts_weights=True,
    weights="torchgeo CROMABase_Weights.CROMA_VIT or a local file",
    description="CROMA-B Sentinel-1 encoder (VV, VH), 120 px",
)
def croma_base_sar(weights: str | Path | None = None, **kwargs: Any) -> CROMAAdapter:
    """CROMA-Base, SAR encoder only."""
    return _croma("sar", weights, kwargs)


@register_model(
    family="croma",
    accepts_weights=True,
    weights="torchgeo CROMABase_Weights.CROMA_VIT or a local file",
    description="CROMA-B Sentinel-2 encoder (12 bands incl. coastal B01, B09), 120 px",
)
def croma_base_optical(weights: str | Path | None = None, **kwargs: Any) -> CROMAAdapter:
    """CROMA-Base, optical encoder only."""
    return _croma("optical", weights, kwargs)


@register_model(
    family="croma",
    accepts_weights=True,
    weights="torchgeo CROMABase_Weights.CROMA_VIT or a local file",
    description="CROMA-B joint SAR + optical encoder, 120 px",
)
def croma_base(weights: str | Path | None = None, **kwargs: Any) -> CROMAAdapter:
    """CROMA-Base, joint (SAR + optical + cross-attention) encoder."""
    return _croma("joint", weights, kwargs)
