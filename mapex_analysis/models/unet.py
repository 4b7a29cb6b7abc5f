"""A U-Net baseline for segmentation, trained from scratch (the seed's land-cover segmentation
table compares MAPEX with a U-Net).

:class:`ModalityUNet` feeds any subset of its modalities: each modality is normalised
(:func:`mapex_analysis.modalities.normalize`) and projected by its own 1x1 convolution to
``stem_channels``; the projections of the modalities fed are summed (a missing modality costs
nothing and contributes nothing) and go through a ``segmentation_models_pytorch`` U-Net whose
encoder is a timm ResNet (``tu-<name>``; only the stages the encoder depth uses are built).

It follows the parts of the model contract a supervised baseline needs: ``modalities``,
``num_features``, ``img_size``, ``forward(x) -> (B, D)`` (decoder features averaged over the
image: a classification head can sit on it) and ``forward_dense(x) -> (B, D, H, W)`` (per-pixel
decoder features at the input resolution; :func:`mapex_analysis.eval.finetune.finetune` puts its
segmentation head there). It has no transformer blocks: the operators do not apply to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from mapex_analysis.modalities import check_inputs, get_modality, normalize
from mapex_analysis.models.registry import register_model
from mapex_analysis.options import DEFAULT_MODALITIES

__all__ = ["ModalityUNet", "unet_tiny"]


class ModalityUNet(nn.Module):
    """U-Net over a modality dict (see the module docstring).

    Args:
        modalities: Modalities accepted, in model order.
        img_size: Square input size in pixels (a multiple of ``2 ** encoder_depth``).
        encoder: timm encoder name (``resnet18``, ``resnet10t``...), random init.
        encoder_depth: Encoder stages used (each halves the resolution).
        decoder_channels: Decoder widths, one per stage; the last is ``num_features``.
        stem_channels: Width of the summed per-modality projections.
    """

    pool = "mean"
    num_prefix_tokens = 0

    def __init__(
        self,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        *,
        img_size: int = 32,
        encoder: str = "resnet18",
        encoder_depth: int = 3,
        decoder_channels: Sequence[int] = (64, 32, 16),
        stem_channels: int = 32,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != encoder_depth:
            raise ValueError(
                f"decoder_channels needs one width per encoder stage ({encoder_depth}), "
                f"got {list(decoder_channels)}"
            )
        if img_size % 2**encoder_depth:
            raise ValueError(f"img_size {img_size} is not a multiple of 2**{encoder_depth}")
        self.modalities = tuple(modalities)
        self.img_size = img_size
        self.patch_size = 1
        self.num_features = int(decoder_channels[-1])
        self.stem = nn.ModuleDict(
            {m: nn.Conv2d(get_modality(m).num_bands, stem_channels, 1) for m in self.modalities}
        )
        net = smp.Unet(
            f"tu-{encoder}",
            encoder_weights=None,
            encoder_depth=encoder_depth,
            decoder_channels=tuple(decoder_channels),
            in_channels=stem_channels,
            classes=self.num_features,
        )
        # the per-pixel decoder features are the output; the task head is the fine-tuner's
        net.segmentation_head = nn.Identity()  # type: ignore[assignment]
        self.net = net

    def forward_dense(self, x: Mapping[str, Tensor]) -> Tensor:
        """Per-pixel decoder features ``(B, num_features, H, W)``."""
        check_inputs(x, where=type(self).__name__)
        fed = [m for m in self.modalities if m in x]
        if not fed:
            raise ValueError(
                f"{type(self).__name__} takes {', '.join(self.modalities)}; got {', '.join(x)}"
            )
        h = torch.stack([self.stem[m](normalize(m, x[m].float())) for m in fed]).sum(dim=0)
        out: Tensor = self.net(h)
        return out

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        """Decoder features averaged over the image, ``(B, num_features)``."""
        return self.forward_dense(x).mean(dim=(2, 3))


@register_model(family="unet", description="U-Net (timm ResNet-18 encoder, depth 3), 32 px")
def unet_tiny(**kwargs: Any) -> ModalityUNet:
    """U-Net baseline of about the tiny ViTs' size: timm ResNet-18 encoder, 3 stages,
    decoder 64/32/16, on 32x32 inputs (about 1.0 M parameters)."""
    return ModalityUNet(**kwargs)
