"""DOFA (Dynamic One-For-All, Xiong et al., arXiv 2403.15356) behind the adapter contract.

Wraps :class:`torchgeo.models.DOFA`. DOFA's patch embedding is generated from the centre
wavelength of every input channel, so it takes any subset of the optical bands: the adapter feeds
the bands of the modalities present and passes their wavelengths **in micrometres**, taken from
:func:`mapex_analysis.modalities.wavelengths` (never typed by hand). SAR and elevation have no
centre wavelength in the band table and are not accepted.

Pooling: DOFA's ``global_pool`` (mean of the patch tokens after the last block, then
``fc_norm``); ``pool = "mean"``. ``forward_features`` returns the last block's output
``(B, 1 + N, D)`` (DOFA applies its norm after pooling). Normalisation: the published weights
leave normalisation to the user (sensor-dependent), so the project's per-band statistics are
used.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor
from torchgeo.models import DOFA
from torchgeo.models.dofa import DOFABase16_Weights, DOFALarge16_Weights

from mapex_analysis.modalities import wavelengths
from mapex_analysis.models.adapters.base import (
    Adapter,
    FillPolicy,
    build,
    modality_bands,
    project_normalization,
)
from mapex_analysis.models.registry import register_model

__all__ = ["DOFAAdapter", "OPTICAL_MODALITIES"]

#: The project's modalities that have centre wavelengths.
OPTICAL_MODALITIES: tuple[str, ...] = ("rgb", "red_edge", "nir", "swir")


class DOFAAdapter(Adapter):
    """DOFA on modality dicts: wavelengths in µm from the band table, any optical subset.

    Args:
        img_size: Input size in pixels.
        patch_size: Patch size.
        embed_dim: Width.
        depth: Number of blocks.
        num_heads: Attention heads.
        dynamic_embed_dim: Width of the wavelength-conditioned weight generator.
        modalities: Accepted modalities (a subset of :data:`OPTICAL_MODALITIES`).
        fill: Not used by DOFA (it takes any band subset); accepted for a uniform API.
    """

    family = "dofa"
    model: DOFA
    variable_bands = True
    #: DOFA's MAE checkpoints have no fc_norm (torchgeo's loader allows the same).
    optional_keys = frozenset({"fc_norm.weight", "fc_norm.bias"})

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        dynamic_embed_dim: int = 128,
        modalities: tuple[str, ...] = OPTICAL_MODALITIES,
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
        self.model = DOFA(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            dynamic_embed_dim=dynamic_embed_dim,
            num_classes=0,
            global_pool=True,
        )
        self.weight_enums = (*DOFABase16_Weights, *DOFALarge16_Weights)

    def _upstream_tokens(self, x: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        inp, bands = self.prepare_input(x)
        wl_um = wavelengths(bands, unit="um")
        # (B, D) pooled; head is Identity
        return self._run_reading(self.blocks[-1], lambda: self.model(inp, wavelengths=wl_um))

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """DOFA's global pool: mean of the patch tokens, then ``fc_norm``.

        Args:
            tokens: ``(B, 1 + N, D)`` from :meth:`forward_features`.
            pre_logits: Kept for the contract; there is no classifier.

        Returns:
            ``(B, D)``.
        """
        return self.model.fc_norm(tokens[:, self.num_prefix_tokens :].mean(dim=1))


def _dofa(weights: str | Path | None, defaults: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    return build(DOFAAdapter, weights, **{**defaults, **kwargs})


@register_model(
    family="dofa", accepts_weights=True, description="DOFA test size (width 32, depth 2)"
)
def dofa_test(weights: str | Path | None = None, **kwargs: Any) -> DOFAAdapter:
    """DOFA at a tiny random-init size for tests (32 px, patch 8, width 32, depth 2)."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return _dofa(weights, cfg, kwargs)


@register_model(
    family="dofa",
    accepts_weights=True,
    weights="torchgeo DOFABase16_Weights.DOFA_MAE or a local file",
    description="DOFA ViT-B/16, 224 px (~111 M parameters)",
)
def dofa_base(weights: str | Path | None = None, **kwargs: Any) -> DOFAAdapter:
    """DOFA ViT-Base/16 at 224 px."""
    cfg = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _dofa(weights, cfg, kwargs)


@register_model(
    family="dofa",
    accepts_weights=True,
    weights="torchgeo DOFALarge16_Weights.DOFA_MAE or a local file",
    description="DOFA ViT-L/16, 224 px (~337 M parameters)",
)
def dofa_large(weights: str | Path | None = None, **kwargs: Any) -> DOFAAdapter:
    """DOFA ViT-Large/16 at 224 px."""
    cfg = dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _dofa(weights, cfg, kwargs)
