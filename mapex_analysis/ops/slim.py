"""Post-hoc uniform width slimming of pretrained ViT encoders.

Implements the operator of Hackel, Burgert and Demir, "How Much of a Model Do We Need?
Redundancy and Slimmability in Remote Sensing Foundation Models" (arXiv 2601.22841): one
factor ``s`` for every block, no retraining. The embedding width ``d``, the number of heads,
the depth, the block and final norms over ``d`` and the patch embedding stay (norms inside a
sliced layer, e.g. QK norms, are sliced with it); in every timm
:class:`~timm.layers.Attention` each head keeps ``max(1, floor(s * d_k))`` of its Q, K and V
dims (the output projection keeps the matching columns) and the attention scale becomes
``d_k' ** -0.5``; every timm :class:`~timm.layers.Mlp` keeps ``max(1, floor(s * d_h))`` hidden
units. The result is physically smaller: the sliced ``nn.Linear`` layers are rebuilt, so the
saving is real compute, not masks.

The operator is generic over every timm ``Attention`` and ``Mlp`` module of a model, which covers
timm ViTs, the torchgeo ViTs built on timm ``Block`` (ScaleMAE, DOFA, CopernicusFM, SSL4EO) and
MAPEX (shared attention and every routed and shared expert ``Mlp``).

Planning is data (:class:`SlimPlan`, JSON-able through :meth:`SlimPlan.to_dict`); applying it
is :func:`slim_width`. Which dims were kept, per layer, is returned as data in
``model.op_report`` for reports.
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
import torch
from timm.layers import Attention, Mlp
from torch import Tensor, nn

from mapex_analysis.models.contract import num_params
from mapex_analysis.models.fastpath import (
    MAX_PADDED_HEAD,
    AlignedLinear,
    needs_alignment,
    pad_attention_heads,
)
from mapex_analysis.ops.record import record_op
from mapex_analysis.options import SLIM_MODES, SLIM_ORDERS, SLIM_WIDTHS, SlimMode, SlimOrder

__all__ = [
    "SLIM_MODES",
    "SLIM_ORDERS",
    "SLIM_WIDTHS",
    "SlimMode",
    "SlimOrder",
    "SlimPlan",
    "kept_width",
    "slim_signature",
    "slim_width",
    "slimmable_modules",
]

logger = logging.getLogger(__name__)


# floor(s * d) must not lose a unit to binary rounding (0.29 * 100 == 28.999999999999996).
_FLOOR_EPS = 1e-9


def kept_width(d: int, s: float) -> int:
    """Number of dims a layer of width ``d`` keeps at factor ``s``: ``max(1, floor(s * d))``.

    Args:
        d: Full width (head dim ``d_k`` or MLP hidden width ``d_h``).
        s: Width factor in (0, 1].

    Returns:
        The kept width, at least 1 and at most ``d``.
    """
    return min(d, max(1, math.floor(s * d + _FLOOR_EPS)))


def _check_s(s: Any) -> float:
    if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
        raise ValueError(f"width factor s must be a number in (0, 1], got {s!r}")
    if not 0.0 < s <= 1.0:
        raise ValueError(
            f"width factor s={s!r} is outside (0, 1]; the paper's grid SLIM_WIDTHS runs from "
            f"{SLIM_WIDTHS[0]} to {SLIM_WIDTHS[-1]}"
        )
    return float(s)


@dataclass(frozen=True)
class SlimPlan:
    """A width-slimming plan: what :func:`slim_width` does, as data.

    Attributes:
        s: Width factor in (0, 1].
        mode: One of :data:`SLIM_MODES`.
        order: One of :data:`SLIM_ORDERS`.
        seed: Seed of the ``random`` order (ignored by the others).
    """

    s: float
    mode: str = "attn+mlp"
    order: str = "first"
    seed: int = 0

    op: ClassVar[str] = "slim_width"

    def __post_init__(self) -> None:
        object.__setattr__(self, "s", _check_s(self.s))
        if self.mode not in SLIM_MODES:
            raise ValueError(f"unknown slim mode {self.mode!r}; valid modes: {list(SLIM_MODES)}")
        if self.order not in SLIM_ORDERS:
            raise ValueError(
                f"unknown slim order {self.order!r}; valid orders: {list(SLIM_ORDERS)}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able plan recorded in ``model.applied_ops`` and checkpoint specs."""
        return {
            "op": self.op,
            "s": self.s,
            "mode": self.mode,
            "order": self.order,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, plan: Mapping[str, Any]) -> SlimPlan:
        """Rebuild a plan written by :meth:`to_dict`.

        Args:
            plan: ``{"op": "slim_width", "s": ..., "mode": ..., "order": ..., "seed": ...}``.

        Returns:
            The validated plan.

        Raises:
            ValueError: for another operator, a missing ``s``, unknown keys or invalid values.
        """
        if plan.get("op") != cls.op:
            raise ValueError(f"not a {cls.op} plan: op={plan.get('op')!r}")
        valid = {"op", "s", "mode", "order", "seed"}
        unknown = sorted(set(plan) - valid)
        if unknown:
            raise ValueError(
                f"unknown keys {unknown} in {cls.op} plan; valid keys: {sorted(valid)}"
            )
        if "s" not in plan:
            raise ValueError(f"{cls.op} plan lacks the width factor 's': {dict(plan)}")
        return cls(
            s=plan["s"],
            mode=plan.get("mode", "attn+mlp"),
            order=plan.get("order", "first"),
            seed=plan.get("seed", 0),
        )


