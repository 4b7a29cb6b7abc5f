"""A real dataset's split as in-memory arrays, the form studies, probes and features use.

:func:`load_split` opens a source of :mod:`mapex_analysis.data.sources` (torchgeo readers or
GEO-Bench files), draws ``n`` samples with a seed (or takes all), brings every sample to
``img_size`` pixels (``bilinear`` resampling of images and ``nearest`` of label maps, or a
``crop`` of the centre), and stacks them into a :class:`SourceSplit`: the same interface as
:class:`~mapex_analysis.data.SynthEO` (``task``, ``split``, ``modalities``, ``arrays()``,
``len``, indexing, ``describe()``), so everything downstream runs unchanged on real data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mapex_analysis.data.sources import SOURCES, open_source
from mapex_analysis.data.tasks import TaskSpec

__all__ = ["EmptySourceError", "Resize", "SourceSplit", "load_split", "resize_sample"]

logger = logging.getLogger(__name__)

Resize = Literal["bilinear", "crop"]


class EmptySourceError(ValueError):
    """A source split that yields no samples (or fewer than requested)."""


def _resize_image(t: Tensor, size: int, how: Resize, *, where: str) -> Tensor:
    h, w = t.shape[-2:]
    if (h, w) == (size, size):
        return t
    if how == "crop":
        if h < size or w < size:
            raise EmptySourceError(
                f"{where}: a {h}x{w} sample is smaller than img_size {size}; use "
                "resize: bilinear or a smaller img_size"
            )
        top, left = (h - size) // 2, (w - size) // 2
        return t[..., top : top + size, left : left + size]
    return F.interpolate(
        t.float()[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]


def _resize_label(t: Tensor, size: int, how: Resize) -> Tensor:
    h, w = t.shape[-2:]
    if (h, w) == (size, size):
        return t
    if how == "crop":
        top, left = (h - size) // 2, (w - size) // 2
        return t[..., top : top + size, left : left + size]
    out = F.interpolate(t[None, None].float(), size=(size, size), mode="nearest")
    return out[0, 0].to(t.dtype)


def resize_sample(
    sample: Mapping[str, Tensor], size: int, how: Resize, *, segmentation: bool, where: str = ""
) -> dict[str, Tensor]:
    """Bring one sample's modalities (and a segmentation label map) to ``size`` x ``size``."""
    out = {}
    for k, v in sample.items():
        if k == "label":
            out[k] = _resize_label(v, size, how) if segmentation else v
        else:
            out[k] = _resize_image(v, size, how, where=where)
    return out


class SourceSplit:
    """One split of a real dataset, in memory, in physical units.

    Attributes:
        task: The source's :class:`~mapex_analysis.data.TaskSpec` (kind, classes).
        split: The study's split name (``train``, ``test``).
        source_split: The split name of the source it was read from.
        modalities: Modalities held.
        indices: Source indices of the samples, in order.
        info: What was read (source, root, n, img_size, resize, seed).
    """

    def __init__(
        self,
        task: TaskSpec,
        split: str,
        arrays: Mapping[str, np.ndarray],
        modalities: Sequence[str],
        indices: np.ndarray,
        info: Mapping[str, Any],
        source_split: str = "",
    ) -> None:
        self.task = task
        self.split = split
        self.source_split = source_split or split
        self.modalities: tuple[str, ...] = tuple(modalities)
        self.indices = indices
        self.info = dict(info)
        self._data = dict(arrays)
        self._tensors = {k: torch.from_numpy(v) for k, v in self._data.items()}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a split of {len(self)} samples")
        return {k: v[index] for k, v in self._tensors.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The whole split: ``{modality: float32 (N, C, H, W)}`` plus ``"label"``."""
        return dict(self._data)

    def describe(self) -> dict[str, Any]:
        """What was read, for reports and logs."""
        return self.info | {
            "task": self.task.name,
            "split": self.split,
            "source_split": self.source_split,
            "n": len(self),
            "modalities": list(self.modalities),
        }

    def __repr__(self) -> str:
        return (
            f"SourceSplit(task={self.task.name!r}, split={self.split!r}, n={len(self)}, "
            f"modalities={list(self.modalities)})"
        )


def load_split(
    source: str,
    root: str | os.PathLike[str],
    split: str,
    *,
    n: int | None,
    seed: int,
    img_size: int,
    resize: Resize = "bilinear",
    modalities: Sequence[str] | None = None,
    study_split: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> SourceSplit:
    """Read ``n`` samples (``None``: all) of a source split into a :class:`SourceSplit`.

    Args:
        source: A name of :data:`~mapex_analysis.data.sources.SOURCES`.
        root: The dataset directory.
        split: The source's split name.
        n: Samples to draw (without replacement, seeded), or ``None`` for all.
        seed: Seed of the draw.
        img_size: Side of every sample after resizing (chip size for gridded sources).
        resize: ``bilinear`` (resample) or ``crop`` (centre crop; smaller samples are errors).
        modalities: Modalities to read (default: every modality the source fully covers).
        study_split: The study's name for the split (default ``split``).
        options: Extra keyword arguments of the source (``sar_scale``...).

    Returns:
        The split.

    Raises:
        EmptySourceError: if the split yields no samples or fewer than ``n`` (naming source,
            root, split and size).
        DatasetNotFoundError, TaskError, BandError: from the source (missing root, unknown
            split, missing bands).
    """
    kwargs = dict(options or {})
    if modalities is not None:
        kwargs["modalities"] = list(modalities)
    if getattr(SOURCES.get(source), "chipped", False):
        kwargs.setdefault("img_size", img_size)
    ds = open_source(source, root, split, **kwargs)
    where = f"{source} at {os.fspath(root)!r}, split {split!r}, img_size {img_size}"
    total = len(ds)
    if total == 0:
        raise EmptySourceError(
            f"{where}: the split yields no samples (empty split, or rasters smaller than the "
            "chip size)"
        )
    if n is None:
        idx = np.arange(total)
    elif n > total:
        raise EmptySourceError(
            f"{where}: {n} samples requested but the split has {total}; ask for at most "
            f"{total} or for all"
        )
    else:
        idx = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    seg = ds.task.kind == "segmentation"
    samples = [
        resize_sample(ds[int(i)], img_size, resize, segmentation=seg, where=where) for i in idx
    ]
    arrays: dict[str, np.ndarray] = {
        m: torch.stack([s[m] for s in samples]).float().numpy() for m in ds.modalities
    }
    if samples and "label" in samples[0]:
        labels = torch.stack([torch.as_tensor(s["label"]) for s in samples])
        arrays["label"] = labels.numpy()
    info = {
        "source": source,
        "root": os.fspath(root),
        "img_size": img_size,
        "resize": resize,
        "seed": seed,
        "available": total,
    }
    logger.info("%s: %d of %d samples read", where, len(idx), total)
    return SourceSplit(ds.task, study_split or split, arrays, ds.modalities, idx, info, split)
