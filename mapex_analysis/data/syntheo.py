"""SynthEO: a seeded, physically grounded multi-modal scene generator.

No real dataset can be downloaded on the machines this project is built on, so the package
ships scenes that behave like the real sensors:

* **Layout.** Each scene is a land-cover map: a domain-warped, weighted Voronoi partition whose
  regions carry the classes of :data:`~mapex_analysis.data.tasks.LANDCOVER_CLASSES`; a 3x3 box
  filter turns the hard map into per-pixel class fractions, so boundary pixels are mixtures.
* **Sentinel-2** (``rgb``, ``red_edge``, ``nir``, ``swir``): surface reflectance by linear
  spectral mixing of the per-class spectra in :data:`S2_SPECTRA`, with per-scene spectral
  jitter, per-pixel texture, per-scene illumination gain and Rayleigh-like path radiance
  (``~ lambda^-4``), per-pixel sensor noise and optional clouds (bright and flat in every S2
  band, SWIR included, which is what separates them from snow).
* **Sentinel-1** (``sar``): VV/VH backscatter per class (:data:`S1_BACKSCATTER_DB`), mixed in
  linear power, a per-scene incidence-angle offset, and multiplicative gamma speckle with
  :data:`SAR_LOOKS` equivalent looks; converted to dB and clipped to [-25, 0]. Clouds do not
  affect SAR.
* **Elevation** (``ele``): class-typical altitudes (:data:`CLASS_ELEVATION_M`, e.g. snow high,
  water and wetlands low) blurred across class boundaries, plus a per-scene offset and fractal
  (1/f^beta) relief, floored at sea level.
* **Events.** ``flood``: in half the scenes, water spreads over the lowest 20-50 % of the
  ground (the DEM keeps the pre-flood surface); every scene is cloudy by default, so optical
  bands see the water only through gaps. ``wildfire``: in half the scenes a burn scar
  (:data:`BURN_SPECTRUM`) covers 10-40 % of the scene.

Each modality carries information the others lack (broadleaf vs conifer: red edge / NIR;
lowland vs alpine grassland: elevation only; grassland vs wetland: SAR and SWIR; built-up vs
bare: SAR; snow vs cloud: SWIR; burn scar vs dark classes: NIR / SWIR), which is what makes
modality choice matter, as in the real world.

Generation is vectorised over chunks of :data:`CHUNK` scenes (chunks run on a small thread
pool). Chunk ``i`` of a split draws from its own ``numpy.random.Generator(PCG64)`` streams,
seeded by a SHA-256 of ``(seed, split, task, i, component)`` with one stream per component
(scene layout, optical, clouds, SAR), so the same seed gives bit-identical arrays across runs,
processes and thread counts, a larger ``n`` extends a split without changing its first scenes,
and turning clouds on changes the optical bands only. Generated splits are cached on disk (``.npz``, written
atomically) under a key that hashes the full generation config.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, uniform_filter
from scipy.special import ndtri
from torch.utils.data import Dataset

from mapex_analysis.cache import ArrayCache
from mapex_analysis.data.tasks import (
    LANDCOVER_CLASSES,
    TaskError,
    TaskSpec,
    get_task,
    validate_split,
)
from mapex_analysis.modalities import (
    DEFAULT_MODALITIES,
    bands_of,
    validate_modalities,
    wavelengths,
)

__all__ = [
    "CHUNK",
    "CLASS_ELEVATION_M",
    "CLOUD_SPECTRUM",
    "BURN_SPECTRUM",
    "DEFAULT_SPLIT_SIZES",
    "GENERATOR_VERSION",
    "OPTICAL_BANDS",
    "S1_BACKSCATTER_DB",
    "S2_SPECTRA",
    "SAR_LOOKS",
    "SceneConfig",
    "SynthEO",
    "default_cache_dir",
    "generate",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the physics changes, so stale caches are never read.
GENERATOR_VERSION = "syntheo-2"

#: Scenes generated per random stream (determinism unit).
CHUNK = 256

#: Default number of scenes per split: sized for a CPU study.
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 2000, "val": 500, "test": 1000}

#: Sentinel-2 bands that SynthEO renders, in the column order of the spectra tables.
OPTICAL_BANDS: tuple[str, ...] = (
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B11",
    "B12",
)

# fmt: off
#: Surface reflectance (0-1) per class at :data:`OPTICAL_BANDS`. Shapes follow the USGS spectral
#: library (Kokaly et al., 2017) and ESA WorldCover class signatures:
#: water: low everywhere, falling to ~0 in NIR/SWIR (strong liquid-water absorption);
#: vegetation: chlorophyll absorption in red, green peak, steep red-edge rise to a high NIR
#: plateau (leaf mesophyll scattering); broadleaf canopies scatter more NIR than conifers
#: (shoot clumping, darker needles), with nearly identical visible reflectance;
#: grassland vs wetland: same pigments, but leaf/soil water lowers SWIR (B11 1610, B12 2190 nm);
#: built-up and bare soil: bright and spectrally flat, close in every band (soil slightly
#: redder and brighter in SWIR); snow/ice: very bright in the visible, lower NIR, almost black
#: in SWIR (ice absorption), which separates it from clouds.
S2_SPECTRA: np.ndarray = np.array([
    #  B02    B03    B04    B05    B06    B07    B08    B8A    B11    B12
    [0.060, 0.050, 0.030, 0.025, 0.020, 0.016, 0.012, 0.010, 0.005, 0.003],  # water
    [0.030, 0.060, 0.035, 0.090, 0.280, 0.380, 0.420, 0.430, 0.210, 0.100],  # broadleaf_forest
    [0.030, 0.060, 0.035, 0.075, 0.180, 0.230, 0.260, 0.265, 0.190, 0.090],  # conifer_forest
    [0.050, 0.090, 0.070, 0.130, 0.250, 0.310, 0.340, 0.350, 0.280, 0.160],  # lowland_grassland
    [0.050, 0.090, 0.070, 0.130, 0.250, 0.310, 0.340, 0.350, 0.280, 0.160],  # alpine_grassland
    [0.050, 0.090, 0.070, 0.130, 0.250, 0.300, 0.320, 0.330, 0.170, 0.080],  # wetland
    [0.120, 0.130, 0.140, 0.150, 0.170, 0.180, 0.200, 0.210, 0.240, 0.210],  # built_up
    [0.115, 0.130, 0.150, 0.165, 0.180, 0.190, 0.210, 0.220, 0.290, 0.250],  # bare_soil
    [0.900, 0.880, 0.850, 0.820, 0.800, 0.780, 0.750, 0.740, 0.080, 0.050],  # snow_ice
], dtype=np.float32)

#: Optically thick water cloud: bright and nearly flat from the visible to SWIR (Mie
#: scattering by droplets), slightly darker in B11/B12 (droplet absorption), never as dark as
#: snow in SWIR.
CLOUD_SPECTRUM: np.ndarray = np.array(
    [0.620, 0.610, 0.600, 0.600, 0.600, 0.600, 0.590, 0.590, 0.480, 0.380], dtype=np.float32
)

#: Fresh burn scar (char and ash): dark in the visible (like conifers and water), low NIR
#: (canopy scattering gone) and high SWIR (dry, exposed soil), hence the negative normalised
#: burn ratio NBR = (B8A - B12) / (B8A + B12) of Key & Benson (2006).
BURN_SPECTRUM: np.ndarray = np.array(
    [0.040, 0.050, 0.060, 0.070, 0.080, 0.090, 0.100, 0.110, 0.250, 0.280], dtype=np.float32
)

#: Sentinel-1 C-band backscatter sigma0 (dB) per class, (VV, VH). Values follow typical IW GRD
#: statistics (e.g. the SEN12MS and ESA WorldCover S1 class medians): calm water is a specular
#: reflector (very low); forests: volume scattering (high VH); grassland: moderate; wetlands:
#: double bounce between water surface and stems (high VV, moderate VH); built-up: corner
#: reflectors (highest VV and VH), which separates it from bare soil (smooth surface, low
#: cross-pol); dry snow: mostly transparent, ground-dominated, low.
S1_BACKSCATTER_DB: np.ndarray = np.array([
    #  VV      VH
    [-21.0, -27.0],  # water
    [ -7.5, -13.0],  # broadleaf_forest
    [ -8.0, -13.5],  # conifer_forest
    [-11.0, -17.5],  # lowland_grassland
    [-11.0, -17.5],  # alpine_grassland
    [ -5.5, -15.5],  # wetland
    [ -3.0, -10.0],  # built_up
    [-13.5, -21.5],  # bare_soil
    [-14.5, -22.5],  # snow_ice
], dtype=np.float32)

#: Burn scar backscatter (dB): volume scattering of the canopy is gone.
BURN_BACKSCATTER_DB: np.ndarray = np.array([-12.0, -19.5], dtype=np.float32)
# fmt: on

#: Class-typical altitude (m a.s.l.): water and wetlands in valley floors, conifers and bare
#: ground in the montane belt, alpine grassland above the tree line, snow/ice highest.
CLASS_ELEVATION_M: np.ndarray = np.array(
    [150.0, 450.0, 1300.0, 350.0, 2100.0, 150.0, 250.0, 900.0, 2900.0], dtype=np.float32
)

#: Equivalent number of looks of the Sentinel-1 GRD speckle (gamma-distributed intensity).
SAR_LOOKS = 4.4

# Rayleigh path radiance scales as lambda^-4 (relative to B02 at 490 nm).
_WAVELENGTHS_NM = np.array(wavelengths(OPTICAL_BANDS, "nm"), dtype=np.float32)

_MODALITY_COLUMNS: dict[str, list[int]] = {
    m: [OPTICAL_BANDS.index(b) for b in bands_of(m)] for m in ("rgb", "red_edge", "nir", "swir")
}


@dataclass(frozen=True)
class SceneConfig:
    """Everything that determines a generated split (hashed into the cache key).

    Attributes:
        task: Task name.
        split: ``train``, ``val`` or ``test`` (``fewshot`` is drawn from ``train``).
        seed: Base seed.
        n: Number of scenes.
        img_size: Scene side in pixels.
        clouds: Probability that a scene is cloudy (cloud cover 30-100 % of the scene).
    """

    task: str
    split: str
    seed: int
    n: int
    img_size: int
    clouds: float

    def cache_meta(self) -> dict[str, Any]:
        """What determines the scenes: the config, :data:`GENERATOR_VERSION` and the chunk."""
        return {**self.__dict__, "version": GENERATOR_VERSION, "chunk": CHUNK}

    def key(self) -> str:
        """The cache key of :meth:`cache_meta` (:meth:`ArrayCache.key`)."""
        return ArrayCache.key(self.cache_meta())


def _stream(*parts: object) -> np.random.Generator:
    """A PCG64 generator seeded from a SHA-256 of ``parts`` (stable across processes)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