# --------------------------------------------------------------------------------------------
# which dims to keep


def _rng(seed: int, name: str) -> np.random.Generator:
    # Seeded per module name, so the choice does not depend on traversal order.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _top(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores (ties: lower index first), ascending."""
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return sorted(int(i) for i in order)


def _is_croma(module: nn.Module, *names: str) -> bool:
    """Whether ``module`` is one of torchgeo CROMA's own layer classes (no torchgeo import)."""
    cls = type(module)
    return cls.__module__ == "torchgeo.models.croma" and cls.__name__ in names


def _head_dim(attn: Any) -> int:
    if isinstance(attn, Attention):
        return int(attn.head_dim)
    return int(attn.to_out.in_features) // int(attn.num_heads)  # CROMA (Cross)Attention


def _qkv_weights(attn: Any) -> Tensor:
    """``(3, D_attn, D_in)``: the q, k and v projection weights of any supported attention."""
    if isinstance(attn, Attention):
        return attn.qkv.weight.detach().reshape(3, -1, attn.qkv.weight.shape[1])
    if _is_croma(attn, "Attention"):
        return attn.to_qkv.weight.detach().reshape(3, -1, attn.to_qkv.weight.shape[1])
    return torch.stack([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach()


def _attn_scores(attn: Any) -> Tensor:
    """Per-(head, dim) weight norm: the q, k, v rows of that head dim and the proj column.

    Returns:
        ``(H, d_k)`` L2 norms.
    """
    h, d = attn.num_heads, _head_dim(attn)
    w_qkv = _qkv_weights(attn).double().reshape(3, h, d, -1)  # (3, H, d_k, D)
    proj = attn.proj if isinstance(attn, Attention) else attn.to_out
    w_proj = proj.weight.detach().double().reshape(-1, h, d)  # (D_out, H, d_k)
    return (w_qkv.square().sum(dim=(0, 3)) + w_proj.square().sum(dim=0)).sqrt()


def _mlp_layers(mlp: Any) -> tuple[nn.Linear, nn.Linear]:
    """``(fc1, fc2)`` of a timm Mlp or a CROMA FFN (``net = [Linear, GELU, Dropout, Linear]``)."""
    if isinstance(mlp, Mlp):
        return cast(nn.Linear, mlp.fc1), cast(nn.Linear, mlp.fc2)
    return mlp.net[0], mlp.net[-1]


def _mlp_scores(mlp: Any) -> Tensor:
    """Per hidden unit: ``||fc1 row|| * ||fc2 column||``, shape ``(d_h,)``."""
    fc1, fc2 = _mlp_layers(mlp)
    w1 = fc1.weight.detach().double()  # (d_h, D)
    w2 = fc2.weight.detach().double()  # (D_out, d_h)
    return w1.norm(dim=1) * w2.norm(dim=0)


def _choose(d: int, k: int, order: str, seed: int, name: str, scores: Tensor | None) -> list[int]:
    if order == "first":
        return list(range(k))
    if order == "last":
        return list(range(d - k, d))
    if order == "random":
        return sorted(int(i) for i in _rng(seed, name).permutation(d)[:k])
    assert scores is not None  # magnitude
    return _top(scores, k)


def _has_qk_norm(attn: Any) -> bool:
    if not isinstance(attn, Attention):
        return False
    return not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity))


