"""Real datasets through torchgeo, as the same modality-dict samples SynthEO yields.

Each adapter wraps a torchgeo dataset (it never re-implements the reading) and converts its
samples to ``{modality: FloatTensor(C, H, W), "label": ...}`` in the project's physical units
(:mod:`mapex_analysis.modalities`):

* channels are picked by band name and reordered to each modality's band order (``rgb`` is
  B04, B03, B02 whatever the file order);
* Sentinel-2 digital numbers are divided by 10,000 into reflectance;
* Sentinel-1 backscatter is in dB, clipped to [-25, 0]; a dataset that stores linear sigma0 is
  converted with ``10 log10``;
* elevation is in metres.

Requesting a modality whose bands a dataset lacks is a :class:`~mapex_analysis.modalities.
BandError` naming the missing bands; a root that does not exist is torchgeo's
:class:`~torchgeo.datasets.DatasetNotFoundError` naming the path, raised before torchgeo reads
anything. Supported: :class:`EuroSATSource`, :class:`BigEarthNetV2Source`,
:class:`MMEarthSource`, :class:`MMFloodSource` (see :data:`SOURCES`).
"""

from __future__ import annotations

import abc
import ast
import io
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mapex_analysis.data.tasks import TaskError, TaskSpec
from mapex_analysis.modalities import (
    DEFAULT_MODALITIES,
    MODALITIES,
    BandError,
    bands_of,
    validate_modalities,
)

__all__ = [
    "SOURCES",
    "BigEarthNetV2Source",
    "EuroSATSource",
    "GeoBenchSource",
    "MMEarthSource",
    "MMFloodSource",
    "ModalitySource",
    "dn_to_reflectance",
    "linear_to_db",
    "open_source",
    "select_modalities",
]

#: Sentinel-2 L1C/L2A products store reflectance x 10,000 as integers.
S2_DN_SCALE = 10_000.0

#: Sentinel-1 backscatter range (dB) the project accepts (see :mod:`mapex_analysis.modalities`).
SAR_DB_RANGE = (-25.0, 0.0)


def dn_to_reflectance(x: Tensor) -> Tensor:
    """Sentinel-2 digital numbers to reflectance (divide by 10,000)."""
    return x.float() / S2_DN_SCALE


def linear_to_db(x: Tensor) -> Tensor:
    """Linear sigma0 power to dB, clipped to [-25, 0] (non-positive power maps to -25 dB)."""
    db = 10.0 * torch.log10(x.float().clamp_min(1e-10))
    return db.clamp(*SAR_DB_RANGE)


def select_modalities(
    image: Tensor, channel_bands: Sequence[str], modalities: Sequence[str], *, where: str
) -> dict[str, Tensor]:
    """Split a stacked image into modality tensors, reordering channels by band name.

    Args:
        image: ``(C, H, W)`` tensor whose channel ``i`` is band ``channel_bands[i]``.
        channel_bands: Band names of the channels (project names: ``B8A``, ``VV``, ...).
        modalities: Modalities to extract.
        where: Dataset name for error messages.

    Returns:
        ``{modality: FloatTensor(len(bands_of(modality)), H, W)}``.

    Raises:
        BandError: naming the bands a modality needs but ``channel_bands`` lacks.
        ValueError: if ``image`` has a different number of channels than ``channel_bands``.
    """
    if image.shape[0] != len(channel_bands):
        raise ValueError(
            f"{where}: image has {image.shape[0]} channels but {len(channel_bands)} band names "
            f"were given ({', '.join(channel_bands)})"
        )
    out = {}
    for m in modalities:
        need = bands_of(m)
        missing = [b for b in need if b not in channel_bands]
        if missing:
            raise BandError(
                f"{where} lacks band(s) {', '.join(missing)} of modality {m!r}; "
                f"available bands: {', '.join(channel_bands)}"
            )
        idx = torch.tensor([list(channel_bands).index(b) for b in need])
        out[m] = image.index_select(0, idx).float()
    return out


