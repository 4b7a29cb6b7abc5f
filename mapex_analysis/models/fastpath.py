"""Inference fast paths and the switch that turns them off.

Two layers take a faster route at inference than their definition spells out, computing the
same products: :class:`mapex_analysis.models.moe.MoEMLP` (the fused dispatch) and
:class:`AlignedLinear`, which width slimming builds for layers with an odd number of outputs.
Both run their plain definition in training, with gradients, under autocast, inside a
``torch.jit`` trace and inside :func:`module_dispatch`, the context MAC counting uses so that
every product is attributed to the module that computes it and no padding is counted as work.

:class:`AlignedLinear` exists because CPU GEMM kernels are slow for output widths that are not
a multiple of 8, which slimming produces (``round(0.1 * 1536) = 154`` hidden units, ``3 * 6 *
6 = 108`` qkv outputs): for 6,304 tokens of width 384, 154 outputs took 12.3-14.7 ms and the
same GEMM with 160 outputs (6 zero rows) 9.3-10.9 ms; over 36 odd widths from 12 to 1,151 the
padded GEMM was 1.27x faster in the median (one core). The padded rows are zero, their outputs
are cut off, and every kept output is the same dot product over the same inputs (equal bit for
bit in every case measured with 12 or more outputs; the tests allow float rounding).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_UNFUSED = threading.local()

#: Output widths are padded up to a multiple of this.
ALIGN = 8
#: Below this many outputs padding did not pay (9 outputs: 1.6 vs 2.1 ms).
MIN_ALIGNED = 12


@contextlib.contextmanager
def module_dispatch() -> Iterator[None]:
    """Within this context every layer runs its plain definition, never an inference fast path
    (the fused MoE dispatch, :class:`AlignedLinear`'s padded GEMM): what MAC counting needs to
    attribute each product to the expert (or shared expert) that computes it and to count no
    padding. Outputs and total MACs are the same either way."""
    prev = getattr(_UNFUSED, "on", False)
    _UNFUSED.on = True
    try:
        yield
    finally:
        _UNFUSED.on = prev


def fast_paths_allowed(like: torch.Tensor) -> bool:
    """Whether an inference fast path may run for a layer whose parameters are like ``like``:
    no gradients, no autocast on its device, not inside :func:`module_dispatch` or a
    ``torch.jit`` trace. (Layers check their own ``training`` flag.)"""
    return not (
        torch.is_grad_enabled()
        or getattr(_UNFUSED, "on", False)
        or torch.jit.is_tracing()
        or torch.is_autocast_enabled(like.device.type)
    )


def needs_alignment(out_features: int) -> bool:
    """Whether a linear layer with this many outputs gets :class:`AlignedLinear`."""
    return out_features >= MIN_ALIGNED and out_features % ALIGN != 0


class AlignedLinear(nn.Linear):
    """``nn.Linear`` whose CPU inference GEMM runs with its outputs padded to a multiple of 8.

    The same parameters, state-dict keys, MACs (as counted) and outputs as ``nn.Linear``; in
    eval mode without gradients on CPU it multiplies by a copy of the weight (and bias) with
    zero rows appended up to the next multiple of :data:`ALIGN` and returns the first
    ``out_features`` columns, contiguous (see the module docstring for why and by how much).
    The padded copy is rebuilt whenever the weight or bias is replaced, moved or changed in
    place (checked per call by identity, storage and version). Elsewhere (training, gradients,
    autocast, CUDA, :func:`module_dispatch`, tracing) it is plain ``nn.Linear``. The padded
    rows cost ``padded / out_features - 1`` more multiply-adds than are counted (at most 7 of
    the next multiple of 8), which buy no output.
    """

    #: (weight, bias, their storage and version, padded weight, padded bias); not state.
    _padded: tuple[object, object, tuple[int, ...], torch.Tensor, torch.Tensor | None] | None = None

    def _padded_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The zero-padded weight and bias, rebuilt when a parameter changed."""
        w, b = self.weight, self.bias
        stamp = (w.data_ptr(), w._version) + ((b.data_ptr(), b._version) if b is not None else ())
        hit = self._padded
        if hit is not None and hit[0] is w and hit[1] is b and hit[2] == stamp:
            return hit[3], hit[4]
        rows = -(-self.out_features // ALIGN) * ALIGN
        with torch.no_grad():
            wp = w.new_zeros(rows, self.in_features)
            wp[: self.out_features] = w
            bp = None
            if b is not None:
                bp = b.new_zeros(rows)
                bp[: self.out_features] = b
        self._padded = (w, b, stamp, wp, bp)
        return wp, bp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b``; on the padded GEMM at CPU inference (see the class docstring)."""
        w = self.weight
        if (
            self.training
            or w.device.type != "cpu"
            or w.is_inference()  # no version counter to notice in-place changes by
            or not fast_paths_allowed(w)
        ):
            return super().forward(x)
        wp, bp = self._padded_params()
        return F.linear(x, wp, bp)[..., : self.out_features].contiguous()