def _attn_kept(attn: Any, k: int, order: str, seed: int, name: str) -> list[list[int]]:
    """Kept dims of every head. With QK norms (one weight shared by all heads) the heads share
    one dim set so the norms can be sliced; otherwise each head chooses its own."""
    h, d = attn.num_heads, _head_dim(attn)
    scores = _attn_scores(attn) if order == "magnitude" else None
    if _has_qk_norm(attn):
        shared = scores.square().sum(dim=0).sqrt() if scores is not None else None
        one = _choose(d, k, order, seed, name, shared)
        return [list(one) for _ in range(h)]
    return [
        _choose(d, k, order, seed, f"{name}#head{i}", None if scores is None else scores[i])
        for i in range(h)
    ]


# --------------------------------------------------------------------------------------------
# surgery


def _slice_linear(
    layer: nn.Module, name: str, *, out_idx: Tensor | None = None, in_idx: Tensor | None = None
) -> nn.Linear:
    """A new, smaller ``nn.Linear`` holding the selected rows (outputs) and columns (inputs);
    an :class:`~mapex_analysis.models.fastpath.AlignedLinear` (same parameters and outputs, a
    faster CPU inference GEMM) when its output width is not a multiple of 8."""
    if not isinstance(layer, nn.Linear):
        raise TypeError(
            f"{name} is a {type(layer).__name__}; width slimming rebuilds nn.Linear layers only"
        )
    weight, bias = layer.weight.detach(), layer.bias
    if out_idx is not None:
        weight = weight.index_select(0, out_idx.to(weight.device))
    if in_idx is not None:
        weight = weight.index_select(1, in_idx.to(weight.device))
    # Built on the meta device: no wasted random init, then the sliced tensors are assigned.
    cls = AlignedLinear if needs_alignment(int(weight.shape[0])) else nn.Linear
    new = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        b = bias.detach()
        if out_idx is not None:
            b = b.index_select(0, out_idx.to(b.device))
        new.bias = nn.Parameter(b.clone(), requires_grad=bias.requires_grad)
    new.train(layer.training)
    return new


def _slice_norm(norm: nn.Module, name: str, idx: Tensor) -> nn.Module:
    """Slice a norm over the sliced dim (LayerNorm / RMSNorm style, or Identity)."""
    if isinstance(norm, nn.Identity):
        return norm
    shape = getattr(norm, "normalized_shape", None)
    if shape is None or len(tuple(shape)) != 1:
        raise TypeError(
            f"{name} is a {type(norm).__name__}; only Identity and norms over the last dim "
            "(LayerNorm, RMSNorm) can be sliced"
        )
    new = copy.deepcopy(norm)
    for pname in ("weight", "bias"):
        p = getattr(norm, pname, None)
        if isinstance(p, nn.Parameter):
            sliced = p.detach().index_select(0, idx.to(p.device)).clone()
            setattr(new, pname, nn.Parameter(sliced, requires_grad=p.requires_grad))
    setattr(new, "normalized_shape", (int(idx.numel()),))  # noqa: B010
    return new