class ModalitySource(Dataset, abc.ABC):
    """Base class: a torchgeo dataset seen as modality dicts.

    Subclasses declare :attr:`name`, :attr:`available_bands` (project band names the dataset
    has), :attr:`splits` and :attr:`task`, then build the torchgeo dataset in
    :meth:`_build` and convert one raw sample in :meth:`_convert`.

    Args:
        root: Directory holding the dataset in torchgeo's layout.
        split: A split of :attr:`splits`.
        modalities: Modalities to return; default every modality the dataset fully covers.

    Raises:
        DatasetNotFoundError: if ``root`` does not exist (message names the path).
        TaskError: for a split the dataset does not have, naming the valid ones.
        ModalityError: for an unknown or empty modality selection.
        BandError: for a modality whose bands the dataset lacks, naming them.
    """

    name: str = ""
    available_bands: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train", "val", "test")
    task: TaskSpec
    download = False  # read by torchgeo's DatasetNotFoundError message

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        modalities: Sequence[str] | None = None,
    ) -> None:
        self.root = str(root)
        if split not in self.splits:
            raise TaskError(
                f"{self.name} has no split {split!r}; valid splits: {', '.join(self.splits)}"
            )
        self.split = split
        mods = self.default_modalities() if modalities is None else modalities
        self.modalities: tuple[str, ...] = validate_modalities(mods)
        for m in self.modalities:
            missing = [b for b in bands_of(m) if b not in self.available_bands]
            if missing:
                raise BandError(
                    f"{self.name} lacks band(s) {', '.join(missing)} of modality {m!r}; "
                    f"available bands: {', '.join(self.available_bands)}"
                )
        if not Path(self.root).is_dir():
            from torchgeo.datasets import DatasetNotFoundError

            raise DatasetNotFoundError(self)
        self.dataset = self._build()

    #: Whether the source cuts rasters into ``img_size`` chips itself (a GeoDataset).
    chipped: bool = False

    @classmethod
    def default_modalities(cls) -> tuple[str, ...]:
        """Every default modality whose bands the dataset has."""
        return tuple(
            m for m in DEFAULT_MODALITIES if all(b in cls.available_bands for b in bands_of(m))
        )

    @classmethod
    def covered_modalities(cls) -> tuple[str, ...]:
        """Every registered modality whose bands the dataset has (``coastal`` and
        ``atmospheric`` included), in registration order."""
        return tuple(m for m in MODALITIES if all(b in cls.available_bands for b in bands_of(m)))

    @abc.abstractmethod
    def _build(self) -> Any:
        """Construct the wrapped torchgeo dataset (and set :attr:`task`)."""

    @abc.abstractmethod
    def _convert(self, raw: Mapping[str, Any]) -> dict[str, Tensor]:
        """Turn one torchgeo sample into a modality dict in physical units."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self._convert(self.dataset[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, n={len(self)}, "
            f"modalities={list(self.modalities)})"
        )


class EuroSATSource(ModalitySource):
    """EuroSAT (Helber et al., 2019): 27,000 Sentinel-2 L1C patches, 13 bands, 10 classes.

    Wraps :class:`torchgeo.datasets.EuroSAT`. The GeoTIFFs store the 13 bands with B8A last
    (torchgeo's ``all_band_names``); channels are reordered by name. Labels are
    ``LongTensor()`` class indices (``task.class_names`` from the class folders).
    """

    name = "EuroSAT"
    #: Channel order of EuroSAT's GeoTIFFs as torchgeo names them.
    file_bands: tuple[str, ...] = (
        "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A",
    )  # fmt: skip
    available_bands = file_bands

    def _build(self) -> Any:
        from torchgeo.datasets import EuroSAT

        needed = [b for m in self.modalities for b in bands_of(m)]
        self._loaded = tuple(b for b in self.file_bands if b in needed)
        ds = EuroSAT(self.root, split=self.split, bands=self._loaded)
        self.task = TaskSpec("eurosat", "multiclass", len(ds.classes), tuple(ds.classes))
        return ds

    def _convert(self, raw: Mapping[str, Any]) -> dict[str, Tensor]:
        image = dn_to_reflectance(raw["image"])
        out = select_modalities(image, self._loaded, self.modalities, where=self.name)
        out["label"] = torch.as_tensor(raw["label"]).long()
        return out


class BigEarthNetV2Source(ModalitySource):
    """BigEarthNet v2 (reBEN, Clasen et al., 2024): Sentinel-1 + Sentinel-2, 19 labels.

    Wraps :class:`torchgeo.datasets.BigEarthNetV2`, loading only the sensors the requested
    modalities need. torchgeo stacks the S2 band files sorted as B01..B08, B8A, B09, B11, B12
    and the S1 files alphabetically (VH before VV); channels are reordered by name. S1 is
    stored in dB; note that torchgeo reads it as ``int32``, i.e. truncated to whole dB.
    Labels are multi-hot ``FloatTensor(19)``.
    """

    name = "BigEarthNetV2"
    s2_bands: tuple[str, ...] = (
        "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
    )  # fmt: skip
    s1_bands: tuple[str, ...] = ("VH", "VV")
    available_bands = s2_bands + s1_bands

    def _build(self) -> Any:
        from torchgeo.datasets import BigEarthNetV2

        sensors = {"sentinel1" if m == "sar" else "sentinel2" for m in self.modalities}
        self._bands = "all" if len(sensors) == 2 else "s1" if sensors == {"sentinel1"} else "s2"
        ds = BigEarthNetV2(self.root, split=self.split, bands=self._bands)
        self.task = TaskSpec("bigearthnet_v2", "multilabel", 19, tuple(ds.class_set))
        return ds

    def _convert(self, raw: Mapping[str, Any]) -> dict[str, Tensor]:
        if self._bands == "all":
            s1, s2 = raw["image_s1"], raw["image_s2"]
        elif self._bands == "s1":
            s1, s2 = raw["image"], None
        else:
            s1, s2 = None, raw["image"]
        out: dict[str, Tensor] = {}
        if s2 is not None:
            image = dn_to_reflectance(s2)
            optical = [m for m in self.modalities if m != "sar"]
            out.update(select_modalities(image, self.s2_bands, optical, where=self.name))
        if s1 is not None:
            sar = s1.float().clamp(*SAR_DB_RANGE)
            out.update(select_modalities(sar, self.s1_bands, ["sar"], where=self.name))
        out = {m: out[m] for m in self.modalities}
        out["label"] = torch.as_tensor(raw["label"]).float()
        return out


class MMEarthSource(ModalitySource):
    """MMEarth (Nedungadi et al., 2024) for pretraining: Sentinel-2, Sentinel-1, ASTER DEM.

    Wraps :class:`torchgeo.datasets.MMEarth`, which z-scores every band with the dataset's
    band statistics; the adapter inverts that with the same statistics to recover physical
    units (S2 DN / 10,000; S1 in dB; ASTER elevation in metres). MMEarth stores S2 bands as
    B1..B7, B8A, B8, B9..B12 and S1 as VV, VH, HH, HV per orbit; channels are reordered by
    name. ``label`` is the ESA WorldCover map remapped by torchgeo to 0..10 (255 = no data).

    Args:
        root: Directory holding ``data_100k_v001/`` (or the other subsets).
        split: Only ``train`` (torchgeo exposes MMEarth's train split).
        modalities: Default: rgb, red_edge, nir, swir, sar, ele.
        subset: ``MMEarth``, ``MMEarth64`` or ``MMEarth100k``.
        orbit: Sentinel-1 orbit direction, ``asc`` or ``desc``.
        labels: Include the WorldCover map as ``label``.

    Raises:
        ValueError: for an unknown ``subset`` or ``orbit``.
        BandError: if a tile lacks the bands of a requested modality.
    """

    name = "MMEarth"
    splits = ("train",)
    subsets: tuple[str, ...] = ("MMEarth", "MMEarth64", "MMEarth100k")
    #: MMEarth band name -> project band name.
    s2_names: dict[str, str] = {
        "B1": "B01", "B2": "B02", "B3": "B03", "B4": "B04", "B5": "B05", "B6": "B06",
        "B7": "B07", "B8A": "B8A", "B8": "B08", "B9": "B09", "B10": "B10", "B11": "B11",
        "B12": "B12",
    }  # fmt: skip
    available_bands = (*s2_names.values(), "VV", "VH", "elevation", "slope")

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        modalities: Sequence[str] | None = None,
        *,
        subset: str = "MMEarth100k",
        orbit: Literal["asc", "desc"] = "asc",
        labels: bool = True,
    ) -> None:
        if orbit not in ("asc", "desc"):
            raise ValueError(f"unknown Sentinel-1 orbit {orbit!r}; valid: asc, desc")
        if subset not in self.subsets:
            raise ValueError(f"unknown MMEarth subset {subset!r}; valid: {', '.join(self.subsets)}")
        self.subset = subset
        self.orbit = orbit
        self.labels = labels
        super().__init__(root, split, modalities)

    def _build(self) -> Any:
        from torchgeo.datasets import MMEarth

        s1 = f"sentinel1_{self.orbit}"
        mod_bands: dict[str, list[str]] = {}
        inverse = {v: k for k, v in self.s2_names.items()}
        optical = [b for m in self.modalities if m not in ("sar", "ele") for b in bands_of(m)]
        if optical:
            mod_bands["sentinel2"] = [inverse[b] for b in optical]
        if "sar" in self.modalities:
            mod_bands[s1] = ["VV", "VH"]
        if "ele" in self.modalities:
            mod_bands["aster"] = ["b1"]
        if self.labels:
            mod_bands["esa_worldcover"] = ["Map"]
        self._s1 = s1
        self.task = TaskSpec(
            "mmearth_worldcover",
            "segmentation",
            11,
            (
                "tree_cover", "shrubland", "grassland", "cropland", "built_up", "bare",
                "snow_ice", "water", "herbaceous_wetland", "mangroves", "moss_lichen",
            ),
            ignore_index=255,
        )  # fmt: skip
        return MMEarth(
            self.root, subset=self.subset, modalities=list(mod_bands), modality_bands=mod_bands
        )

    def _denormalize(self, x: Tensor, stats_key: str, order: list[str], bands: list[str]) -> Tensor:
        """Invert torchgeo's z-score of ``bands`` (positions in ``order``) with its statistics."""
        stats = self.dataset.band_stats[stats_key]
        idx = [order.index(b) for b in bands]
        mean = torch.tensor(np.asarray(stats["mean"], dtype=np.float64)[idx], dtype=torch.float64)
        std = torch.tensor(np.asarray(stats["std"], dtype=np.float64)[idx], dtype=torch.float64)
        return (x.double() * std[:, None, None] + mean[:, None, None]).float()

    def _convert(self, raw: Mapping[str, Any]) -> dict[str, Tensor]:
        avail: dict[str, list[str]] = raw["avail_bands"]
        all_bands = self.dataset.all_modality_bands
        out: dict[str, Tensor] = {}
        if "image_sentinel2" in raw:
            s2_type = self.dataset.tile_info[raw["tile_id"]]["S2_type"]
            bands = avail["sentinel2"]
            dn = self._denormalize(
                raw["image_sentinel2"], f"sentinel2_{s2_type}", all_bands["sentinel2"], bands
            )
            names = [self.s2_names[b] for b in bands]
            optical = [m for m in self.modalities if m not in ("sar", "ele")]
            out.update(select_modalities(dn_to_reflectance(dn), names, optical, where=self.name))
        if f"image_{self._s1}" in raw:
            bands = avail[self._s1]
            offset = 4 if self.orbit == "desc" else 0  # asc and desc share one stats vector
            order = ["_"] * offset + all_bands[self._s1]
            db = self._denormalize(raw[f"image_{self._s1}"], "sentinel1", order, bands)
            out.update(select_modalities(db.clamp(*SAR_DB_RANGE), bands, ["sar"], where=self.name))
        if "image_aster" in raw:
            elev = self._denormalize(raw["image_aster"], "aster", all_bands["aster"], ["b1"])
            out["ele"] = elev
        missing = [m for m in self.modalities if m not in out]
        if missing:
            raise BandError(
                f"MMEarth tile {raw['tile_id']!r} has no data for modality(ies) "
                f"{', '.join(missing)}; available: {avail}"
            )
        out = {m: out[m] for m in self.modalities}
        if self.labels and "mask_esa_worldcover" in raw:
            out["label"] = raw["mask_esa_worldcover"][0].long()
        return out


class MMFloodSource(ModalitySource):
    """MMFlood (Montello et al., 2022): Sentinel-1 + DEM flood delineation, chipped on a grid.

    Wraps :class:`torchgeo.datasets.MMFlood` (a GeoDataset) and a
    :class:`torchgeo.samplers.GridGeoSampler` of ``img_size`` pixel chips. The ``s1_raw``
    rasters hold (VV, VH) sigma0 in linear power, converted here to dB in [-25, 0]; pass
    ``sar_scale="db"`` for a copy already in dB. ``label`` is the ``LongTensor(H, W)`` flood
    mask (0 no flood, 1 flood, 255 ignore where S1 has no data).

    Args:
        root: Directory holding ``activations/`` and ``activations.json``.
        split: ``train``, ``val`` or ``test``.
        modalities: Default ``("sar", "ele")``.
        img_size: Chip side in pixels.
        sar_scale: Unit of the stored backscatter: ``linear`` or ``db``.

    Raises:
        ValueError: for an unknown ``sar_scale`` or ``img_size < 1``.
    """

    name = "MMFlood"
    available_bands = ("VV", "VH", "elevation")
    chipped = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        modalities: Sequence[str] | None = None,
        *,
        img_size: int = 32,
        sar_scale: Literal["linear", "db"] = "linear",
    ) -> None:
        if sar_scale not in ("linear", "db"):
            raise ValueError(f"unknown sar_scale {sar_scale!r}; valid: linear, db")
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1 pixel, got {img_size}")
        self.img_size = img_size
        self.sar_scale = sar_scale
        super().__init__(root, split, modalities)

    def _build(self) -> Any:
        from torchgeo.datasets import MMFlood
        from torchgeo.samplers import GridGeoSampler

        ds = MMFlood(self.root, split=self.split, include_dem="ele" in self.modalities)
        self._queries = list(GridGeoSampler(ds, size=self.img_size, stride=self.img_size))
        self.task = TaskSpec("mmflood", "segmentation", 2, ("no_flood", "flood"), ignore_index=255)
        return ds

    def __len__(self) -> int:
        return len(self._queries)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self._convert(self.dataset[self._queries[index]])

    def _convert(self, raw: Mapping[str, Any]) -> dict[str, Tensor]:
        image = raw["image"].float()
        sar = image[:2]
        sar = linear_to_db(sar) if self.sar_scale == "linear" else sar.clamp(*SAR_DB_RANGE)
        channels = [sar] + ([image[2:3]] if "ele" in self.modalities else [])
        names = ["VV", "VH"] + (["elevation"] if "ele" in self.modalities else [])
        out = select_modalities(torch.cat(channels), names, self.modalities, where=self.name)
        mask = raw["mask"]
        out["label"] = (mask[0] if mask.dim() == 3 else mask).long()
        return out


#: Source name -> adapter class.
SOURCES: dict[str, type[ModalitySource]] = {
    "eurosat": EuroSATSource,
    "bigearthnet_v2": BigEarthNetV2Source,
    "mmearth": MMEarthSource,
    "mmflood": MMFloodSource,
}


def open_source(
    name: str, root: str | os.PathLike[str], split: str = "train", **kwargs: Any
) -> ModalitySource:
    """Open a real dataset by name.

    Args:
        name: One of :data:`SOURCES`.
        root: Dataset directory.
        split: Split name.
        **kwargs: Passed to the adapter (``modalities``, ``img_size``, ...).

    Returns:
        The adapter dataset.

    Raises:
        KeyError: naming the unknown source and listing the valid ones.
    """
    try:
        cls = SOURCES[name]
    except KeyError:
        raise KeyError(
            f"unknown data source {name!r}; valid sources: {', '.join(SOURCES)}"
        ) from None
    return cls(root, split, **kwargs)


# --------------------------------------------------------------------------- GEO-Bench


class _Opaque:
    """Stand-in for a class of a GEO-Bench pickle (band info, transforms): keeps its state."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


class _GeoBenchUnpickler(pickle.Unpickler):
    """Reads GEO-Bench's pickled metadata without the ``geobench`` package: its classes (and
    rasterio / affine objects) become :class:`_Opaque`; numpy and builtins load as
    themselves; anything else is refused (no code from a data file runs)."""

    _ALLOWED = ("builtins", "collections", "datetime", "numpy", "copyreg", "_codecs")
    _OPAQUE = ("geobench", "rasterio", "affine", "pathlib")

    def find_class(self, module: str, name: str) -> Any:
        root = module.split(".")[0]
        if root in self._OPAQUE:
            return type(name, (_Opaque,), {"__module__": module})
        if root in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GEO-Bench metadata refers to {module}.{name}; refused")


def _geobench_attrs(fp: Any) -> dict[str, Any]:
    return _GeoBenchUnpickler(io.BytesIO(ast.literal_eval(fp.attrs["pickle"]))).load()


def geobench_band(name: str) -> str | None:
    """Project band of a GEO-Bench Sentinel-2 band name (``"08A - Vegetation Red Edge"`` ->
    ``B8A``), or ``None`` for other bands (Sentinel-1 complex parts, masks)."""
    head = name.split(" - ")[0].strip()
    if " - " not in name or not head[:2].isdigit():
        return None
    band = "B8A" if head.upper() == "08A" else f"B{int(head[:2]):02d}"
    return band if band in S2_BANDS_ALL else None


S2_BANDS_ALL: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip


class GeoBenchSource(ModalitySource):
    """A GEO-Bench classification task (Lacoste et al., 2023): one HDF5 file per sample.

    Reads the converted benchmark's task folder directly with h5py: ``default_partition.json``
    (sample names per split ``train`` / ``valid`` / ``test``), ``task_specs.pkl`` (label type and
    class names) and ``<sample>.hdf5`` files holding one dataset per band (named as GEO-Bench
    names them, ``"04 - Red"``) plus a pickled attribute dict with the band order and the label.
    GEO-Bench's own classes in those pickles are read as opaque objects, so the ``geobench``
    package is not needed and nothing in a data file is executed.

    Sentinel-2 bands are stored as digital numbers (reflectance x 10,000, int16) and divided
    by 10,000; a band stored as floats of at most 2 is taken as reflectance already. Only the
    Sentinel-2 bands are read (m-so2sat's Sentinel-1 bands are complex parts, not dB).

    Args:
        root: The task folder (``.../classification_v1.0/m-eurosat``).
        split: ``train``, ``valid`` or ``test``.
        modalities: Default: every modality the task's bands cover.
    """

    splits = ("train", "valid", "test")
    task_name = ""
    kind: Literal["multiclass", "multilabel"] = "multiclass"
    num_classes = 0

    def _build(self) -> Any:
        part = Path(self.root) / "default_partition.json"
        if not part.is_file():
            raise FileNotFoundError(
                f"{self.name}: no default_partition.json in {self.root!r} (expected a GEO-Bench "
                "task folder holding default_partition.json, task_specs.pkl and *.hdf5)"
            )
        names = json.loads(part.read_text()).get(self.split, [])
        files = [Path(self.root) / f"{n}.hdf5" for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.name}: sample file {missing[0]} is missing")
        self._files = files
        class_names: tuple[str, ...] = tuple(f"class_{i}" for i in range(self.num_classes))
        specs = Path(self.root) / "task_specs.pkl"
        if specs.is_file():
            with specs.open("rb") as fh:
                spec = _GeoBenchUnpickler(fh).load()
            label_type = getattr(spec, "label_type", None)
            stored = getattr(label_type, "class_names", None) or getattr(
                label_type, "_class_names", None
            )
            if stored and len(stored) == self.num_classes:
                class_names = tuple(str(c) for c in stored)
        self.task = TaskSpec(self.task_name, self.kind, self.num_classes, class_names)
        return files

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        path = self._files[index]
        bands: dict[str, np.ndarray] = {}
        with h5py.File(path, "r") as fp:
            attrs = _geobench_attrs(fp)
            for key in attrs.get("bands_order", list(fp.keys())):
                band = geobench_band(str(key))
                if band is not None and band not in bands:
                    bands[band] = np.asarray(fp[key])
        return self._convert({"bands": bands, "label": attrs.get("label"), "file": path.name})

    def _convert(self, raw: Mapping[str, Any]) -> dict[str, Tensor]:
        """One sample file's arrays (``bands``: band -> raw array, ``label``, ``file``) in
        project units: reflectance from digital numbers unless already fractions."""
        by_band: dict[str, Tensor] = {}
        for band, arr in raw["bands"].items():
            data = torch.from_numpy(arr.astype(np.float32))
            if data.dim() == 3:  # (H, W, 1)
                data = data[..., 0]
            floats = np.issubdtype(arr.dtype, np.floating)
            by_band[band] = data if floats and float(np.nanmax(arr)) <= 2.0 else data / 1e4
        names = tuple(by_band)
        image = torch.stack([by_band[b] for b in names])
        out = select_modalities(image, names, self.modalities, where=f"{self.name} {raw['file']}")
        label = raw["label"]
        if self.kind == "multilabel":
            out["label"] = torch.as_tensor(np.asarray(label), dtype=torch.float32)
        else:
            out["label"] = torch.as_tensor(int(np.asarray(label))).long()
        return out


def _geobench(name: str, task: str, bands: tuple[str, ...], kind: str, n: int) -> type:
    return type(
        f"GeoBench_{task.replace('-', '_')}",
        (GeoBenchSource,),
        {"name": name, "task_name": task, "available_bands": bands, "kind": kind,
         "num_classes": n, "__doc__": f"GEO-Bench {task}: {n} classes ({kind})."},
    )  # fmt: skip


_S2_12 = tuple(b for b in S2_BANDS_ALL if b != "B10")
SOURCES.update(
    {
        # class counts and bands of the GEO-Bench v1.0 classification tasks
        "m-eurosat": _geobench("GEO-Bench m-eurosat", "m-eurosat", S2_BANDS_ALL, "multiclass", 10),
        "m-bigearthnet": _geobench("GEO-Bench m-bigearthnet", "m-bigearthnet", _S2_12,
                                   "multilabel", 43),
        "m-brick-kiln": _geobench("GEO-Bench m-brick-kiln", "m-brick-kiln", S2_BANDS_ALL,
                                  "multiclass", 2),
        "m-so2sat": _geobench("GEO-Bench m-so2sat", "m-so2sat",
                              ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11",
                               "B12"), "multiclass", 17),
    }
)  # fmt: skip
