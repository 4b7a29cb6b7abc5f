"""Per-modality and per-band attribution with captum.

Both methods explain a **scalar output per sample** given as a callable
``f(x: dict[str, Tensor]) -> Tensor (B,)`` on a modality dict in physical units, e.g. a probe's
logit on the model's features (:func:`linear_logit`) or the feature norm
(:func:`feature_norm`).

* :func:`modality_ablation`: captum ``FeatureAblation`` with one feature group per modality
  (every value of a modality's tensor shares the group id). The attribution of modality ``m``
  is ``f(x) - f(x with m replaced by its baseline)``. A modality the output does not depend on
  gets exactly 0.
* :func:`band_integrated_gradients`: captum ``IntegratedGradients`` on every modality tensor,
  summed over pixels to one value per band, with captum's convergence delta
  ``sum(attributions) - (f(x) - f(baseline))``. Completeness holds when
  ``|delta| <= atol + rtol * |f(x) - f(baseline)|``, the tolerance the result reports.

Integrated gradients assumes ``f`` is continuous along the straight path from baseline to
input. A learned top-k router is not: where a token's expert switches, ``f`` jumps and the
gradient misses the jump, so the delta stays large however many steps are taken (measured on
``mapex_test`` with the ``modality`` router: |delta| 0.34-0.38 for |f(x) - f(b)| 0.45-0.64 at
both 64 and 256 steps; with the ``deterministic`` router |delta| < 2e-6). ``converged`` is
then ``False`` and a warning is logged; read such attributions with care.

Baseline (both methods, unless given): every band at its normalisation mean from
:mod:`mapex_analysis.modalities` (i.e. 0 after the model's normalisation; a physically valid
"average" scene), not zeros, which are outside the valid range of SAR in dB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from captum.attr import FeatureAblation, IntegratedGradients
from torch import Tensor, nn

from mapex_analysis.modalities import BandError, bands_of, get_band

__all__ = [
    "BandAttribution",
    "ModalityAttribution",
    "band_integrated_gradients",
    "default_baselines",
    "feature_norm",
    "linear_logit",
    "modality_ablation",
]

logger = logging.getLogger(__name__)

ScalarFn = Callable[[Mapping[str, Tensor]], Tensor]


def default_baselines(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Baseline tensors ``(1, C, H, W)``: each band filled with its normalisation mean.

    Args:
        inputs: ``{modality: (B, C, H, W)}``.

    Returns:
        ``{modality: (1, C, H, W)}`` in the same dtype and device.

    Raises:
        BandError: if a tensor's channel count differs from the modality's band count.
        ModalityError: for an unknown modality.
    """
    out = {}
    for m, x in inputs.items():
        bands = bands_of(m)
        if x.ndim != 4 or x.shape[1] != len(bands):
            raise BandError(
                f"modality {m!r} expects (B, {len(bands)}, H, W) with bands "
                f"{', '.join(bands)}; got shape {tuple(x.shape)}"
            )
        means = torch.tensor([get_band(b).mean for b in bands], dtype=x.dtype, device=x.device)
        out[m] = means.view(1, -1, 1, 1).expand(1, -1, *x.shape[2:]).contiguous()
    return out


def _prepare(
    fn: ScalarFn, inputs: Mapping[str, Tensor], baselines: Mapping[str, Tensor] | None
) -> tuple[tuple[str, ...], tuple[Tensor, ...], tuple[Tensor, ...], Callable[..., Tensor]]:
    if not inputs:
        raise ValueError("no inputs to attribute; give at least one modality tensor")
    names = tuple(inputs)
    base = dict(default_baselines(inputs)) if baselines is None else dict(baselines)
    missing = [m for m in names if m not in base]
    if missing:
        raise KeyError(f"no baseline for modalities {missing}; baselines given: {list(base)}")
    batch = {x.shape[0] for x in inputs.values()}
    if len(batch) != 1:
        raise ValueError(f"modality tensors differ in batch size: {sorted(batch)}")

    def forward(*xs: Tensor) -> Tensor:
        out = fn(dict(zip(names, xs, strict=True)))
        if out.ndim != 1 or out.shape[0] != xs[0].shape[0]:
            raise ValueError(
                f"the attributed function must return one scalar per sample, shape "
                f"({xs[0].shape[0]},); got {tuple(out.shape)}"
            )
        return out

    # Validate the output shape once, up front, with a clear message.
    with torch.no_grad():
        forward(*(inputs[m] for m in names))
    return (
        names,
        tuple(inputs[m].detach() for m in names),
        tuple(base[m].to(inputs[m]) for m in names),
        forward,
    )


@dataclass(frozen=True)
class ModalityAttribution:
    """Per-modality feature-ablation attribution.

    Attributes:
        modalities: The attributed modalities.
        values: ``{modality: (B,)}`` ``f(x) - f(x with the modality at its baseline)``.
        output: ``(B,)`` ``f(x)``.
    """

    modalities: tuple[str, ...]
    values: dict[str, Tensor]
    output: Tensor


def modality_ablation(
    fn: ScalarFn,
    inputs: Mapping[str, Tensor],
    *,
    baselines: Mapping[str, Tensor] | None = None,
) -> ModalityAttribution:
    """Contribution of each modality by feature ablation (captum ``FeatureAblation``).

    Args:
        fn: ``f(x) -> (B,)`` scalar output per sample.
        inputs: ``{modality: (B, C, H, W)}`` in physical units.
        baselines: ``{modality: tensor broadcastable to (B, C, H, W)}``; default:
            :func:`default_baselines`.

    Returns:
        :class:`ModalityAttribution`.

    Raises:
        ValueError: if ``fn`` does not return shape ``(B,)`` or the batch sizes differ.
        KeyError: if a modality has no baseline.
    """
    names, xs, bs, forward = _prepare(fn, inputs, baselines)
    masks = tuple(torch.full((1, *x.shape[1:]), i, dtype=torch.long) for i, x in enumerate(xs))
    with torch.no_grad():
        attr = FeatureAblation(forward).attribute(xs, baselines=bs, feature_mask=masks)
        output = forward(*xs)
    # Every element of a group carries the group's attribution; read one per sample.
    values = {m: a.flatten(1)[:, 0].detach() for m, a in zip(names, attr, strict=True)}
    return ModalityAttribution(names, values, output.detach())