def _slim_croma_attention(attn: Any, name: str, kept: list[list[int]]) -> None:
    """Slice a CROMA (Cross)Attention in place: its forward splits ``h`` heads from whatever
    width the projections have, so only the layers and ``scale`` change."""
    h, d = attn.num_heads, _head_dim(attn)
    k = len(kept[0])
    dev = attn.to_out.weight.device
    flat = torch.arange(h, device=dev).unsqueeze(1) * d + torch.tensor(kept, device=dev)
    flat = flat.reshape(-1)
    full = h * d
    if _is_croma(attn, "Attention"):
        attn.to_qkv = _slice_linear(
            attn.to_qkv, f"{name}.to_qkv", out_idx=torch.cat([flat, flat + full, flat + 2 * full])
        )
    else:
        for part in ("to_q", "to_k", "to_v"):
            setattr(attn, part, _slice_linear(getattr(attn, part), f"{name}.{part}", out_idx=flat))
    attn.to_out = _slice_linear(attn.to_out, f"{name}.to_out", in_idx=flat)
    attn.scale = k**-0.5


def _slim_attention(attn: Any, name: str, kept: list[list[int]]) -> None:
    """Slice one timm Attention in place to the kept dims of every head; keep every derived
    attribute (``head_dim``, ``attn_dim``, ``scale``) consistent for the fused and manual paths.
    """
    if not isinstance(attn, Attention):
        _slim_croma_attention(attn, name, kept)
        return
    h, d = attn.num_heads, attn.head_dim
    k = len(kept[0])
    dev = attn.qkv.weight.device
    heads = torch.arange(h, device=dev).unsqueeze(1)  # (H, 1)
    flat = (heads * d + torch.tensor(kept, device=dev)).reshape(-1)  # (H*k,) into attn_dim
    full = h * d
    # qkv rows are laid out [q heads | k heads | v heads], each head d_k contiguous dims.
    attn.qkv = _slice_linear(
        attn.qkv, f"{name}.qkv", out_idx=torch.cat([flat, flat + full, flat + 2 * full])
    )
    attn.proj = _slice_linear(attn.proj, f"{name}.proj", in_idx=flat)
    head_idx = torch.tensor(kept[0], device=dev)
    attn.q_norm = _slice_norm(attn.q_norm, f"{name}.q_norm", head_idx)
    attn.k_norm = _slice_norm(attn.k_norm, f"{name}.k_norm", head_idx)
    attn.norm = _slice_norm(attn.norm, f"{name}.norm", flat)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        attn.gate = _slice_linear(gate, f"{name}.gate", out_idx=flat)
    attn.head_dim = k
    attn.attn_dim = h * k
    # The paper's rescaling; SDPA (fused path) derives the same 1/sqrt(q.shape[-1]) itself.
    attn.scale = k**-0.5
    if 2 <= k <= MAX_PADDED_HEAD:
        pad_attention_heads(attn)  # faster CPU attention at a few dims per head, same outputs


def _slim_mlp(mlp: Any, name: str, kept: list[int]) -> None:
    """Slice one timm Mlp (or CROMA FFN) in place to the kept hidden units."""
    if not isinstance(mlp, Mlp):
        idx = torch.tensor(kept, device=mlp.net[0].weight.device)
        mlp.net[0] = _slice_linear(mlp.net[0], f"{name}.net.0", out_idx=idx)
        last = len(mlp.net) - 1
        mlp.net[last] = _slice_linear(mlp.net[last], f"{name}.net.{last}", in_idx=idx)
        return
    idx = torch.tensor(kept, device=mlp.fc1.weight.device)
    mlp.fc1 = _slice_linear(mlp.fc1, f"{name}.fc1", out_idx=idx)
    mlp.norm = _slice_norm(mlp.norm, f"{name}.norm", idx)
    mlp.fc2 = _slice_linear(mlp.fc2, f"{name}.fc2", in_idx=idx)


