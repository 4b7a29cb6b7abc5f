"""Inference fast paths and the switch that turns them off.

Three layers take a faster route at inference than their definition spells out, computing
the same products: :class:`mapex_analysis.models.moe.MoEMLP` (the fused dispatch),
:class:`AlignedLinear`, which width slimming builds for layers with an odd number of outputs,
and the timm attention layers that slimming leaves with 2-11 dimensions per head
(:func:`pad_attention_heads`). All run their plain definition in training, with gradients,
under autocast, inside a ``torch.jit`` trace and inside :func:`module_dispatch`, the context MAC
counting uses so that every product is attributed to the module that computes it and no
padding is counted as work.

:class:`AlignedLinear` exists because CPU GEMM kernels are slow for output widths that are not
a multiple of 8, which slimming produces (``round(0.1 * 1536) = 154`` hidden units, ``3 * 6 *
6 = 108`` qkv outputs): for 6,304 tokens of width 384, 154 outputs took 12.3-14.7 ms and the
same GEMM with 160 outputs (6 zero rows) 9.3-10.9 ms; over 36 odd widths from 12 to 1,151 the
padded GEMM was 1.27x faster in the median (one core). The padded rows are zero, their outputs
are cut off, and every kept output is the same dot product over the same inputs (equal bit for
bit in every case measured with 12 or more outputs; the tests allow float rounding).

:func:`pad_attention_heads` exists because the CPU flash-attention kernel is slower at a few
dimensions per head than at 16: for 32 x 6 heads x 197 tokens, 16.2 ms a call at 6 dims and
13.3 ms with q, k and v zero-padded to 16 dims (the explicit scale ``1 / sqrt(6)`` kept); the
padded dims add zero to every score and their output columns are cut off, so the result is
the same up to float rounding (3e-6 on a slimmed ViT-S/16). Padding paid for 2-11 dims per head
from about 100 tokens on (1.1-1.5x) and lost below 50 tokens, so it is applied per call only
there; a slimmed ViT-S/16 at ``s = 0.1`` got 5 % faster (median over 11 side-by-side rounds).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_UNFUSED = threading.local()

#: Output widths are padded up to a multiple of this.
ALIGN = 8
#: Below this many outputs padding did not pay (9 outputs: 1.6 vs 2.1 ms).
MIN_ALIGNED = 12
#: Attention heads of ``2..MAX_PADDED_HEAD`` dims run padded to ``PADDED_HEAD`` dims ...
PADDED_HEAD = 16
MAX_PADDED_HEAD = 11
#: ... when a sequence has at least this many tokens.
MIN_PADDED_TOKENS = 100

_SDPA = F.scaled_dot_product_attention


@contextlib.contextmanager
def module_dispatch() -> Iterator[None]:
    """Within this context every layer runs its plain definition, never an inference fast path
    (the fused MoE dispatch, :class:`AlignedLinear`'s padded GEMM, the padded attention heads of
    :func:`pad_attention_heads`): what MAC counting needs to
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


def _pads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether an attention call with these q, k, v runs padded: 2-11 dims per head alike in q,
    k and v (the pre-hook that enters the mode has checked the device and the token count)."""
    d = q.shape[-1]
    return 2 <= d <= MAX_PADDED_HEAD and k.shape[-1] == d and v.shape[-1] == d


class _PadHeads(TorchFunctionMode):
    """Runs ``scaled_dot_product_attention`` on q, k, v zero-padded to :data:`PADDED_HEAD` dims
    (scale kept at ``1 / sqrt(d)``, output cut back to ``d`` columns) where :func:`_pads` says
    so; every other call, and every call with dropout, passes through unchanged."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if (
            func is _SDPA
            and len(args) == 3
            and set(kwargs) <= {"attn_mask", "dropout_p", "is_causal", "scale"}
            and not kwargs.get("dropout_p")
            and _pads(*args)
        ):
            q, k, v = args
            d = q.shape[-1]
            pad = (0, PADDED_HEAD - d)
            scale = kwargs.get("scale")
            out = _SDPA(
                F.pad(q, pad),
                F.pad(k, pad),
                F.pad(v, pad),
                attn_mask=kwargs.get("attn_mask"),
                is_causal=bool(kwargs.get("is_causal", False)),
                scale=d**-0.5 if scale is None else scale,
            )
            return out[..., :d]
        return func(*args, **kwargs)


def _enter_padded_heads(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: at CPU inference, run the attention forward under :class:`_PadHeads`."""
    mode = None
    w = next(module.parameters(), None)
    x = args[0] if args else None
    if (
        w is not None
        and isinstance(x, torch.Tensor)
        and x.dim() == 3  # (B, N, D) tokens
        and x.shape[1] >= MIN_PADDED_TOKENS  # shorter sequences: not even the mode's cost
        and not module.training
        and w.device.type == "cpu"
        and fast_paths_allowed(w)
        and not torch.compiler.is_compiling()
    ):
        mode = _PadHeads()
        mode.__enter__()
    module.__dict__["_padded_heads_mode"] = mode


def _exit_padded_heads(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (also called when the forward raises): leave the mode the pre-hook entered."""
    mode = module.__dict__.pop("_padded_heads_mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)


def pad_attention_heads(attn: nn.Module) -> None:
    """Make ``attn`` (a timm ``Attention``, whose fused path calls
    ``F.scaled_dot_product_attention``) run its attention on heads zero-padded to 16 dims at CPU
    inference where that is faster (2-11 dims per head, >= 100 tokens; see the module
    docstring). Installs a forward pre-hook and an always-called forward hook, once; the
    parameters, state dict, MACs as counted (:func:`module_dispatch` turns it off) and, up to
    float rounding, the outputs are unchanged. Training, gradients, autocast and CUDA take the
    plain path."""
    if attn.__dict__.get("_pads_heads"):
        return
    attn.register_forward_pre_hook(_enter_padded_heads)
    attn.register_forward_hook(_exit_padded_heads, always_call=True)
    attn.__dict__["_pads_heads"] = True
