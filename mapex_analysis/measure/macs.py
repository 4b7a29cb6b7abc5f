"""MACs (multiply-accumulates) that count attention and mixture-of-experts layers honestly.

One multiply-add is one MAC; FLOPs are ``2 x MACs`` and appear only in display code. The
primary counter is fvcore's :class:`~fvcore.nn.FlopCountAnalysis` (which, despite its name,
counts one fused multiply-add as one "flop", i.e. MACs), extended with per-op handles for the
ops our models trace to that fvcore does not know:

* ``aten::scaled_dot_product_attention``: fvcore drops it, so a timm ViT-B/16 at 224 px reads
  16.867 G instead of 17.583 G MACs. The handle counts ``Q K^T`` and ``A V``:
  ``B*H*N*M*d_k + B*H*N*M*d_v`` for ``q (B, H, N, d_k)``, ``k (B, H_kv, M, d_k)``,
  ``v (B, H_kv, M, d_v)`` (grouped-query attention broadcasts key/value heads to the ``H``
  query heads; a causal mask is counted as full attention, like torch's counter does).
* ``aten::baddbmm``: the batched matmul part, ``B*N*K*M``.
* ``aten::matmul``, ``aten::mm``, ``aten::mv``, ``aten::dot``: ``prod(output shape) * K`` with
  ``K`` the contracted dimension, which also covers 1-D operands and broadcast batch dimensions
  (fvcore's own matmul handle fails on a vector operand and ignores a broadcast first operand).
* ``aten::outer``: an outer product is a matmul with ``K = 1``: ``M*N`` MACs (torchgeo
  Panopticon's channel sin-cos embedding). ``FlopCounterMode`` never sees it (torch decomposes
  ``outer`` into a broadcast ``mul`` before dispatch), so the cross-check differs by exactly
  these MACs (144 on ``panopticon_test`` fed 3 optical channels, batch 2).

Every other op fvcore has no handle for (elementwise ``add``/``mul``/``gelu``, ``softmax``,
``max``/``topk``, ``argsort``, ``index_select``/``index_add`` of the MoE dispatch...) is **not
counted and is listed** in :attr:`MacsReport.unsupported` with its number of calls, never
dropped silently.
Normalisation layers use fvcore's estimate (5 operations per element with an affine transform,
4 without; eval-mode batch norm 2 or 1).

Mixture-of-experts layers are counted at their **active** cost: MAPEX dispatches sparsely (each
expert runs on the tokens routed to it via ``index_select``/``index_add``), and the trace records
the routed token counts as tensor shapes, so every expert linear is counted for the tokens it
actually processed. A "compute all experts, then mask" implementation would be counted at E times
the cost, which is what it costs.

The second counter, :class:`torch.utils.flop_counter.FlopCounterMode`, runs the model eagerly on
the same inputs and counts FLOPs (``2 x MACs``). On CPU, torch dispatches SDPA to
``aten._scaled_dot_product_flash_attention_for_cpu``, which it has no formula for; we map it (and
the norm ops, with fvcore's convention) through ``custom_mapping`` so that both counters count the
same things, and :attr:`MacsReport.cross_check` reports the two totals and their relative
difference. The two differ by design in one respect: the trace keeps only ops the returned
outputs depend on, while ``FlopCounterMode`` counts every op that executes. MAPEX's routing
statistics (a ``bincount``) and its load-balance loss (elementwise, about ``E * T`` multiply-adds
per MoE layer) are not part of ``forward``'s output and use no matmul, so neither counter counts
them and the two agree exactly on MAPEX; the CROMA adapter's unused per-sensor GAP heads, in
contrast, show up in the cross-check (4.9 % on ``croma_test``). So :attr:`MacsReport.total` is
the cost of computing the outputs, and a large ``rel_diff`` (logged as a warning above
:data:`CROSS_CHECK_TOLERANCE`) flags work the model executes and throws away. An expert that no
token was routed to is listed in :attr:`MacsReport.uncalled`.

Per-modality breakdown: for a modality-dict input, :func:`count_macs` with
``per_modality=True`` counts the model fed **each modality alone** (all other modalities
absent). Because attention is quadratic in the number of tokens, these do not sum to the joint
count; they are the cost of serving a task that has only that modality.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from mapex_analysis.modalities import (
    BandError,
    ModalityError,
    UnitError,
    check_inputs,
    unit_checks,
)
from mapex_analysis.models.moe import module_dispatch

__all__ = [
    "CROSS_CHECK_TOLERANCE",
    "FVCORE_EXTRA_HANDLES",
    "MacsError",
    "MacsReport",
    "count_macs",
    "sdpa_macs",
]

logger = logging.getLogger(__name__)

Inputs = Tensor | Mapping[str, Tensor] | Sequence[Tensor]

#: Relative difference between the two counters above which :func:`count_macs` logs a warning.
CROSS_CHECK_TOLERANCE = 0.005


class MacsError(RuntimeError):
    """A model that cannot be traced for counting, or inputs that cannot be fed to it."""


def sdpa_macs(
    query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]
) -> int:
    """MACs of scaled dot-product attention: the ``Q K^T`` and ``A V`` matmuls.

    Args:
        query_shape: ``(..., H, N, d_k)``; leading dimensions are batch dimensions.
        key_shape: ``(..., H_kv, M, d_k)``; ``H_kv`` must divide ``H`` (grouped-query
            attention broadcasts key/value heads).
        value_shape: ``(..., H_kv, M, d_v)``.

    Returns:
        ``prod(q.shape[:-2]) * N * M * (d_k + d_v)``. Softmax and scaling are not MACs.

    Raises:
        MacsError: if the shapes are inconsistent.
    """
    q, k, v = tuple(query_shape), tuple(key_shape), tuple(value_shape)
    if len(q) < 2 or len(k) != len(q) or len(v) != len(q):
        raise MacsError(f"attention shapes of different ranks: q={q}, k={k}, v={v}")
    n, d_k = q[-2], q[-1]
    m, d_k2 = k[-2], k[-1]
    m2, d_v = v[-2], v[-1]
    if d_k != d_k2 or m != m2:
        raise MacsError(f"attention shapes do not match: q={q}, k={k}, v={v}")
    if len(q) >= 3 and (k[-3] != v[-3] or q[-3] % k[-3] != 0):
        raise MacsError(f"query heads {q[-3]} are not a multiple of key/value heads {k[-3]}")
    batch = math.prod(q[:-2])
    return int(batch * n * m * (d_k + d_v))


def _jit_shape(value: Any) -> list[int] | None:
    return value.type().sizes() if value.isCompleteTensor() else None


def _sdpa_jit(inputs: list[Any], outputs: list[Any]) -> int:
    shapes = [_jit_shape(v) for v in inputs[:3]]
    if any(s is None for s in shapes):
        raise MacsError("scaled_dot_product_attention input shapes are unknown in the trace")
    q, k, v = shapes
    assert q is not None and k is not None and v is not None
    return sdpa_macs(q, k, v)


def _contracted_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``matmul``/``mm``/``mv``/``dot``: every output element is a length-``K`` dot product."""
    a, out = _jit_shape(inputs[0]), _jit_shape(outputs[0])
    if a is None or out is None or not a:
        raise MacsError("matmul operand or output shapes are unknown in the trace")
    return int(math.prod(out) * a[-1])


