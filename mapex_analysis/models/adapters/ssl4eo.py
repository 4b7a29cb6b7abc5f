"""SSL4EO-S12 ViTs (Wang et al., arXiv 2211.07044) behind the adapter contract.

torchgeo's SSL4EO-S12 ViT-S/16 weights are timm ``vit_small_patch16_224`` state dicts for 13
Sentinel-2 top-of-atmosphere bands (``B1`` ... ``B12`` incl. ``B8A`` and ``B10``, the order of
the weights' ``meta["bands"]``) or 2 Sentinel-1 bands (VV, VH). The adapter builds the timm
model through torchgeo's ``vit_small_patch16_224`` entry point and feeds the bands in the
weights' order.

Normalisation follows the published transforms: Sentinel-2 weights take digital numbers /
10,000, i.e. reflectance as is (mean 0, std 1 in the project's reflectance unit); Sentinel-1
weights standardise dB with the SSL4EO-S12 statistics torchgeo ships. The project's six
six default modalities carry 10 of the 13 Sentinel-2 bands; ``coastal`` (``B01``) and
``atmospheric`` (``B09``, ``B10``) carry the other three, so the S2 model takes real 13-band data
(EuroSAT, MMEarth) as it is. Fed only the default modalities it needs an explicit
``fill="mean"`` or ``fill="zeros"``, otherwise the missing bands are an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torchgeo.models import ViTSmall16_Weights
from torchgeo.models import vit_small_patch16_224 as tg_vit_small
from torchgeo.models.resnet import _mean_s1, _sentinel1_grd_bands, _sentinel2_toa_bands, _std_s1

from mapex_analysis.models.adapters.base import (
    S2_MODALITIES,
    FillPolicy,
    Normalization,
    build,
    torchgeo_band,
)
from mapex_analysis.models.adapters.timm_vit import TimmViTAdapter
from mapex_analysis.models.registry import register_model

__all__ = ["S1_BANDS", "S2_BANDS", "SSL4EOViTAdapter"]

#: The 13 Sentinel-2 bands of the SSL4EO-S12 weights, as project band names, in their order.
S2_BANDS: tuple[str, ...] = tuple(torchgeo_band(b) for b in _sentinel2_toa_bands)
#: The Sentinel-1 bands of the SSL4EO-S12 weights.
S1_BANDS: tuple[str, ...] = tuple(torchgeo_band(b) for b in _sentinel1_grd_bands)

_S2_NORM = Normalization(
    "ssl4eo-s12 (digital numbers / 10,000 = reflectance)",
    dict.fromkeys(S2_BANDS, 0.0),
    dict.fromkeys(S2_BANDS, 1.0),
)
_S1_NORM = Normalization(
    "ssl4eo-s12 Sentinel-1 dB statistics",
    dict(zip(S1_BANDS, _mean_s1, strict=True)),
    dict(zip(S1_BANDS, _std_s1, strict=True)),
)


class SSL4EOViTAdapter(TimmViTAdapter):
    """The SSL4EO-S12 ViT-S/16 on Sentinel-2 (13 bands) or Sentinel-1 (VV, VH).

    Args:
        sensor: ``"s2"`` or ``"s1"``.
        fill: Fill policy for bands no fed modality carries (``None``: error).
        **timm_kwargs: Overrides for the timm model (``img_size``, ``embed_dim``...).
    """

    family = "ssl4eo"

    def __init__(
        self,
        *,
        sensor: Literal["s2", "s1"] = "s2",
        fill: FillPolicy | None = None,
        **timm_kwargs: Any,
    ) -> None:
        if sensor not in ("s2", "s1"):
            raise ValueError(f"unknown sensor {sensor!r}; valid: 's2', 's1'")
        bands = S2_BANDS if sensor == "s2" else S1_BANDS
        modalities = S2_MODALITIES if sensor == "s2" else ("sar",)
        model: Any = tg_vit_small(None, in_chans=len(bands), num_classes=0, **timm_kwargs)
        super().__init__(
            modalities=modalities,
            bands=bands,
            normalization=_S2_NORM if sensor == "s2" else _S1_NORM,
            pool=self._pool_of(model),  # type: ignore[arg-type]
            num_features=model.num_features,
            img_size=int(model.patch_embed.img_size[0]),
            patch_size=int(model.patch_embed.patch_size[0]),
            num_prefix_tokens=model.num_prefix_tokens,
            fill=fill,
        )
        self.sensor = sensor
        self._init_vit(model)
        self.weight_enums = tuple(
            w
            for w in list(ViTSmall16_Weights)  # type: ignore[call-overload]
            if tuple(w.meta.get("bands", ()))
            == tuple(_sentinel2_toa_bands if sensor == "s2" else _sentinel1_grd_bands)
        )


_TEST = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@register_model(family="ssl4eo", accepts_weights=True, description="SSL4EO ViT test size, S2")
def ssl4eo_test(weights: str | Path | None = None, **kwargs: Any) -> SSL4EOViTAdapter:
    """SSL4EO-S12 ViT at a tiny random-init size for tests (13 S2 bands, 32 px, width 32)."""
    return build(SSL4EOViTAdapter, weights, **{**_TEST, **kwargs})  # type: ignore[return-value]


@register_model(
    family="ssl4eo",
    accepts_weights=True,
    weights="torchgeo ViTSmall16_Weights.SENTINEL2_ALL_{MOCO,DINO,MAE,...} or a local file",
    description="SSL4EO-S12 ViT-S/16, 13 Sentinel-2 bands (coastal and atmospheric included)",
)
def ssl4eo_vit_small(weights: str | Path | None = None, **kwargs: Any) -> SSL4EOViTAdapter:
    """SSL4EO-S12 ViT-Small/16 on 13 Sentinel-2 bands, 224 px."""
    return build(SSL4EOViTAdapter, weights, **{"sensor": "s2", **kwargs})  # type: ignore[return-value]


@register_model(
    family="ssl4eo",
    accepts_weights=True,
    weights="torchgeo ViTSmall16_Weights.SENTINEL1_GRD_{MAE,FGMAE,...} or a local file",
    description="SSL4EO-S12 ViT-S/16, Sentinel-1 VV/VH",
)
def ssl4eo_vit_small_s1(weights: str | Path | None = None, **kwargs: Any) -> SSL4EOViTAdapter:
    """SSL4EO-S12 ViT-Small/16 on Sentinel-1 VV, VH, 224 px."""
    return build(SSL4EOViTAdapter, weights, **{"sensor": "s1", **kwargs})  # type: ignore[return-value]
