"""Sensors, bands, modality groups and their normalisation statistics.

Every band name, wavelength and modality grouping in the project comes from this module: model
adapters that need wavelengths (DOFA in µm, CopernicusFM and Panopticon in nm) take them from
:data:`BANDS`, never from hand-typed lists, and data sources name their channels by band.

The six default modality groups follow the band grouping of the MAPEX authors' earlier public
code (listed by ``mapex-study list modalities``). They are configurable:
:func:`register_modality` adds or replaces a group.

Units:
    * Sentinel-2 bands: surface reflectance in [0, 1] (L2A digital numbers / 10,000). Raw digital
      numbers (values in the thousands) are a unit error, see :func:`check_units`.
    * Sentinel-1 bands: backscatter in dB, clipped to [-25, 0].
    * DEM bands: elevation in metres, slope in degrees.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch

from mapex_analysis.options import DEFAULT_MODALITIES

__all__ = [
    "BANDS",
    "DEFAULT_MODALITIES",
    "MODALITIES",
    "Band",
    "BandError",
    "Modality",
    "ModalityError",
    "UnitError",
    "all_bands",
    "bands_of",
    "check_inputs",
    "check_units",
    "get_band",
    "get_modality",
    "list_modalities",
    "modality_of_band",
    "modality_table",
    "normalize",
    "denormalize",
    "register_modality",
    "unit_checks",
    "units_checked",
    "validate_modalities",
    "wavelengths",
]


#: Whether model inputs are unit-checked (see :func:`unit_checks`).
_UNIT_CHECKS: ContextVar[bool] = ContextVar("mapex_unit_checks", default=True)


class ModalityError(ValueError):
    """An unknown, missing or empty modality selection."""


class BandError(ValueError):
    """An unknown band name, or a band set that does not match what a model expects."""


class UnitError(ValueError):
    """Input whose values cannot be in the unit the modality declares (e.g. raw DNs)."""


@dataclass(frozen=True)
class Band:
    """One spectral or non-spectral band of a sensor.

    Attributes:
        name: Band name as the sensor's product names it (``B04``, ``VV``, ``elevation``).
        sensor: Sensor name (``sentinel2``, ``sentinel1``, ``dem``).
        wavelength_nm: Centre wavelength in nanometres, ``None`` for non-optical bands.
        unit: Physical unit of the values the project works with.
        mean: Normalisation mean in ``unit``.
        std: Normalisation standard deviation in ``unit``.
        valid_range: Values outside this closed range cannot be in ``unit``.
    """

    name: str
    sensor: str
    wavelength_nm: float | None
    unit: str
    mean: float
    std: float
    valid_range: tuple[float, float]


def _s2(name: str, wl: float, mean: float, std: float) -> Band:
    return Band(name, "sentinel2", wl, "reflectance", mean, std, (-0.05, 1.6))


# Sentinel-2 MSI centre wavelengths (nm; ESA's Sentinel-2 MSI band table). Means/stds are typical L2A
# reflectance statistics over land (order of magnitude of the SSL4EO-S12 / BigEarthNet
# statistics divided by 10,000); SynthEO is rendered in the same unit.
BANDS: dict[str, Band] = {
    b.name: b
    for b in [
        _s2("B01", 443.0, 0.13, 0.07),
        _s2("B02", 490.0, 0.11, 0.07),
        _s2("B03", 560.0, 0.11, 0.07),
        _s2("B04", 665.0, 0.11, 0.08),
        _s2("B05", 705.0, 0.15, 0.08),
        _s2("B06", 740.0, 0.23, 0.10),
        _s2("B07", 783.0, 0.26, 0.11),
        _s2("B08", 842.0, 0.26, 0.12),
        _s2("B8A", 865.0, 0.28, 0.12),
        _s2("B09", 945.0, 0.09, 0.05),
        _s2("B10", 1375.0, 0.01, 0.01),
        _s2("B11", 1610.0, 0.22, 0.10),
        _s2("B12", 2190.0, 0.15, 0.09),
        Band("VV", "sentinel1", None, "dB", -12.0, 5.0, (-25.0, 0.0)),
        Band("VH", "sentinel1", None, "dB", -19.0, 5.0, (-25.0, 0.0)),
        Band("elevation", "dem", None, "m", 600.0, 700.0, (-500.0, 9000.0)),
        Band("slope", "dem", None, "deg", 10.0, 10.0, (0.0, 90.0)),
    ]
}


@dataclass(frozen=True)
class Modality:
    """A named group of bands of one sensor.

    Attributes:
        name: Modality name (``rgb``, ``sar``, ...).
        sensor: The sensor all bands come from.
        bands: Band names in channel order.
        description: One line for tables and reports.
    """

    name: str
    sensor: str
    bands: tuple[str, ...]
    description: str = ""

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    @property
    def band_objects(self) -> tuple[Band, ...]:
        return tuple(BANDS[b] for b in self.bands)

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor([b.mean for b in self.band_objects], dtype=torch.float32)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor([b.std for b in self.band_objects], dtype=torch.float32)


MODALITIES: dict[str, Modality] = {}


def register_modality(
    name: str, sensor: str, bands: Sequence[str], description: str = ""
) -> Modality:
    """Add (or replace) a modality group.

    Raises:
        BandError: if a band is unknown or belongs to another sensor.
    """
    for b in bands:
        band = get_band(b)
        if band.sensor != sensor:
            raise BandError(
                f"band {b!r} belongs to sensor {band.sensor!r}, not {sensor!r} (modality {name!r})"
            )
    if not bands:
        raise BandError(f"modality {name!r} needs at least one band")
    mod = Modality(name, sensor, tuple(bands), description)
    MODALITIES[name] = mod
    return mod


def list_modalities() -> list[str]:
    """Names of all registered modalities, in registration order."""
    return list(MODALITIES)


def get_band(name: str) -> Band:
    """Look up a band by name.

    Raises:
        BandError: naming the unknown band and listing the valid ones.
    """
    try:
        return BANDS[name]
    except KeyError:
        raise BandError(f"unknown band {name!r}; valid bands: {', '.join(BANDS)}") from None


def all_bands() -> list[str]:
    return list(BANDS)


def get_modality(name: str) -> Modality:
    """Look up a modality by name.

    Raises:
        ModalityError: naming the unknown modality and listing the valid ones.
    """
    try:
        return MODALITIES[name]
    except (KeyError, TypeError):
        raise ModalityError(
            f"unknown modality {name!r}; valid modalities: {', '.join(MODALITIES)}"
        ) from None


def bands_of(modality: str) -> tuple[str, ...]:
    """Band names of a modality, in channel order."""
    return get_modality(modality).bands


def modality_of_band(band: str) -> str:
    """The (first registered) modality containing ``band``.

    Raises:
        BandError: if the band is unknown or in no modality.
    """
    get_band(band)
    for mod in MODALITIES.values():
        if band in mod.bands:
            return mod.name
    raise BandError(f"band {band!r} belongs to no registered modality")


def wavelengths(bands: Iterable[str], unit: Literal["nm", "um"] = "nm") -> list[float]:
    """Centre wavelengths of optical bands.

    Args:
        bands: Band names.
        unit: ``"nm"`` (CopernicusFM, Panopticon) or ``"um"`` (DOFA).

    Raises:
        BandError: for an unknown band or a band without a wavelength (SAR, DEM).
        ValueError: for an unknown unit.
    """
    if unit not in ("nm", "um"):
        raise ValueError(f"unknown wavelength unit {unit!r}; use 'nm' or 'um'")
    out = []
    for b in bands:
        band = get_band(b)
        if band.wavelength_nm is None:
            raise BandError(f"band {b!r} ({band.sensor}) has no centre wavelength")
        out.append(band.wavelength_nm if unit == "nm" else band.wavelength_nm / 1000.0)
    return out


def validate_modalities(
    names: Iterable[str], allowed: Iterable[str] | None = None
) -> tuple[str, ...]:
    """Check a modality selection; return it as a tuple (order kept, duplicates rejected).

    Args:
        names: The requested modalities.
        allowed: The modalities a model supports; defaults to all registered ones.

    Raises:
        ModalityError: for an empty selection, a duplicate, or a name not in ``allowed``.
    """
    if isinstance(names, str):
        names = [names]
    names = tuple(names)
    if not names:
        raise ModalityError("empty modality selection; give at least one modality")
    valid = tuple(allowed) if allowed is not None else tuple(MODALITIES)
    seen: set[str] = set()
    for n in names:
        if n not in valid:
            raise ModalityError(f"unknown modality {n!r}; valid modalities: {', '.join(valid)}")
        if n in seen:
            raise ModalityError(f"modality {n!r} given twice")
        seen.add(n)
    return names


register_modality("rgb", "sentinel2", ["B04", "B03", "B02"], "Sentinel-2 visible (R, G, B)")
register_modality("red_edge", "sentinel2", ["B05", "B06", "B07"], "Sentinel-2 red edge")
register_modality("nir", "sentinel2", ["B08"], "Sentinel-2 near infrared")
register_modality("swir", "sentinel2", ["B11", "B12", "B8A"], "Sentinel-2 SWIR + narrow NIR")
register_modality("sar", "sentinel1", ["VV", "VH"], "Sentinel-1 GRD backscatter (dB)")
register_modality("ele", "dem", ["elevation"], "Digital elevation model (m)")

register_modality("coastal", "sentinel2", ["B01"], "Sentinel-2 coastal aerosol (60 m)")
register_modality(
    "atmospheric", "sentinel2", ["B09", "B10"], "Sentinel-2 water vapour + cirrus (60 m)"
)


def units_checked() -> bool:
    """Whether model inputs are unit-checked in the current context (default ``True``)."""
    return _UNIT_CHECKS.get()


@contextmanager
def unit_checks(enabled: bool) -> Iterator[None]:
    """Turn the unit check of every model input on or off inside a ``with`` block.

    Models and adapters call :func:`check_inputs` on every forward; this is the explicit
    opt-out (``with unit_checks(False): model(x)``) for callers whose inputs are not physical
    values (synthetic timing inputs, attribution baselines they built themselves).

    Args:
        enabled: ``False`` to skip the checks, ``True`` to force them back on.
    """
    token = _UNIT_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _UNIT_CHECKS.reset(token)


def check_units(modality: str, x: torch.Tensor, *, where: str = "") -> None:
    """Raise if ``x`` cannot be in the unit the modality's bands declare.

    Catches the classic silent errors: raw Sentinel-2 digital numbers (0-10,000) fed where
    reflectance is expected, linear SAR power fed where dB is expected (every value >= 0,
    while dB backscatter lies in [-25, 0]), impossible elevations, NaNs and infinities.
    Values may exceed a band's valid range by 5 % of its width (resampling overshoot).

    Args:
        modality: Modality name.
        x: Tensor whose channel dimension is ``-3`` (``(C, H, W)`` or ``(B, C, H, W)``).
        where: Context for the message (a file, a dataset, a model).

    Raises:
        BandError: if the channel count is not the modality's band count.
        UnitError: naming the modality, band, expected unit and range, and the observed range.
    """
    mod = get_modality(modality)
    at = f" in {where}" if where else ""
    if x.dim() < 3 or x.shape[-3] != mod.num_bands:
        raise BandError(
            f"modality {modality!r} expects {mod.num_bands} bands {list(mod.bands)}, "
            f"got {x.shape[-3] if x.dim() >= 3 else 'no'} channels{at}"
        )
    if x.numel() == 0:
        return
    dims = tuple(d for d in range(x.dim()) if d != x.dim() - 3)
    xd = x.detach()
    lo = xd.amin(dim=dims).float().cpu()  # NaN propagates through amin/amax
    hi = xd.amax(dim=dims).float().cpu()
    for i, band in enumerate(mod.band_objects):
        vlo, vhi = band.valid_range
        expect = f"the valid range [{vlo:g}, {vhi:g}] for unit {band.unit!r}"
        lo_i, hi_i = lo[i].item(), hi[i].item()
        if math.isnan(lo_i) or math.isnan(hi_i):
            raise UnitError(
                f"NaN values in band {band.name} of modality {modality!r}{at}; expected "
                f"values in {expect}"
            )
        if math.isinf(lo_i) or math.isinf(hi_i):
            raise UnitError(
                f"infinite values in band {band.name} of modality {modality!r}{at} (observed "
                f"range [{lo_i:g}, {hi_i:g}]); expected values in {expect}"
            )
        slack = 0.05 * (vhi - vlo)
        observed = f"has values in [{lo_i:.4g}, {hi_i:.4g}]"
        if band.unit == "dB" and lo_i >= 0.0 and hi_i > 0.0:
            raise UnitError(
                f"band {band.name} of modality {modality!r}{at} {observed}: every value is "
                f">= 0, which is linear backscatter power, not {expect}; convert with "
                "10 * log10(power) (mapex_analysis.data.sources.linear_to_db)"
            )
        if lo_i < vlo - slack or hi_i > vhi + slack:
            if band.unit == "reflectance":
                hint = "raw Sentinel-2 digital numbers must be divided by 10,000"
            elif band.unit == "m":
                hint = "elevation must be in metres above sea level"
            else:
                hint = "convert to the declared unit"
            raise UnitError(
                f"band {band.name} of modality {modality!r} {observed}, outside {expect}{at}; "
                f"{hint}"
            )


def check_inputs(x: Mapping[str, torch.Tensor], *, where: str = "") -> None:
    """:func:`check_units` on every modality of a batch (``label`` ignored), unless
    :func:`unit_checks` turned the checks off. The one entry point models and adapters call.

    Args:
        x: ``{modality: (B, C, H, W)}`` in physical units.
        where: The model (or data) the batch goes into, for the message.

    Raises:
        UnitError, BandError: see :func:`check_units`.
    """
    if not _UNIT_CHECKS.get():
        return
    for m, t in x.items():
        if m != "label" and m in MODALITIES:
            check_units(m, t, where=where)


def normalize(modality: str, x: torch.Tensor) -> torch.Tensor:
    """Standardise ``x`` (channels at dim -3) with the modality's band statistics."""
    mod = get_modality(modality)
    shape = [1] * x.dim()
    shape[-3] = mod.num_bands
    return (x - mod.mean.view(shape).to(x)) / mod.std.view(shape).to(x)


def denormalize(modality: str, x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    mod = get_modality(modality)
    shape = [1] * x.dim()
    shape[-3] = mod.num_bands
    return x * mod.std.view(shape).to(x) + mod.mean.view(shape).to(x)


def modality_table() -> list[dict[str, object]]:
    """Rows (modality, sensor, bands, wavelengths, unit) for ``mapex-study list modalities``."""
    rows: list[dict[str, object]] = []
    for mod in MODALITIES.values():
        wl = [b.wavelength_nm for b in mod.band_objects]
        rows.append(
            {
                "modality": mod.name,
                "sensor": mod.sensor,
                "bands": ", ".join(mod.bands),
                "wavelength_nm": ", ".join(
                    "-" if w is None or math.isnan(w) else f"{w:g}" for w in wl
                ),
                "unit": mod.band_objects[0].unit,
                "description": mod.description,
            }
        )
    return rows


ModalityBatch = Mapping[str, torch.Tensor]