def slimmable_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """Qualified names of the attention and MLP modules :func:`slim_width` narrows (timm
    ``Attention`` / ``Mlp``, CROMA's attention and FFN, every MAPEX expert), outermost only.
    Everything else (patch embeddings, norms, spectral weight generators) keeps its width,
    which is why each model's relative compute has a floor.

    Returns:
        ``(attention names, MLP names)``.
    """

    def outermost(names: list[str]) -> list[str]:
        return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]

    attns = [n for n, m in model.named_modules()
             if isinstance(m, Attention) or _is_croma(m, "Attention", "CrossAttention")]  # fmt: skip
    mlps = [n for n, m in model.named_modules() if isinstance(m, Mlp) or _is_croma(m, "FFN")]
    return outermost(attns), outermost(mlps)


def slim_signature(model: nn.Module, s: float, mode: str = "attn+mlp") -> tuple[int, ...]:
    """The kept width of every module :func:`slim_width` narrows at ``s`` (dims per head of
    each attention, hidden units of each MLP, in module order). Two widths with the same
    signature give the same model under a deterministic order (``first``, ``last``,
    ``magnitude``): on a model with head dim 32, every ``s`` below 1/16 keeps 1 dim per head.

    Args:
        model: A model :func:`slim_width` accepts.
        s: Width factor in (0, 1].
        mode: ``attn+mlp``, ``attn`` or ``mlp`` (what is narrowed).

    Returns:
        The kept widths.
    """
    attns, mlps = _targets(model, mode)
    return tuple(kept_width(_head_dim(a), s) for _, a in attns) + tuple(
        kept_width(_mlp_layers(m)[0].weight.shape[0], s) for _, m in mlps
    )


def _targets(
    model: nn.Module, mode: str
) -> tuple[list[tuple[str, Attention]], list[tuple[str, Mlp]]]:
    attns = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, Attention) or _is_croma(m, "Attention", "CrossAttention")
    ]
    mlps = [(n, m) for n, m in model.named_modules() if isinstance(m, Mlp) or _is_croma(m, "FFN")]
    cls = type(model).__name__
    if "attn" in mode and not attns:
        raise TypeError(
            f"{cls} has no timm.layers.Attention module; slim_width(mode={mode!r}) works on "
            "models built from timm Blocks (timm/torchgeo ViTs), CROMA and MAPEX"
        )
    if "mlp" in mode and not mlps:
        raise TypeError(
            f"{cls} has no timm.layers.Mlp module; slim_width(mode={mode!r}) works on "
            "models built from timm Blocks (timm/torchgeo ViTs), CROMA and MAPEX"
        )
    return (attns if "attn" in mode else []), (mlps if "mlp" in mode else [])