_FILTERS: dict[tuple[int, float], np.ndarray] = {}


def _fractal_noise(rng: np.random.Generator, b: int, h: int, beta: float) -> np.ndarray:
    """Gaussian random fields with a 1/f^beta power spectrum, unit std per scene: (b, h, h)."""
    filt = _FILTERS.get((h, beta))
    if filt is None:
        fy = np.fft.fftfreq(h)[:, None]
        fx = np.fft.rfftfreq(h)[None, :]
        f = np.sqrt(fx**2 + fy**2)
        f[0, 0] = np.inf  # no DC: the field has zero mean
        filt = (f ** (-beta / 2.0)).astype(np.float32)
        _FILTERS[(h, beta)] = filt
    white = rng.standard_normal((b, h, h), dtype=np.float32)
    field = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(h, h)).astype(np.float32)
    field -= field.mean(axis=(1, 2), keepdims=True)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-6
    return field


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 box filter over the last two axes with edge replication."""
    size = (1,) * (x.ndim - 2) + (3, 3)
    return uniform_filter(x, size=size, mode="nearest")


def _layout(rng: np.random.Generator, b: int, h: int) -> np.ndarray:
    """Per-pixel class fractions of ``b`` scenes: (b, K, h, h), summing to 1 over K.

    A weighted Voronoi partition with 6 seeds, two of which carry the scene's primary class
    (so that one class usually dominates), warped by smooth noise for irregular boundaries,
    then box-filtered so boundary pixels are mixtures.
    """
    k = len(LANDCOVER_CLASSES)
    n_seeds = 6
    primary = rng.integers(0, k, size=b)
    classes = rng.integers(0, k, size=(b, n_seeds))
    classes[:, :2] = primary[:, None]
    seeds = rng.random((b, n_seeds, 2), dtype=np.float32) * h
    weights = rng.uniform(0.7, 1.4, size=(b, n_seeds)).astype(np.float32)
    weights[:, :2] *= 1.25  # the primary class grows larger regions
    warp = _fractal_noise(rng, 2 * b, h, 3.0).reshape(b, 2, h, h) * (0.08 * h)
    yy, xx = np.meshgrid(
        np.arange(h, dtype=np.float32), np.arange(h, dtype=np.float32), indexing="ij"
    )
    py = yy[None] + warp[:, 0]  # (b, h, h)
    px = xx[None] + warp[:, 1]
    d2 = (py[:, None] - seeds[:, :, 0, None, None]) ** 2 + (
        px[:, None] - seeds[:, :, 1, None, None]
    ) ** 2
    d2 /= weights[:, :, None, None] ** 2  # (b, S, h, h)
    nearest = d2.argmin(axis=1)  # (b, h, h)
    cmap = np.take_along_axis(classes, nearest.reshape(b, -1), axis=1).reshape(b, h, h)
    onehot = (cmap[:, None] == np.arange(k)[None, :, None, None]).astype(np.float32)
    return _box3(onehot)


def _soft_mask(field: np.ndarray, cover: np.ndarray, softness: float = 0.4) -> np.ndarray:
    """A soft mask covering roughly ``cover`` of each scene where ``field`` is highest.

    ``field`` is a unit-variance Gaussian field, so the threshold for a cover fraction ``c`` is
    the standard normal quantile ``Phi^-1(1 - c)``.
    """
    thr = ndtri(np.clip(1.0 - cover, 1e-4, 1 - 1e-4)).astype(np.float32)
    return np.clip((field - thr[:, None, None]) / softness + 0.5, 0.0, 1.0)


def _generate_chunk(cfg: SceneConfig, spec: TaskSpec, chunk: int, b: int) -> dict[str, np.ndarray]:
    """Render ``b`` scenes of chunk number ``chunk`` (all six modalities, label, dominant class)."""
    # Independent streams per component: turning clouds on changes optical bands only.
    rng = _stream(cfg.seed, cfg.split, cfg.task, chunk, "scene")
    rng_opt = _stream(cfg.seed, cfg.split, cfg.task, chunk, "optical")
    rng_cloud = _stream(cfg.seed, cfg.split, cfg.task, chunk, "clouds")
    rng_sar = _stream(cfg.seed, cfg.split, cfg.task, chunk, "sar")
    h = cfg.img_size
    k = len(LANDCOVER_CLASSES)
    frac = _layout(rng, b, h)  # (b, K, h, h)
    hard = frac.argmax(axis=1)  # (b, h, h)
    flat_hard = hard.reshape(b, -1) + (np.arange(b) * k)[:, None]
    cover = np.bincount(flat_hard.ravel(), minlength=b * k).reshape(b, k) / float(h * h)  # (b, K)

    # --- elevation: class altitudes, smoothed, + scene offset + fractal terrain ---------------
    class_alt = np.einsum("bkhw,k->bhw", frac, CLASS_ELEVATION_M)
    # Terrain is smooth across class boundaries: ~3 px (30 m at 10 m GSD) Gaussian blur.
    class_alt = gaussian_filter(class_alt, sigma=(0, 3, 3), mode="nearest")
    terrain = _fractal_noise(rng, b, h, 3.0)
    offset = rng.normal(0.0, 250.0, size=(b, 1, 1)).astype(np.float32)
    relief = rng.uniform(80.0, 300.0, size=(b, 1, 1)).astype(np.float32)
    elev = class_alt + offset + relief * terrain
    elev += rng.normal(0.0, 5.0, size=elev.shape).astype(np.float32)  # DEM noise (m)
    elev = np.maximum(elev, 0.0)  # land surfaces end at sea level

    # --- task-specific surface changes --------------------------------------------------------
    extra_frac = np.zeros((b, h, h), dtype=np.float32)  # burn scar or flood water fraction
    extra_kind = None
    label: np.ndarray | None = None
    if spec.name == "flood":
        flooded = rng.random(b) < 0.5
        # Flood water spreads over the lowest ground of the scene: 20-50 % of the area.
        extent = rng.uniform(0.2, 0.5, size=b).astype(np.float32)
        z = (elev - elev.mean(axis=(1, 2), keepdims=True)) / (
            elev.std(axis=(1, 2), keepdims=True) + 1e-3
        )
        extra_frac = _soft_mask(-z, extent, softness=0.3) * flooded[:, None, None]
        extra_kind = "water"
        label = flooded.astype(np.int64)
    elif spec.name == "wildfire":
        burned = rng.random(b) < 0.5
        extent = rng.uniform(0.1, 0.4, size=b).astype(np.float32)
        extra_frac = _soft_mask(_fractal_noise(rng, b, h, 2.5), extent) * burned[:, None, None]
        extra_frac *= rng.uniform(0.6, 1.0, size=(b, 1, 1)).astype(np.float32)  # burn severity
        extra_kind = "burn"
        label = burned.astype(np.int64)

    # --- Sentinel-2 reflectance ---------------------------------------------------------------
    nb = len(OPTICAL_BANDS)
    spectra = S2_SPECTRA[None] * (1.0 + 0.10 * rng_opt.standard_normal((b, k, 1), dtype=np.float32))
    spectra = spectra + 0.012 * rng_opt.standard_normal((b, k, nb), dtype=np.float32)
    flat = frac.reshape(b, k, h * h)  # (b, K, HW)
    refl = np.matmul(spectra.transpose(0, 2, 1), flat).reshape(b, nb, h, h)  # linear mixing
    texture = 1.0 + 0.08 * _fractal_noise(rng_opt, b, h, 1.5)
    refl *= texture[:, None]
    if extra_kind is not None:
        target = S2_SPECTRA[0] if extra_kind == "water" else BURN_SPECTRUM
        e = extra_frac[:, None]
        refl *= 1.0 - e
        refl += target[None, :, None, None] * e
    gain = rng_opt.uniform(0.85, 1.15, size=(b, 1, 1, 1)).astype(np.float32)
    path = (
        rng_opt.uniform(0.0, 0.03, size=(b, 1, 1, 1)).astype(np.float32)
        * (490.0 / _WAVELENGTHS_NM)[None, :, None, None] ** 4
    )
    refl *= gain
    refl += path
    if cfg.clouds > 0:
        cloudy = rng_cloud.random(b) < cfg.clouds
        amount = rng_cloud.uniform(0.3, 1.0, size=b).astype(np.float32)
        alpha = _soft_mask(_fractal_noise(rng_cloud, b, h, 2.5), amount) * cloudy[:, None, None]
        alpha *= rng_cloud.uniform(0.85, 1.0, size=(b, 1, 1)).astype(
            np.float32
        )  # optical thickness
        refl *= 1.0 - alpha[:, None]
        refl += CLOUD_SPECTRUM[None, :, None, None] * alpha[:, None]
    noise = rng_opt.standard_normal(refl.shape, dtype=np.float32)  # sensor noise
    noise *= 0.008
    refl += noise
    np.clip(refl, 0.0, 1.5, out=refl)

    # --- Sentinel-1 backscatter ---------------------------------------------------------------
    s1_lin = 10.0 ** (S1_BACKSCATTER_DB / 10.0)  # (K, 2)
    sar = np.matmul(s1_lin.T[None], flat).reshape(b, 2, h, h)  # mixing in linear power
    if extra_kind is not None:
        target_db = S1_BACKSCATTER_DB[0] if extra_kind == "water" else BURN_BACKSCATTER_DB
        e = extra_frac[:, None]
        sar = sar * (1.0 - e) + (10.0 ** (target_db / 10.0))[None, :, None, None] * e
    incidence = rng_sar.normal(0.0, 1.0, size=(b, 1, 1, 1)).astype(np.float32)  # dB, per scene
    speckle = rng_sar.standard_gamma(SAR_LOOKS, size=sar.shape, dtype=np.float32) / SAR_LOOKS
    sar *= speckle
    sar_db = np.log10(sar + 1e-6)
    sar_db *= 10.0
    sar_db += incidence
    np.clip(sar_db, -25.0, 0.0, out=sar_db)

    out = {
        "rgb": refl[:, _MODALITY_COLUMNS["rgb"]],
        "red_edge": refl[:, _MODALITY_COLUMNS["red_edge"]],
        "nir": refl[:, _MODALITY_COLUMNS["nir"]],
        "swir": refl[:, _MODALITY_COLUMNS["swir"]],
        "sar": sar_db,
        "ele": elev[:, None],
        "_dominant": cover.argmax(axis=1).astype(np.int64),
    }
    if spec.kind == "multiclass":
        label = out["_dominant"]
    elif spec.kind == "multilabel":
        label = (cover >= 0.05).astype(np.float32)
    elif spec.kind == "segmentation":
        label = hard.astype(np.int64)
    if label is not None:
        out["label"] = label
    return {name: np.ascontiguousarray(a, dtype=a.dtype) for name, a in out.items()}


def generate(cfg: SceneConfig, *, workers: int | None = None) -> dict[str, np.ndarray]:
    """Generate a split from scratch (no cache).

    Args:
        cfg: The generation config.
        workers: Threads generating chunks in parallel (numpy releases the GIL in the heavy
            ops); default ``min(2, os.cpu_count())``. Results do not depend on it: every chunk
            has its own random stream.

    Returns:
        ``{modality: float32 (N, C, H, W)}`` for all six modalities, ``"label"`` (absent for
        ``pretrain``) and ``"_dominant"`` (dominant land-cover class per scene, int64).

    Raises:
        TaskError: for an unknown task or split.
        ValueError: for ``n < 0`` or ``img_size < 4``.
    """
    spec = get_task(cfg.task)
    validate_split(cfg.split)
    if cfg.n < 0:
        raise ValueError(f"n must be >= 0, got {cfg.n}")
    if cfg.img_size < 4:
        raise ValueError(f"img_size must be >= 4 pixels, got {cfg.img_size}")
    starts = list(range(0, cfg.n, CHUNK))
    if not starts:
        return {name: a[:0] for name, a in _generate_chunk(cfg, spec, 0, 1).items()}
    nthreads = max(1, min(workers or min(2, os.cpu_count() or 1), len(starts)))
    out: dict[str, np.ndarray] = {}

    def work(i: int) -> None:
        chunk = _generate_chunk(cfg, spec, i, CHUNK)
        start = starts[i]
        take = min(CHUNK, cfg.n - start)
        for name, a in chunk.items():
            out[name][start : start + take] = a[:take]

    first = _generate_chunk(cfg, spec, 0, CHUNK)
    for name, a in first.items():
        out[name] = np.empty((cfg.n, *a.shape[1:]), dtype=a.dtype)
        out[name][: min(CHUNK, cfg.n)] = a[: min(CHUNK, cfg.n)]
    if len(starts) > 1:
        with ThreadPoolExecutor(max_workers=nthreads) as pool:
            list(pool.map(work, range(1, len(starts))))
    return out


def default_cache_dir() -> Path:
    """``$MAPEX_CACHE/syntheo`` if set, else ``~/.cache/mapex_analysis/syntheo``."""
    root = os.environ.get("MAPEX_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "mapex_analysis"
    return base / "syntheo"


def _load_or_generate(cfg: SceneConfig, cache_dir: Path | None) -> dict[str, np.ndarray]:
    if cache_dir is None:
        return generate(cfg)
    cache = ArrayCache(cache_dir)
    meta = cfg.cache_meta()
    prefix = f"{cfg.task}-{cfg.split}"
    cached = cache.load(meta, prefix)
    if cached is not None:
        logger.debug("SynthEO cache hit %s", cache.path(meta, prefix))
        return cached
    arrays = generate(cfg)
    path = cache.save(meta, arrays, prefix)
    logger.info("SynthEO cached %d %s/%s scenes at %s", cfg.n, cfg.task, cfg.split, path)
    return arrays


class SynthEO(Dataset):
    """One split of a SynthEO task as a torch ``Dataset`` of modality dicts.

    ``ds[i]`` is ``{modality: FloatTensor(C, H, W), "label": ...}`` in physical units
    (reflectance 0-1, dB, metres); the label is a ``LongTensor()`` (multiclass, binary), a
    ``FloatTensor(K)`` (multilabel) or a ``LongTensor(H, W)`` (segmentation), and absent for
    ``pretrain``. :meth:`arrays` gives the whole split as numpy arrays for batched work.

    Args:
        task: One of :data:`~mapex_analysis.data.tasks.TASKS`.
        split: ``train``, ``val``, ``test`` or ``fewshot`` (``shots`` scenes per class drawn
            from the train split; for multilabel and segmentation tasks, per dominant class).
        seed: Base seed; the same seed gives bit-identical data.
        n: Number of scenes; defaults to :data:`DEFAULT_SPLIT_SIZES`. For ``fewshot`` it is the
            size of the train pool the shots are drawn from.
        modalities: Modalities to return; default all six.
        img_size: Scene side in pixels.
        clouds: Probability that a scene is cloudy (``True`` = 1, ``False`` = 0); ``None``
            takes the task default (1.0 for ``flood``, 0.2 for ``pretrain``, else 0).
        cache_dir: Cache directory; ``None`` uses :func:`default_cache_dir`.
        cache: Set ``False`` to generate in memory without touching the disk.
        shots: Scenes per class in the ``fewshot`` split.

    Raises:
        TaskError: for an unknown task or split, or ``fewshot`` on an unlabelled task.
        ModalityError: for an unknown or empty modality selection.
        ValueError: for a negative ``n``, ``shots < 1`` or ``clouds`` outside [0, 1].
    """

    def __init__(
        self,
        task: str,
        split: str = "train",
        *,
        seed: int = 0,
        n: int | None = None,
        modalities: Sequence[str] | None = None,
        img_size: int = 32,
        clouds: float | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache: bool = True,
        shots: int = 5,
    ) -> None:
        self.task: TaskSpec = get_task(task)
        self.split = validate_split(split)
        self.modalities: tuple[str, ...] = validate_modalities(
            DEFAULT_MODALITIES if modalities is None else modalities, allowed=DEFAULT_MODALITIES
        )
        cloud_p = self.task.clouds if clouds is None else float(clouds)
        if not 0.0 <= cloud_p <= 1.0:
            raise ValueError(f"clouds must be a probability in [0, 1], got {clouds!r}")
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        if split == "fewshot" and self.task.kind == "unlabelled":
            raise TaskError(f"task {task!r} is unlabelled and has no 'fewshot' split")
        base_split = "train" if split == "fewshot" else split
        size = DEFAULT_SPLIT_SIZES[base_split] if n is None else int(n)
        self.seed = seed
        self.img_size = img_size
        self.clouds = cloud_p
        self.shots = shots
        self.config = SceneConfig(task, base_split, seed, size, img_size, cloud_p)
        cdir = (
            None if not cache else Path(cache_dir) if cache_dir is not None else default_cache_dir()
        )
        data = _load_or_generate(self.config, cdir)
        if split == "fewshot":
            idx = self._fewshot_indices(data)
            data = {name: a[idx] for name, a in data.items()}
            self.indices: np.ndarray | None = idx
        else:
            self.indices = None
        self._dominant = data.pop("_dominant")
        self._data = data
        self._tensors: dict[str, torch.Tensor] = {k: torch.from_numpy(v) for k, v in data.items()}

    def _fewshot_indices(self, data: dict[str, np.ndarray]) -> np.ndarray:
        by = data["label"] if self.task.kind in ("multiclass", "binary") else data["_dominant"]
        rng = _stream(self.seed, "fewshot", self.task.name, self.shots)
        picks: list[np.ndarray] = []
        for c in range(self.task.num_classes):
            pool = np.flatnonzero(by == c)
            if len(pool) < self.shots:
                logger.warning(
                    "fewshot: class %r has %d scenes in the train pool, wanted %d",
                    self.task.class_names[c],
                    len(pool),
                    self.shots,
                )
            picks.append(rng.choice(pool, size=min(self.shots, len(pool)), replace=False))
        return np.sort(np.concatenate(picks))

    def __len__(self) -> int:
        return len(self._dominant)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a split of {len(self)} scenes")
        item = {m: self._tensors[m][index] for m in self.modalities}
        if "label" in self._tensors:
            item["label"] = self._tensors["label"][index]
        return item

    def arrays(self) -> dict[str, np.ndarray]:
        """The whole split: ``{modality: float32 (N, C, H, W)}`` plus ``"label"`` if labelled."""
        out = {m: self._data[m] for m in self.modalities}
        if "label" in self._data:
            out["label"] = self._data["label"]
        return out

    @property
    def dominant_class(self) -> np.ndarray:
        """Dominant land-cover class of each scene (int64, (N,)), for every task."""
        return self._dominant

    @property
    def bands(self) -> dict[str, tuple[str, ...]]:
        """Band names of each returned modality, in channel order."""
        return {m: bands_of(m) for m in self.modalities}

    def __repr__(self) -> str:
        return (
            f"SynthEO(task={self.task.name!r}, split={self.split!r}, n={len(self)}, "
            f"seed={self.seed}, modalities={list(self.modalities)}, img_size={self.img_size}, "
            f"clouds={self.clouds})"
        )

    def describe(self) -> dict[str, Any]:
        """Config and class counts of the split (for reports and logs)."""
        counts = np.bincount(self._dominant, minlength=len(LANDCOVER_CLASSES))
        return {
            "task": self.task.name,
            "split": self.split,
            "n": len(self),
            "seed": self.seed,
            "img_size": self.img_size,
            "clouds": self.clouds,
            "modalities": list(self.modalities),
            "dominant_class_counts": dict(zip(LANDCOVER_CLASSES, counts.tolist())),
        }