def _outer_jit(inputs: list[Any], outputs: list[Any]) -> int:
    out = _jit_shape(outputs[0])
    if out is None:
        raise MacsError("outer product output shape is unknown in the trace")
    return int(math.prod(out))


def _baddbmm_jit(inputs: list[Any], outputs: list[Any]) -> int:
    a, b = _jit_shape(inputs[1]), _jit_shape(inputs[2])
    if a is None or b is None:
        raise MacsError("baddbmm input shapes are unknown in the trace")
    batch, n, k = a
    return int(batch * n * k * b[-1])


#: fvcore handles added to its defaults (op name -> handle returning MACs).
FVCORE_EXTRA_HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::scaled_dot_product_attention": _sdpa_jit,
    "aten::baddbmm": _baddbmm_jit,
    "aten::matmul": _contracted_jit,
    "aten::mm": _contracted_jit,
    "aten::mv": _contracted_jit,
    "aten::dot": _contracted_jit,
    "aten::outer": _outer_jit,
}


# FlopCounterMode formulas (FLOPs = 2 x MACs). Tensor arguments arrive as shapes.
def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * sdpa_macs(query, key, value)


def _mv_flops(matrix: Any, vector: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * math.prod(matrix)


def _dot_flops(a: Any, b: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * math.prod(a)


def _layer_norm_flops(x: Any, normalized_shape: Any, weight: Any, *args: Any, **kwargs: Any):
    # fvcore's convention: 5 operations per element with an affine transform, 4 without.
    return 2 * math.prod(x) * (5 if weight is not None else 4)


def _group_norm_flops(x: Any, weight: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * math.prod(x) * (5 if weight is not None else 4)


def _batch_norm_eval_flops(x: Any, weight: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * math.prod(x) * (2 if weight is not None else 1)


def _flop_counter_mapping() -> dict[Any, Callable[..., int]]:
    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten.mv: _mv_flops,
        aten.dot: _dot_flops,
        aten.native_layer_norm: _layer_norm_flops,
        aten.native_group_norm: _group_norm_flops,
        aten._native_batch_norm_legit_no_training: _batch_norm_eval_flops,
    }


@dataclass(frozen=True)
class MacsReport:
    """What a model costs on one input, in MACs (one multiply-add = 1).

    Attributes:
        total: Total MACs of one forward pass on the given inputs (the whole batch).
        unit: Always ``"MACs"``; FLOPs are ``2 * total`` (see :attr:`flops`).
        by_module: MACs per module (qualified name as in ``named_modules``; ``""`` is the
            whole model), for modules with a non-zero count.
        by_op: MACs per op kind (``linear``, ``conv``, ``scaled_dot_product_attention``,
            ``matmul``, ``layer_norm``...).
        unsupported: Ops that ran but were **not counted**, with their number of calls.
        uncalled: Modules that exist but did not run on these inputs (e.g. the patch
            embedding of an absent modality).
        cross_check: ``{"fvcore_macs", "flopcounter_macs", "rel_diff"}``: the fvcore-based
            total, torch ``FlopCounterMode`` FLOPs / 2, and ``|a - b| / a``. Empty when the
            cross-check was not run.
        by_modality: For modality-dict inputs counted with ``per_modality=True``, the total
            MACs of the model fed each modality alone.
        model: Class name of the counted model.
        input_shapes: Shape of every input tensor (``"x"`` for a single tensor).
    """

    total: int
    unit: str = "MACs"
    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)
    unsupported: dict[str, int] = field(default_factory=dict)
    uncalled: list[str] = field(default_factory=list)
    cross_check: dict[str, float] = field(default_factory=dict)
    by_modality: dict[str, int] = field(default_factory=dict)
    model: str = ""
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        """Total in G MACs (10^9 MACs)."""
        return self.total / 1e9

    @property
    def flops(self) -> int:
        """Total in FLOPs, counting a multiply-add as two operations."""
        return 2 * self.total

    def op_rows(self) -> list[dict[str, Any]]:
        """One row per op (counted ones first, then uncounted), for tables.

        Returns:
            Dicts with ``op``, ``MACs``, ``share`` (fraction of the total, ``"-"`` for
            uncounted ops) and ``calls not counted``.
        """
        rows: list[dict[str, Any]] = [
            {
                "op": op,
                "MACs": macs,
                "share": f"{macs / self.total:.2%}" if self.total else "-",
                "calls not counted": 0,
            }
            for op, macs in sorted(self.by_op.items(), key=lambda kv: -kv[1])
        ]
        rows += [
            {"op": op, "MACs": 0, "share": "-", "calls not counted": calls}
            for op, calls in sorted(self.unsupported.items())
        ]
        return rows


class _DictInputs(nn.Module):
    """Feeds positional tensors to a model that takes a modality dict (tracing needs tensors)."""

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = tuple(keys)

    def forward(self, *tensors: Tensor) -> Any:
        return self.model(dict(zip(self.keys, tensors, strict=True)))


def _prepare(model: nn.Module, inputs: Inputs) -> tuple[nn.Module, tuple[Tensor, ...], str]:
    """The module to trace, its positional inputs, and the module-name prefix to strip."""
    if isinstance(inputs, Tensor):
        return model, (inputs,), ""
    if isinstance(inputs, Mapping):
        if not inputs:
            raise MacsError("empty input dict; pass at least one modality")
        bad = {k: type(v).__name__ for k, v in inputs.items() if not isinstance(v, Tensor)}
        if bad:
            raise MacsError(f"inputs must be tensors; got {bad}")
        return _DictInputs(model, list(inputs)), tuple(inputs.values()), "model"
    if isinstance(inputs, Sequence) and all(isinstance(t, Tensor) for t in inputs):
        return model, tuple(inputs), ""
    raise MacsError(
        "inputs must be a Tensor, a modality dict {name: Tensor} or a sequence of Tensors; "
        f"got {type(inputs).__name__}"
    )


def _strip(name: str, prefix: str) -> str | None:
    """Module name relative to the counted model; ``None`` for the wrapper itself."""
    if not prefix:
        return name
    if name == prefix:
        return ""
    if name.startswith(prefix + "."):
        return name[len(prefix) + 1 :]
    return None


_NO_FORWARD = (nn.Module, nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.Identity)


def _has_forward(module: nn.Module | None) -> bool:
    """Whether a module computes something of its own (containers and Identity do not)."""
    if module is None:
        return False
    forward = type(module).forward
    return not any(forward is base.forward for base in _NO_FORWARD)


def _input_shapes(inputs: Inputs) -> dict[str, tuple[int, ...]]:
    if isinstance(inputs, Tensor):
        return {"x": tuple(inputs.shape)}
    if isinstance(inputs, Mapping):
        return {k: tuple(v.shape) for k, v in inputs.items()}
    return {f"x{i}": tuple(t.shape) for i, t in enumerate(inputs)}


def _eval_mode(model: nn.Module) -> dict[nn.Module, bool]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    return modes


def _restore_mode(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def _fvcore_count(
    model: nn.Module, inputs: Inputs
) -> tuple[int, dict[str, int], dict[str, int], dict[str, int], list[str]]:
    traced, args, prefix = _prepare(model, inputs)
    analysis = FlopCountAnalysis(traced, args)
    analysis.set_op_handle(**FVCORE_EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    try:
        total = int(analysis.total())
    except (MacsError, ModalityError, BandError, UnitError):
        raise  # errors in the inputs, not in tracing: their messages say what to fix
    except Exception as err:  # tracing errors come as RuntimeError, TypeError, ValueError...
        raise MacsError(
            f"cannot trace {type(model).__name__} for MAC counting with torch.jit.trace: "
            f"{type(err).__name__}: {err}. The model's forward must take tensors (or a "
            "modality dict of tensors) and return tensors, tuples or dicts of tensors."
        ) from err
    by_module: dict[str, int] = {}
    for name, count in analysis.by_module().items():
        rel = _strip(name, prefix)
        if rel is not None and count:
            by_module[rel] = int(count)
    by_op = {op: int(n) for op, n in analysis.by_operator().items() if n}
    unsupported = {op: int(n) for op, n in analysis.unsupported_ops().items()}
    modules = dict(traced.named_modules())
    uncalled = sorted(
        rel
        for name in analysis.uncalled_modules()
        if _has_forward(modules.get(name)) and (rel := _strip(name, prefix)) is not None
    )
    return total, by_module, by_op, unsupported, uncalled


def _flopcounter_macs(model: nn.Module, inputs: Inputs) -> int:
    """FLOPs / 2 of one eager forward pass under torch's ``FlopCounterMode``.

    ``FlopCounterMode``'s module tracker registers an autograd hook on every module input that
    requires grad. Under ``no_grad`` a *view* of a tensor that requires grad still requires grad
    but has no ``grad_fn`` (torchgeo Panopticon expands its channel-attention query parameter
    and feeds it to a submodule), and the hook fails with "Expected gradient function to be
    set" (``inference_mode`` fails the same way). So the count runs with every parameter frozen
    and the inputs detached, which leaves no tensor requiring grad; the parameters' flags are
    restored afterwards, also on error.
    """
    if isinstance(inputs, Tensor):
        inputs = inputs.detach()
    elif isinstance(inputs, Mapping):
        inputs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in inputs.items()}
    elif isinstance(inputs, Sequence):
        inputs = [t.detach() if isinstance(t, Tensor) else t for t in inputs]
    module, args, _ = _prepare(model, inputs)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=_flop_counter_mapping()) as counter:
            module(*args)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return int(counter.get_total_flops()) // 2


def count_macs(
    model: nn.Module,
    inputs: Inputs,
    *,
    cross_check: bool = True,
    per_modality: bool = False,
) -> MacsReport:
    """Count the MACs of one forward pass of ``model`` on ``inputs``.

    The model runs in eval mode under ``torch.no_grad`` (its train/eval flags are restored
    afterwards). See the module docstring for what is counted and how.

    Args:
        model: Any ``nn.Module`` whose forward can be traced with ``torch.jit.trace``.
        inputs: A tensor (``model(x)``), a modality dict ``{name: (B, C, H, W)}``
            (``model(dict)``, as MAPEX takes it) or a sequence of tensors (``model(*xs)``).
            The count is for the whole batch.
        cross_check: Also count with torch's ``FlopCounterMode`` (one more forward pass)
            and fill :attr:`MacsReport.cross_check`.
        per_modality: For a modality dict, also count the model fed each modality alone
            (:attr:`MacsReport.by_modality`).

    Returns:
        The :class:`MacsReport`.

    Raises:
        MacsError: if the model cannot be traced (the message names the model class) or the
            inputs have an unsupported type.
    """
    if isinstance(inputs, Mapping):
        # units are checked once here; the traced and counted passes run without the check, so
        # its reductions are neither traced nor counted as (uncounted) model work
        check_inputs(inputs, where=type(model).__name__)
    modes = _eval_mode(model)
    try:
        with torch.no_grad(), unit_checks(False), module_dispatch():
            total, by_module, by_op, unsupported, uncalled = _fvcore_count(model, inputs)
            check: dict[str, float] = {}
            if cross_check:
                other = _flopcounter_macs(model, inputs)
                check = {
                    "fvcore_macs": total,
                    "flopcounter_macs": other,
                    "rel_diff": abs(total - other) / total if total else float(other != 0),
                }
            by_modality: dict[str, int] = {}
            if per_modality:
                if not isinstance(inputs, Mapping):
                    raise MacsError("per_modality=True needs a modality dict as inputs")
                for name, tensor in inputs.items():
                    by_modality[name] = _fvcore_count(model, {name: tensor})[0]
    finally:
        _restore_mode(modes)
    if check and check["rel_diff"] > CROSS_CHECK_TOLERANCE:
        logger.warning(
            "%s: fvcore counts %d MACs, FlopCounterMode %d (%.2f%% apart); the model executes "
            "work its outputs do not depend on, or runs an op only one counter knows",
            type(model).__name__,
            total,
            int(check["flopcounter_macs"]),
            100 * check["rel_diff"],
        )
    if unsupported:
        logger.info(
            "%s: ops not counted (calls): %s",
            type(model).__name__,
            dict(Counter(unsupported).most_common()),
        )
    return MacsReport(
        total=total,
        by_module=by_module,
        by_op=by_op,
        unsupported=unsupported,
        uncalled=uncalled,
        cross_check=check,
        by_modality=by_modality,
        model=type(model).__name__,
        input_shapes=_input_shapes(inputs),
    )