def apply_slim_plan(
    model: nn.Module, plan: SlimPlan, *, structural_only: bool = False, inplace: bool = False
) -> nn.Module:
    """Apply a :class:`SlimPlan`; see :func:`slim_width`.

    Args:
        model: The model to slim.
        plan: The validated plan.
        structural_only: Only rebuild the shapes (keep the first dims whatever the order),
            for a checkpoint loader that overwrites every weight afterwards.
        inplace: Modify ``model`` itself instead of a deep copy.

    Returns:
        The slimmed model.

    Raises:
        TypeError: if the model has no timm Attention (modes with ``attn``) or no timm Mlp
            (modes with ``mlp``), or a sliced layer is not an ``nn.Linear``.
    """
    attns, mlps = _targets(model, plan.mode)
    out = model if inplace else copy.deepcopy(model)
    params_before = num_params(model)
    by_name = dict(out.named_modules())
    order = "first" if structural_only else plan.order
    layers: list[dict[str, Any]] = []
    for name, src_attn in attns:
        attn = by_name[name]
        head_dim = _head_dim(src_attn)
        k = kept_width(head_dim, plan.s)
        kept = _attn_kept(attn, k, order, plan.seed, name)
        layers.append(
            {
                "module": name,
                "kind": "attn",
                "num_heads": attn.num_heads,
                "head_dim": head_dim,
                "kept_head_dim": k,
                "kept": kept,
            }
        )
        _slim_attention(attn, name, kept)
    for name, src_mlp in mlps:
        mlp = by_name[name]
        d_h = _mlp_layers(src_mlp)[0].weight.shape[0]
        k = kept_width(d_h, plan.s)
        scores = _mlp_scores(mlp) if order == "magnitude" else None
        kept_h = _choose(d_h, k, order, plan.seed, name, scores)
        layers.append(
            {"module": name, "kind": "mlp", "hidden": d_h, "kept_hidden": k, "kept": kept_h}
        )
        _slim_mlp(mlp, name, kept_h)
    report = {
        **plan.to_dict(),
        "params_before": params_before,
        "params_after": num_params(out),
        "layers": layers,
    }
    record_op(model, out, plan.to_dict(), report)
    logger.info(
        "slim_width s=%s mode=%s order=%s: %d attention and %d MLP modules, params %d -> %d",
        plan.s,
        plan.mode,
        plan.order,
        len(attns),
        len(mlps),
        params_before,
        report["params_after"],
    )
    return out


def slim_width(
    model: nn.Module,
    s: float,
    *,
    mode: str = "attn+mlp",
    order: str = "first",
    seed: int = 0,
    inplace: bool = False,
) -> nn.Module:
    """Uniformly slim the width of every attention and MLP of a pretrained encoder.

    Every timm ``Attention`` keeps, per head, ``max(1, floor(s * d_k))`` Q/K/V dims (the
    output projection keeps the matching columns; ``scale = d_k' ** -0.5``; QK norms,
    the scale norm and the gate are sliced alike) and every timm ``Mlp`` keeps
    ``max(1, floor(s * d_h))`` hidden units. Embedding width, heads, depth, the block norms
    and the patch embedding are unchanged; ``s = 1.0`` returns bit-identical outputs.

    Args:
        model: A model containing timm ``Attention``/``Mlp`` modules.
        s: Width factor in (0, 1] (see :data:`SLIM_WIDTHS`).
        mode: ``"attn+mlp"`` (the paper), ``"attn"`` or ``"mlp"``.
        order: Which dims are kept: ``"first"`` (the paper), ``"last"``, ``"random"``
            (seeded by ``seed`` and the module name) or ``"magnitude"`` (largest weight norm:
            per head dim the norm of its q, k, v rows and proj column; per hidden unit
            ``||fc1 row|| * ||fc2 column||``). Attention with QK norms keeps one dim set for
            all heads, since the norm weight is shared by the heads.
        seed: Seed of the ``random`` order.
        inplace: Modify ``model`` instead of returning a slimmed deep copy.

    Returns:
        The slimmed model, carrying ``applied_ops`` (the source's plus this plan),
        ``model_spec`` (copied) and ``op_report`` (plan, ``params_before``,
        ``params_after`` and per layer the kept dims: ``layers[i]["kept"]``, a list of
        kept dims per head for attention, of kept hidden units for an MLP).

    Raises:
        ValueError: if ``s`` is outside (0, 1], or ``mode``/``order`` is unknown (the
            message lists the valid values).
        TypeError: if the model has no timm ``Attention`` (for modes with ``attn``) or no
            timm ``Mlp`` (for modes with ``mlp``); the message names the model class.
    """
    plan = SlimPlan(s=s, mode=mode, order=order, seed=seed)
    return apply_slim_plan(model, plan, inplace=inplace)
