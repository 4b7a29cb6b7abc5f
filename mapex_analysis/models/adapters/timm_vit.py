"""timm Vision Transformers behind the adapter contract.

:class:`TimmViTAdapter` wraps any :class:`timm.models.vision_transformer.VisionTransformer`
(plain timm ViTs here; torchgeo's ScaleMAE and SSL4EO ViTs subclass or build the same class) and
calls its own ``forward_features`` (tokens after the final norm, prefix tokens first) and
``forward_head(tokens, pre_logits=True)`` (timm's ``global_pool``: ``"token"`` -> CLS, ``"avg"``
-> mean of the patch tokens). Blocks are timm ``Block``s, so :func:`mapex_analysis.ops.slim_width`
applies.

Registered: ``timm_vit_test`` (tiny), ``timm_vit_small`` and ``timm_vit_base`` (ViT-S/16 and
ViT-B/16 at 224 px, RGB with ImageNet statistics: reflectance in [0, 1] is taken as image
intensity, the usual practice for ImageNet models on Sentinel-2 RGB). Weights: a local
checkpoint file in timm's key format (timm's hub download is not used).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from mapex_analysis.modalities import bands_of
from mapex_analysis.models.adapters.base import (
    Adapter,
    FillPolicy,
    Normalization,
    build,
    project_normalization,
)
from mapex_analysis.models.registry import register_model

__all__ = ["IMAGENET_RGB", "TimmViTAdapter", "TimmModelAdapter"]

#: ImageNet mean/std (timm's ``IMAGENET_DEFAULT_MEAN/STD``) on the R, G, B bands of Sentinel-2.
IMAGENET_RGB = Normalization(
    "imagenet (reflectance as [0, 1] intensity)",
    dict(zip(bands_of("rgb"), timm.data.IMAGENET_DEFAULT_MEAN, strict=True)),
    dict(zip(bands_of("rgb"), timm.data.IMAGENET_DEFAULT_STD, strict=True)),
)


class TimmViTAdapter(Adapter):
    """Adapter over a timm ``VisionTransformer`` built by a subclass (``self.model``).

    Subclasses call :meth:`_init_vit` after building the model.
    """

    family = "timm"
    model: VisionTransformer
    #: A checkpoint may lack the final norm / classifier (encoders saved without them).
    optional_keys = frozenset({"norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias"})
    #: A classifier in the checkpoint is dropped: adapters are built without one.
    unused_keys = frozenset({"head.weight", "head.bias"})

    def _init_vit(self, model: VisionTransformer) -> None:
        self.model = model

    @staticmethod
    def _pool_of(model: VisionTransformer) -> str:
        pool = model.global_pool
        if pool == "token":
            return "cls"
        if pool == "avg":
            return "mean"
        raise ValueError(f"timm global_pool {pool!r} is not supported; use 'token' or 'avg'")

    def _upstream_tokens(self, x: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        inp, _ = self.prepare_input(x)
        tokens = self.model.forward_features(inp)  # (B, prefix + N, D), normed
        return tokens, self.model.forward_head(tokens, pre_logits=True)

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's own pooling (``global_pool``) of the final tokens.

        Args:
            tokens: ``(B, prefix + N, D)`` from :meth:`forward_features`.
            pre_logits: Kept for the contract; the adapter has no classifier.

        Returns:
            ``(B, D)``.
        """
        return self.model.forward_head(tokens, pre_logits=True)


class TimmModelAdapter(TimmViTAdapter):
    """A timm ViT created by name (``timm.create_model``), random init.

    Args:
        model_name: timm model name (a ``VisionTransformer``).
        modalities: Modalities fed, their bands concatenated in order.
        normalization: Statistics; default ImageNet for ``("rgb",)``, else the project's.
        fill: Fill policy for missing bands (``None``: error).
        **timm_kwargs: Passed to ``timm.create_model`` (``img_size``, ``embed_dim``...).

    Raises:
        TypeError: if the timm model is not a ``VisionTransformer``.
    """

    def __init__(
        self,
        *,
        model_name: str,
        modalities: Sequence[str] = ("rgb",),
        normalization: Normalization | None = None,
        fill: FillPolicy | None = None,
        **timm_kwargs: Any,
    ) -> None:
        bands = tuple(b for m in modalities for b in bands_of(m))
        model = timm.create_model(
            model_name, pretrained=False, num_classes=0, in_chans=len(bands), **timm_kwargs
        )
        if not isinstance(model, VisionTransformer):
            raise TypeError(
                f"timm model {model_name!r} is a {type(model).__name__}, not a VisionTransformer"
            )
        if normalization is None:
            rgb_only = tuple(modalities) == ("rgb",)
            normalization = IMAGENET_RGB if rgb_only else project_normalization(bands)
        super().__init__(
            modalities=modalities,
            bands=bands,
            normalization=normalization,
            pool=self._pool_of(model),  # type: ignore[arg-type]
            num_features=model.num_features,
            img_size=int(model.patch_embed.img_size[0]),
            patch_size=int(model.patch_embed.patch_size[0]),
            num_prefix_tokens=model.num_prefix_tokens,
            fill=fill,
        )
        self.model_name = model_name
        self._init_vit(model)


def _timm(weights: str | Path | None, defaults: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    return build(TimmModelAdapter, weights, **{**defaults, **kwargs})


@register_model(family="timm", accepts_weights=True, description="timm ViT test size")
def timm_vit_test(weights: str | Path | None = None, **kwargs: Any) -> TimmModelAdapter:
    """timm ViT at a tiny random-init size for tests (32 px, patch 8, width 32, depth 2)."""
    cfg = dict(
        model_name="vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    return _timm(weights, cfg, kwargs)


@register_model(
    family="timm",
    accepts_weights=True,
    weights="local timm checkpoint file",
    description="timm ViT-S/16, 224 px, RGB",
)
def timm_vit_small(weights: str | Path | None = None, **kwargs: Any) -> TimmModelAdapter:
    """timm ``vit_small_patch16_224`` on Sentinel-2 RGB."""
    return _timm(weights, dict(model_name="vit_small_patch16_224"), kwargs)


@register_model(
    family="timm",
    accepts_weights=True,
    weights="local timm checkpoint file",
    description="timm ViT-B/16, 224 px, RGB (the slimmability paper's CV baseline)",
)
def timm_vit_base(weights: str | Path | None = None, **kwargs: Any) -> TimmModelAdapter:
    """timm ``vit_base_patch16_224`` on Sentinel-2 RGB."""
    return _timm(weights, dict(model_name="vit_base_patch16_224"), kwargs)
