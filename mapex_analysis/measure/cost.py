"""The cost of a model variant in one call: MACs and parameters on example inputs.

:func:`measure_cost` is what ``mapex-study macs MODEL [--width S] [--modalities ...]`` runs: it
builds the model (any source :func:`mapex_analysis.create_model` takes), optionally slims it
to width ``s``, builds example inputs in physical units for the selected modalities, and
returns the :class:`~mapex_analysis.measure.macs.MacsReport` (with the per-modality breakdown
and the two-counter cross-check) and the :class:`~mapex_analysis.measure.params.ParamsReport`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mapex_analysis.device import device_name, resolve_device
from mapex_analysis.factory import create_model
from mapex_analysis.measure.macs import MacsReport, count_macs
from mapex_analysis.measure.params import ParamsReport, count_params
from mapex_analysis.modalities import ModalityError, get_modality
from mapex_analysis.models.adapters.base import Adapter
from mapex_analysis.ops.slim import slim_width

__all__ = ["CostReport", "example_inputs", "measure_cost"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CostReport:
    """MACs and parameters of one model variant.

    Attributes:
        model: What was measured (registry name, checkpoint path or ``timm/<name>``).
        width: Slimming width ``s`` applied (``None``: not slimmed).
        modalities: Modalities fed (empty for models without modalities).
        batch_size: Batch size of the example inputs; MACs are for the whole batch.
        macs: The MACs report.
        params: The parameter report (active parameters for ``modalities``).
        filled: Bands the model needed that the fed modalities lack, supplied by ``fill``.
        fill: The fill policy (``zeros`` or ``mean``), if one was asked for.
        device: Name of the device the counted passes ran on.
    """

    model: str
    width: float | None
    modalities: tuple[str, ...]
    batch_size: int
    macs: MacsReport
    params: ParamsReport
    filled: tuple[str, ...] = ()
    fill: str | None = None
    device: str = ""


def _img_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model, "img_size", None)
    if size is None:
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        raise ValueError(
            f"{type(model).__name__} declares no img_size; pass explicit inputs to count_macs"
        )
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def example_inputs(
    model: nn.Module,
    *,
    batch_size: int = 1,
    modalities: Sequence[str] | None = None,
    seed: int = 0,
) -> Tensor | dict[str, Tensor]:
    """Random inputs a model accepts, in physical units.

    For a model that declares ``modalities``, a dict ``{modality: (B, C, H, W)}`` with every
    band drawn from ``N(mean, std)`` of its normalisation statistics, clipped to the band's
    valid range (so unit checks pass). For other models (plain timm ViTs), one tensor
    ``(B, in_chans, H, W)`` of standard normal values.

    Args:
        model: The model; its size comes from ``model.img_size`` or ``patch_embed.img_size``.
        batch_size: Leading dimension.
        modalities: Subset of ``model.modalities`` to feed; default all of them.
        seed: Seed of the generator.

    Returns:
        A modality dict or a tensor.

    Raises:
        ModalityError: for a modality the model does not declare (valid ones listed).
        ValueError: if the model declares no image size.
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = _img_size(model)
    declared = tuple(getattr(model, "modalities", ()) or ())
    if not declared:
        if modalities:
            raise ModalityError(
                f"{type(model).__name__} declares no modalities; cannot feed {list(modalities)}"
            )
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        in_chans = int(getattr(proj, "in_channels", 3))
        return torch.randn(batch_size, in_chans, h, w, generator=gen)
    chosen = tuple(modalities) if modalities else declared
    unknown = [m for m in chosen if m not in declared]
    if unknown:
        raise ModalityError(
            f"{type(model).__name__} has no modality {unknown}; valid: {', '.join(declared)}"
        )
    out = {}
    for name in chosen:
        mod = get_modality(name)
        mean, std = mod.mean.view(1, -1, 1, 1), mod.std.view(1, -1, 1, 1)
        x = mean + std * torch.randn(batch_size, mod.num_bands, h, w, generator=gen)
        lo = torch.tensor([b.valid_range[0] for b in mod.band_objects]).view(1, -1, 1, 1)
        hi = torch.tensor([b.valid_range[1] for b in mod.band_objects]).view(1, -1, 1, 1)
        out[name] = torch.maximum(torch.minimum(x, hi), lo)
    return out


def measure_cost(
    model: str | nn.Module,
    *,
    width: float | None = None,
    modalities: Sequence[str] | None = None,
    batch_size: int = 1,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    fill: str | None = None,
    device: str = "cpu",
) -> CostReport:
    """MACs (two counters, per op, per modality) and parameters of a model variant.

    Args:
        model: A registry name, a checkpoint directory, ``timm/<name>`` (a randomly
            initialised timm model) or a module.
        width: If given, slim the model to width ``s`` first
            (:func:`mapex_analysis.ops.slim_width`, attention and MLP, first channels).
        modalities: Modalities to feed; default all the model declares.
        batch_size: Batch size of the example inputs.
        seed: Seed of the example inputs.
        model_kwargs: Constructor overrides when ``model`` is a name.
        fill: ``zeros`` or ``mean``: let an adapter of a fixed-band model fill the bands the
            fed modalities lack (a 13-band model fed 12 bands); which bands were filled is in
            the report. ``None``: a missing band is an error.
        device: Where the counted forward passes run (``auto``, ``cpu``, ``cuda``,
            ``cuda:N``); MACs do not depend on it.

    Returns:
        The :class:`CostReport`.

    Raises:
        UnknownModelError: for an unknown registry name (registered names listed).
        ModalityError: for a modality the model does not declare.
        MacsError: if the model cannot be traced.
    """
    name = model if isinstance(model, str) else type(model).__name__
    if (model_kwargs or fill) and not isinstance(model, str):
        raise ValueError("model_kwargs and fill apply only when the model is given by name")
    kwargs = dict(model_kwargs or {}) | ({"fill": fill} if fill is not None else {})
    try:
        module = create_model(model, **kwargs) if isinstance(model, str) else model
    except TypeError as err:
        if fill is None or "fill" not in str(err):
            raise
        raise ValueError(
            f"{model} takes no fill policy: only adapters of fixed-band models fill bands"
        ) from None
    if width is not None:
        module = slim_width(module, width)
    dev = resolve_device(device)
    module = module.to(dev)
    inputs = example_inputs(module, batch_size=batch_size, modalities=modalities, seed=seed)
    inputs = (
        {k: v.to(dev) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(dev)
    )
    fed = tuple(inputs) if isinstance(inputs, dict) else ()
    filled = (
        module.filled_bands(inputs)
        if isinstance(module, Adapter) and isinstance(inputs, dict)
        else ()
    )
    # a fixed-band model fed one modality alone lacks the other bands: no per-modality count
    # unless a fill policy supplies them
    alone = not (isinstance(module, Adapter) and not module.variable_bands and module.fill is None)
    macs = count_macs(module, inputs, per_modality=len(fed) > 1 and alone)
    params = count_params(module, fed or None)
    logger.info("%s: %d MACs, %d parameters", name, macs.total, params.total)
    return CostReport(
        model=name,
        width=width,
        modalities=fed,
        batch_size=batch_size,
        macs=macs,
        params=params,
        filled=tuple(filled),
        fill=fill,
        device=device_name(dev),
    )
