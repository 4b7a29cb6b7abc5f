"""The adapter contract: other foundation models behind the project's model interface.

An adapter wraps an upstream model (torchgeo, timm) as its submodule ``self.model`` and never
copies its forward. It declares:

* ``modalities``: which of the project's modalities (:mod:`mapex_analysis.modalities`) it
  accepts, and ``bands``: the project band names it feeds the upstream model, in the
  upstream channel order (fixed-band models) or the bands it can take (spectral models);
* ``normalization``: how physical units are mapped onto the upstream input (a name plus
  per-band mean/std in physical units: ``x' = (x - mean) / std``);
* ``pool`` (``"cls"`` or ``"mean"``), ``num_prefix_tokens`` (1 with a CLS token, 0 without),
  ``num_features``, ``img_size``, ``patch_size``.

``forward_features(x)`` maps a modality dict ``{name: (B, C, H, W)}`` in physical units onto the
upstream input and returns the upstream tokens ``(B, T, D)``; ``forward_head(tokens)`` pools them
exactly as the upstream model does; ``forward(x)`` returns the pooled features ``(B, D)``;
``forward_intermediates(x, indices)`` returns the tokens after the chosen blocks, read with
forward hooks while the upstream forward runs.

Bad input is an error that names the expected bands: a modality the model does not accept, a
band count that does not match, or (for fixed-band models) a band the model needs that no fed
modality carries. Missing bands are filled only when the caller asks, with ``fill="zeros"``
(0 in physical units) or ``fill="mean"`` (the band's normalisation mean, 0 after normalising).

Weights: :meth:`Adapter.load_weights` takes a local checkpoint file in the upstream key format
(``.pth``/``.pt`` via ``torch.load(weights_only=True)``, or ``.safetensors``) or a torchgeo
weight enum name (``"DOFABase16_Weights.DOFA_MAE"``; downloads, so it only works online). Keys
are checked strictly: a missing or unexpected key or any shape mismatch (the patch embedding
included) is an error naming the keys; only keys an adapter declares optional (a head the
upstream generates downstream) may be missing, and only keys it declares unused (e.g. an MAE
``mask_token``) may be extra. What was loaded is kept in ``model.weights_report``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mapex_analysis.modalities import (
    BANDS,
    BandError,
    ModalityError,
    bands_of,
    check_inputs,
    get_band,
    get_modality,
)
from mapex_analysis.models.contract import take_indices
from mapex_analysis.models.weights import (
    WeightsError,
    WeightsReport,
    download_state_dict,
    load_state_strict,
    read_state_dict,
    resolve_torchgeo_weights,
)
from mapex_analysis.options import FILL_POLICIES, FillPolicy

__all__ = [
    "FILL_POLICIES",
    "S2_MODALITIES",
    "Adapter",
    "FillPolicy",
    "Normalization",
    "build",
    "capture_points",
    "modality_bands",
    "project_normalization",
    "torchgeo_band",
]

logger = logging.getLogger(__name__)

#: The modalities that together carry all 13 Sentinel-2 bands (13-band models accept these).
S2_MODALITIES: tuple[str, ...] = ("coastal", "rgb", "red_edge", "nir", "swir", "atmospheric")


@dataclass(frozen=True)
class Normalization:
    """How physical units become the upstream model's input: ``(x - mean) / std`` per band.

    Attributes:
        name: What the statistics are (``"project"``, ``"imagenet"``, ``"ssl4eo-s12 dB"``...).
        mean: Band name -> mean in the band's physical unit.
        std: Band name -> standard deviation in the band's physical unit.
    """

    name: str
    mean: Mapping[str, float]
    std: Mapping[str, float]

    def stats(self, bands: Sequence[str]) -> tuple[list[float], list[float]]:
        """Means and stds of ``bands`` in order.

        Raises:
            BandError: naming a band these statistics do not cover.
        """
        missing = [b for b in bands if b not in self.mean or b not in self.std]
        if missing:
            raise BandError(
                f"normalisation {self.name!r} has no statistics for bands {missing}; "
                f"it covers {sorted(self.mean)}"
            )
        return [float(self.mean[b]) for b in bands], [float(self.std[b]) for b in bands]


def project_normalization(bands: Iterable[str] | None = None) -> Normalization:
    """The project's per-band statistics from :data:`mapex_analysis.modalities.BANDS`.

    Args:
        bands: Bands to cover (default: every band of the table).

    Returns:
        A :class:`Normalization` named ``"project"``.
    """
    names = list(bands) if bands is not None else list(BANDS)
    return Normalization(
        "project",
        {b: get_band(b).mean for b in names},
        {b: get_band(b).std for b in names},
    )


def modality_bands(modalities: Iterable[str]) -> tuple[str, ...]:
    """The bands of ``modalities``, concatenated in modality order."""
    return tuple(b for m in modalities for b in bands_of(m))


def torchgeo_band(name: str) -> str:
    """The project name of a band as torchgeo weight metadata spells it (``B1`` -> ``B01``).

    Raises:
        BandError: for a band the project's band table does not know.
    """
    if name in BANDS:
        return name
    if name.upper() in BANDS:  # torchgeo spells B8A as "B8a"
        return name.upper()
    if name.startswith("B") and name[1:].isdigit():
        return get_band(f"B{int(name[1:]):02d}").name
    return get_band(name).name


class Adapter(nn.Module):
    """Base class of every adapter; subclasses wrap one upstream family.

    Subclasses set the class attributes, build ``self.model`` and implement
    :meth:`_upstream_tokens` (tokens and pooled features from the upstream forward) and
    :meth:`forward_head`, and may override :meth:`_intermediate_points`,
    :meth:`_upstream_state_target`, :meth:`_convert_state` and :meth:`_prepare_state`.

    Attributes:
        family: Upstream family name for tables (``"dofa"``, ``"croma"``...).
        variable_bands: ``True`` for spectral models that take any subset of their bands
            (DOFA, CopernicusFM, Panopticon): only the fed modalities' bands are used.
            ``False`` for fixed-band models: every band in ``bands`` is needed.
        optional_keys: Upstream keys a checkpoint may lack (heads built downstream).
        unused_keys: Checkpoint keys the upstream model has no slot for and that are dropped.
        weight_enums: torchgeo weight enum members this adapter can load by name.
    """

    family: ClassVar[str] = "adapter"
    model: nn.Module
    variable_bands: ClassVar[bool] = False
    optional_keys: ClassVar[frozenset[str]] = frozenset()
    unused_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        *,
        modalities: Sequence[str],
        bands: Sequence[str],
        normalization: Normalization,
        pool: Literal["cls", "mean"],
        num_features: int,
        img_size: int,
        patch_size: int,
        num_prefix_tokens: int = 1,
        fill: FillPolicy | None = None,
    ) -> None:
        super().__init__()
        if fill is not None and fill not in FILL_POLICIES:
            raise ValueError(
                f"unknown fill policy {fill!r}; valid: None (missing bands are errors), "
                + ", ".join(repr(f) for f in FILL_POLICIES)
            )
        for m in modalities:
            get_modality(m)
        for b in bands:
            get_band(b)
        self.modalities: tuple[str, ...] = tuple(modalities)
        self.bands: tuple[str, ...] = tuple(bands)
        self.normalization = normalization
        normalization.stats(self.bands)  # every band needs statistics
        self.pool = pool
        self.num_features = num_features
        self.embed_dim = num_features
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens
        self.fill: FillPolicy | None = fill
        self.weights_report: WeightsReport | None = None
        self.weight_enums: tuple[Any, ...] = ()

    # ------------------------------------------------------------------ input mapping

    def bands_per_modality(self) -> dict[str, tuple[str, ...]]:
        """The bands of each accepted modality that this model uses, in channel order."""
        return {m: tuple(b for b in bands_of(m) if b in self.bands) for m in self.modalities}

    def _expected(self) -> str:
        return f"{type(self).__name__} expects bands {list(self.bands)} " + (
            "(any subset, by modality)" if self.variable_bands else "(all of them)"
        )

    def input_bands(self, x: Mapping[str, Tensor]) -> tuple[str, ...]:
        """The bands fed to the upstream model for the modalities present in ``x``.

        A ``"label"`` key (as datasets yield it) is ignored.

        Raises:
            ModalityError: for an empty dict or a modality this model does not accept.
        """
        x = {k: v for k, v in x.items() if k != "label"}
        if not x:
            raise ModalityError(f"empty input; {self._expected()}")
        unknown = [m for m in x if m not in self.modalities]
        if unknown:
            per = {m: list(b) for m, b in self.bands_per_modality().items()}
            raise ModalityError(
                f"{type(self).__name__} does not accept modalities {unknown}; it accepts "
                f"{list(self.modalities)} with bands {per}"
            )
        if not self.variable_bands:
            return self.bands
        present = {b for m in x for b in bands_of(m)}
        return tuple(b for b in self.bands if b in present)

    def filled_bands(self, x: Mapping[str, Tensor]) -> tuple[str, ...]:
        """The bands this model needs for input ``x`` that no fed modality carries (what the
        fill policy supplies; without one, :meth:`prepare_input` refuses them)."""
        present = {b for m in x if m != "label" for b in bands_of(m)}
        return tuple(b for b in self.input_bands(x) if b not in present)

    def prepare_input(self, x: Mapping[str, Tensor]) -> tuple[Tensor, tuple[str, ...]]:
        """Map a modality dict onto the upstream input tensor.

        Checks modality names, band counts and units (:func:`~mapex_analysis.modalities.
        check_inputs`: raw digital numbers, linear SAR power, impossible elevations, NaN/Inf
        are refused unless :func:`~mapex_analysis.modalities.unit_checks` turned checks off),
        takes the model's bands in the upstream channel order, fills missing bands only under
        the fill policy, and normalises.

        Args:
            x: ``{modality: (B, C, H, W)}`` in physical units.

        Returns:
            ``(B, C_up, H, W)`` normalised input and the band names of its channels.

        Raises:
            ModalityError: for an unaccepted modality.
            BandError: for a band-count mismatch, different batch sizes, or (fixed-band
                models, no fill policy) bands the model needs that no fed modality carries.
            ValueError: for an image size other than ``img_size``.
            UnitError: for values that cannot be in the modality's physical unit.
        """
        bands = self.input_bands(x)
        x = {k: v for k, v in x.items() if k != "label"}
        by_band: dict[str, Tensor] = {}
        shape: tuple[int, ...] | None = None
        for m, t in x.items():
            names = bands_of(m)
            if t.dim() != 4 or t.shape[1] != len(names):
                raise BandError(
                    f"modality {m!r} must be (B, {len(names)}, H, W) with bands {list(names)}, "
                    f"got shape {tuple(t.shape)}; {self._expected()}"
                )
            if shape is not None and (t.shape[0], *t.shape[2:]) != shape:
                raise BandError(
                    f"modality {m!r} has batch/spatial shape {(t.shape[0], *t.shape[2:])}, "
                    f"other modalities {shape}"
                )
            shape = (t.shape[0], *t.shape[2:])
            if tuple(int(s) for s in t.shape[2:]) != (self.img_size, self.img_size):
                raise ValueError(
                    f"modality {m!r} has size {tuple(t.shape[2:])}; {type(self).__name__} "
                    f"expects {(self.img_size, self.img_size)}"
                )
            for i, b in enumerate(names):
                by_band.setdefault(b, t[:, i])
        check_inputs(x, where=type(self).__name__)
        missing = [b for b in bands if b not in by_band]
        if missing and self.fill is None:
            raise BandError(
                f"missing bands {missing}: {self._expected()}; fed bands "
                f"{sorted(by_band)}. Pass fill='zeros' or fill='mean' to fill them explicitly"
            )
        assert shape is not None
        ref = next(iter(x.values()))
        mean, std = self.normalization.stats(bands)
        chans = []
        for b in bands:
            if b in by_band:
                chans.append(by_band[b])
            else:
                value = 0.0 if self.fill == "zeros" else float(get_band(b).mean)
                chans.append(ref.new_full((shape[0], *shape[1:]), value))
        if missing:
            logger.debug("%s: filled bands %s with %s", type(self).__name__, missing, self.fill)
        out = torch.stack(chans, dim=1)  # (B, C_up, H, W)
        m_t = torch.tensor(mean, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
        s_t = torch.tensor(std, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
        return (out - m_t) / s_t, bands

    # ------------------------------------------------------------------ model contract

    def _upstream_tokens(self, x: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Run the upstream forward; return its tokens and, when it pools, its pooled output."""
        raise TypeError(f"{type(self).__name__} does not define _upstream_tokens")

    def _run_reading(self, module: nn.Module, run: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
        """Call ``run`` (the upstream forward) while a forward hook reads ``module``'s output.

        Returns:
            ``module``'s output and what ``run`` returned.
        """
        store: dict[int, Tensor] = {}
        with capture_points([(module, "out")], {0}, store):
            result = run()
        return store[0], result

    def forward_features(self, x: Mapping[str, Tensor]) -> Tensor:
        """Upstream tokens ``(B, T, D)`` (``num_prefix_tokens`` CLS tokens first).

        Args:
            x: ``{modality: (B, C, H, W)}`` in physical units.
        """
        return self._upstream_tokens(x)[0]

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool tokens ``(B, T, D)`` into features ``(B, D)`` as the upstream model does.

        Adapters are headless, so ``pre_logits`` (timm's: stop before the head) changes nothing.
        """
        raise TypeError(f"{type(self).__name__} does not define forward_head")

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        """Pooled features ``(B, D)`` (pooling declared in ``self.pool``)."""
        tokens, pooled = self._upstream_tokens(x)
        return pooled if pooled is not None else self.forward_head(tokens)

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        """The upstream model's transformer blocks.

        A view onto ``self.model`` (not registered a second time, so state-dict keys stay
        unique).

        Raises:
            AttributeError: if the upstream model has no ``blocks``.
        """
        blocks = getattr(self.model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList | nn.Sequential):
            raise AttributeError(f"{type(self).__name__} wraps no upstream `blocks`")
        return blocks

    def _intermediate_points(self) -> list[tuple[nn.Module, Literal["in", "out"]]]:
        """Where the output of block ``i`` is read: (module, ``"out"`` of it or ``"in"``)."""
        return [(b, "out") for b in self.blocks]

    @property
    def depth(self) -> int:
        """Number of blocks :meth:`forward_intermediates` can return."""
        return len(self._intermediate_points())

    def forward_intermediates(
        self,
        x: Mapping[str, Tensor],
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> Any:
        """Tokens ``(B, T, D)`` after the chosen blocks, read while the upstream forward runs
        (timm's semantics, see :func:`~mapex_analysis.models.contract.take_indices`).

        Args:
            x: ``{modality: (B, C, H, W)}`` in physical units.
            indices: ``None`` (all blocks), an int ``n`` (the last ``n``) or block indices
                (negative counts from the end).
            norm: Apply the upstream final norm (``model.norm``) to the intermediates.
            intermediates_only: Return only the intermediates.

        Returns:
            ``(final tokens, [one tensor per selected block, in block order])``, or only the
            list with ``intermediates_only``.

        Raises:
            IndexError: for an index or count out of range.
            ValueError: for ``norm=True`` on an upstream model without a final ``norm``.
        """
        points = self._intermediate_points()
        idx = take_indices(len(points), indices)
        final_norm = getattr(self.model, "norm", None) if norm else None
        if norm and not isinstance(final_norm, nn.Module):
            raise ValueError(f"{type(self).__name__}: the upstream model has no final norm")
        store: dict[int, Tensor] = {}
        with capture_points(points, set(idx), store):
            tokens, _ = self._upstream_tokens(x)
        inter = [store[i] for i in idx]
        if final_norm is not None:
            inter = [final_norm(t) for t in inter]
        return inter if intermediates_only else (tokens, inter)

    # ------------------------------------------------------------------ weights

    def _upstream_state_target(self) -> nn.Module:
        """The module whose state dict the upstream checkpoint format matches."""
        model: nn.Module = self.model
        return model

    def _convert_state(self, state: dict[str, Any]) -> dict[str, Tensor]:
        """Turn the stored object into a flat state dict for the target (default: as is)."""
        bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
        if bad:
            raise WeightsError(f"checkpoint entries {bad[:5]} are not tensors")
        return dict(state)

    def _prepare_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Adjust a flat upstream state dict to this configuration (default: unchanged)."""
        return state

    def load_weights(self, weights: str | Path) -> WeightsReport:
        """Load upstream weights strictly.

        Args:
            weights: A local checkpoint file in the upstream key format, or a torchgeo weight
                enum name (see ``self.weight_enums``; downloads).

        Returns:
            The :class:`WeightsReport` (also kept in ``self.weights_report``).

        Raises:
            WeightsError: for a missing or unreadable file, an unknown weight name, a failed
                download, missing or unexpected keys (each named), or a shape mismatch (the
                key and both shapes named; patch-embedding mismatches are never skipped).
        """
        source = str(weights)
        if Path(weights).is_file():
            raw = read_state_dict(weights)
        else:
            member = resolve_torchgeo_weights(source, self.weight_enums)
            raw = download_state_dict(member)
        state = self._prepare_state(self._convert_state(raw))
        target = self._upstream_state_target()
        own = target.state_dict()
        ignored = sorted(k for k in state if k in self.unused_keys and k not in own)
        for k in ignored:
            state.pop(k)
        what = f"{type(self).__name__} ({type(target).__name__} keys)"
        missing = load_state_strict(target, state, source=source, what=what,
                                    optional=self.optional_keys)  # fmt: skip
        report = WeightsReport(source, len(state), missing, ignored)
        self.weights_report = report
        logger.info(
            "%s: loaded %d tensors from %s; optional keys missing: %s; unused keys dropped: %s",
            type(self).__name__,
            report.loaded,
            source,
            missing,
            ignored,
        )
        return report


@contextmanager
def capture_points(
    points: Sequence[tuple[nn.Module, Literal["in", "out"]]],
    wanted: set[int],
    store: dict[int, Tensor],
) -> Any:
    """Context manager: forward (pre-)hooks that store the tensor read at each wanted point.

    Args:
        points: ``(module, "in" | "out")`` per index: the module's first input or its output.
        wanted: Indices of ``points`` to record.
        store: Filled with ``{index: tensor}`` while the context is active.

    Yields:
        ``store``; the hooks are removed on exit.
    """
    handles = []

    def make(i: int, where: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], *rest: Any) -> None:
            value = args[0] if where == "in" else rest[0]
            store[i] = value

        return hook

    try:
        for i, (module, where) in enumerate(points):
            if i not in wanted:
                continue
            if where == "in":
                handles.append(module.register_forward_pre_hook(make(i, where)))
            else:
                handles.append(module.register_forward_hook(make(i, where)))
        yield store
    finally:
        for h in handles:
            h.remove()


def build(cls: Callable[..., Adapter], weights: str | Path | None, **kwargs: Any) -> Adapter:
    """Construct an adapter and load ``weights`` when given (entry-point helper).

    Raises:
        WeightsError: see :meth:`Adapter.load_weights`.
    """
    model = cls(**kwargs)
    if weights is not None:
        model.load_weights(weights)
    return model