@dataclass(frozen=True)
class BandAttribution:
    """Per-band integrated-gradients attribution with its completeness check.

    Attributes:
        attributions: ``{modality: (B, C, H, W)}`` pixel attributions.
        per_band: ``{band name: (B,)}`` attributions summed over pixels.
        delta: ``(B,)`` captum convergence delta ``sum(attr) - (f(x) - f(baseline))``.
        output: ``(B,)`` ``f(x)``.
        baseline_output: ``(B,)`` ``f(baseline)``.
        tolerance: ``(B,)`` ``atol + rtol * |f(x) - f(baseline)|``.
        converged: Whether ``|delta| <= tolerance`` for every sample.
        n_steps: Integration steps used.
    """

    attributions: dict[str, Tensor]
    per_band: dict[str, Tensor]
    delta: Tensor
    output: Tensor
    baseline_output: Tensor
    tolerance: Tensor
    converged: bool
    n_steps: int


def band_integrated_gradients(
    fn: ScalarFn,
    inputs: Mapping[str, Tensor],
    *,
    baselines: Mapping[str, Tensor] | None = None,
    n_steps: int = 64,
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
    rtol: float = 1e-2,
    atol: float = 1e-5,
) -> BandAttribution:
    """Per-band integrated gradients (captum) with the convergence check.

    Args:
        fn: ``f(x) -> (B,)`` scalar output per sample; differentiable.
        inputs: ``{modality: (B, C, H, W)}`` in physical units.
        baselines: ``{modality: tensor broadcastable to (B, C, H, W)}``; default:
            :func:`default_baselines`.
        n_steps: Integration steps.
        method: captum integration rule (``"gausslegendre"``, ``"riemann_trapezoid"``...).
        internal_batch_size: Passed to captum to bound memory.
        rtol: Relative completeness tolerance.
        atol: Absolute completeness tolerance.

    Returns:
        :class:`BandAttribution`; a warning is logged when it did not converge.

    Raises:
        ValueError: if ``fn`` does not return shape ``(B,)`` or ``n_steps < 1``.
        KeyError: if a modality has no baseline.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    names, xs, bs, forward = _prepare(fn, inputs, baselines)

    def connected(*args: Tensor) -> Tensor:
        # captum differentiates w.r.t. every input; a modality that f ignores would not be in
        # the graph (autograd error). An exactly-zero term ties it in: its gradient is 0.
        return forward(*args) + sum(0.0 * a.flatten(1).sum(dim=1) for a in args)

    ig = IntegratedGradients(connected)
    attr, delta = ig.attribute(
        xs,
        baselines=bs,
        n_steps=n_steps,
        method=method,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    with torch.no_grad():
        out = forward(*xs)
        base_out = forward(*(b.expand_as(x) for b, x in zip(bs, xs, strict=True)))
    tolerance = atol + rtol * (out - base_out).abs()
    delta = delta.detach().to(out.dtype)
    converged = bool((delta.abs() <= tolerance).all())
    if not converged:
        logger.warning(
            "integrated gradients did not converge (max |delta| %.3g > tolerance); "
            "raise n_steps (now %d)",
            float(delta.abs().max()),
            n_steps,
        )
    attributions = {m: a.detach() for m, a in zip(names, attr, strict=True)}
    per_band = {
        band: attributions[m][:, c].sum(dim=(1, 2))
        for m in names
        for c, band in enumerate(bands_of(m))
    }
    return BandAttribution(
        attributions, per_band, delta, out.detach(), base_out.detach(), tolerance, converged,
        n_steps,
    )  # fmt: skip


def feature_norm(model: nn.Module) -> ScalarFn:
    """``f(x) = ||model(x)||_2`` per sample: a label-free scalar output of a feature model.

    Caveat: features taken right after a LayerNorm with unit gain and zero bias (a freshly
    initialised encoder) have a norm of about ``sqrt(D)`` for every input, so there is nothing
    to attribute; use :func:`linear_logit` with a fitted probe there.

    Args:
        model: Maps a modality dict to pooled features ``(B, D)``.

    Returns:
        The callable.
    """

    def fn(x: Mapping[str, Tensor]) -> Tensor:
        return model(x).norm(dim=-1)

    return fn


def linear_logit(model: nn.Module, weight: Tensor, bias: Tensor | None, target: int) -> ScalarFn:
    """``f(x) = (model(x) @ weight.T + bias)[:, target]``: a linear probe's logit.

    Args:
        model: Maps a modality dict to pooled features ``(B, D)``.
        weight: ``(K, D)`` probe weights (e.g. ``LogisticRegression.coef_`` as a tensor,
            composed with the feature scaler when the probe standardises).
        bias: ``(K,)`` probe bias or ``None``.
        target: Class whose logit is explained.

    Returns:
        The callable.

    Raises:
        ValueError: if ``target`` is not a row of ``weight``.
    """
    if not 0 <= target < weight.shape[0]:
        raise ValueError(f"target class {target} not in [0, {weight.shape[0]})")

    def fn(x: Mapping[str, Tensor]) -> Tensor:
        feats = model(x)  # (B, D)
        logit = feats @ weight[target].to(feats)
        return logit + (bias[target] if bias is not None else 0.0)

    return fn
