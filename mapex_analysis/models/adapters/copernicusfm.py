"""Copernicus-FM (Wang et al., arXiv 2503.11849) behind the adapter contract.

Wraps :class:`torchgeo.models.CopernicusFM` in its ``"spectral"`` input mode: the patch
embedding is generated from each channel's centre wavelength and bandwidth **in nanometres**.
Optical centre wavelengths come from :func:`mapex_analysis.modalities.wavelengths` (never typed
by hand). Bandwidths are not in the band table; :data:`S2_BANDWIDTH_NM` holds the Sentinel-2
MSI spectral widths (ESA spec, rounded as the Copernicus-FM examples use them: B, G, R, NIR =
65, 35, 30, 115 nm). Sentinel-1 (VV, VH) has no optical wavelength: the adapter passes the
Copernicus-FM convention for C-band SAR, a centre of ``5e7`` nm and a bandwidth of ``1e9`` nm
(constructor arguments ``sar_wavelength_nm``/``sar_bandwidth_nm``; C-band at 5.405 GHz is
5.55e7 nm). Elevation is not accepted (Copernicus-FM embeds non-spectral variables from a
language-model embedding of their name, which this project does not have).

Metadata (longitude, latitude, time, area) is passed as unknown (NaN), so Copernicus-FM uses its
learned "unknown" tokens. Pooling: ``global_pool`` (mean of the patch tokens, then ``fc_norm``);
``pool = "mean"``. ``forward_features`` returns the last block's output. Normalisation: the
project's per-band statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchgeo.models import CopernicusFM
from torchgeo.models.copernicusfm import CopernicusFM_Base_Weights

from mapex_analysis.modalities import get_band, wavelengths
from mapex_analysis.models.adapters.base import (
    Adapter,
    FillPolicy,
    build,
    modality_bands,
    project_normalization,
)
from mapex_analysis.models.registry import register_model

__all__ = ["S2_BANDWIDTH_NM", "CopernicusFMAdapter"]

#: Sentinel-2 MSI spectral bandwidths (nm).
S2_BANDWIDTH_NM: dict[str, float] = {
    "B01": 20.0, "B02": 65.0, "B03": 35.0, "B04": 30.0, "B05": 15.0, "B06": 15.0,
    "B07": 20.0, "B08": 115.0, "B8A": 20.0, "B09": 20.0, "B10": 30.0, "B11": 90.0,
    "B12": 180.0,
}  # fmt: skip

_MODALITIES: tuple[str, ...] = ("rgb", "red_edge", "nir", "swir", "sar")


class CopernicusFMAdapter(Adapter):
    """Copernicus-FM on modality dicts: wavelengths and bandwidths in nm, any band subset.

    Args:
        img_size: Input size in pixels.
        patch_size: Patch size.
        embed_dim: Width.
        depth: Number of blocks.
        num_heads: Attention heads.
        hyper_dim: Width of the spectral hypernetwork.
        modalities: Accepted modalities (subset of rgb, red_edge, nir, swir, sar).
        sar_wavelength_nm: Centre wavelength passed for VV and VH.
        sar_bandwidth_nm: Bandwidth passed for VV and VH.
        fill: Not used (any band subset is taken); accepted for a uniform API.
    """

    family = "copernicusfm"
    model: CopernicusFM
    variable_bands = True
    optional_keys = frozenset({"fc_norm.weight", "fc_norm.bias"})

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        hyper_dim: int = 128,
        modalities: Sequence[str] = _MODALITIES,
        sar_wavelength_nm: float = 5e7,
        sar_bandwidth_nm: float = 1e9,
        fill: FillPolicy | None = None,
    ) -> None:
        bands = modality_bands(modalities)
        super().__init__(
            modalities=modalities,
            bands=bands,
            normalization=project_normalization(bands),
            pool="mean",
            num_features=embed_dim,
            img_size=img_size,
            patch_size=patch_size,
            fill=fill,
        )
        self.sar_wavelength_nm = float(sar_wavelength_nm)
        self.sar_bandwidth_nm = float(sar_bandwidth_nm)
        self.model = CopernicusFM(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            hyper_dim=hyper_dim,
            num_classes=0,
            global_pool=True,
        )
        self.weight_enums = tuple(CopernicusFM_Base_Weights)

    def spectral_inputs(self, bands: Sequence[str]) -> tuple[list[float], list[float]]:
        """Centre wavelengths and bandwidths (nm) passed for ``bands``.

        Optical wavelengths come from the band table; SAR bands get the declared C-band values.
        """
        wl: list[float] = []
        bw: list[float] = []
        for b in bands:
            if get_band(b).wavelength_nm is None:
                wl.append(self.sar_wavelength_nm)
                bw.append(self.sar_bandwidth_nm)
            else:
                wl.extend(wavelengths([b], unit="nm"))
                bw.append(S2_BANDWIDTH_NM[b])
        return wl, bw

    def _upstream_tokens(self, x: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        inp, bands = self.prepare_input(x)
        wl_nm, bw_nm = self.spectral_inputs(bands)
        metadata = torch.full((inp.shape[0], 4), float("nan"), device=inp.device)  # unknown
        return self._run_reading(
            self.blocks[-1],
            lambda: self.model(
                inp, metadata, wavelengths=wl_nm, bandwidths=bw_nm, input_mode="spectral"
            ),
        )

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """Copernicus-FM's global pool: mean of the patch tokens, then ``fc_norm``.

        Args:
            tokens: ``(B, 1 + N, D)`` from :meth:`forward_features`.
            pre_logits: Kept for the contract; there is no classifier.

        Returns:
            ``(B, D)``.
        """
        return self.model.fc_norm(tokens[:, self.num_prefix_tokens :].mean(dim=1))


@register_model(family="copernicusfm", accepts_weights=True, description="Copernicus-FM test size")
def copernicusfm_test(weights: str | Path | None = None, **kwargs: Any) -> CopernicusFMAdapter:
    """Copernicus-FM at a tiny random-init size for tests (32 px, patch 8, width 32, depth 2)."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, hyper_dim=32)
    return build(CopernicusFMAdapter, weights, **{**cfg, **kwargs})  # type: ignore[return-value]


@register_model(
    family="copernicusfm",
    accepts_weights=True,
    weights="torchgeo CopernicusFM_Base_Weights.CopernicusFM_ViT or a local file",
    description="Copernicus-FM ViT-B/16, 224 px, spectral mode",
)
def copernicusfm_base(weights: str | Path | None = None, **kwargs: Any) -> CopernicusFMAdapter:
    """Copernicus-FM ViT-Base/16 at 224 px."""
    return build(CopernicusFMAdapter, weights, **kwargs)  # type: ignore[return-value]
