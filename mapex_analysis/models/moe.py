"""Mixture of modality experts: grouped experts, three routers, sparse dispatch.

Our reading of MAPEX (Hanna, Scheibenreif, Borth; arXiv 2507.07527; the authors' code is not
public):

* The MLP of a transformer block is replaced by ``E = M * experts_per_modality`` routed experts
  (timm :class:`~timm.layers.Mlp`), grouped by modality (``expert_groups[e]`` names the
  modality owning expert ``e``), plus ``shared_experts`` that every token passes through.
* A router scores the routed experts per token (logits ``z``); each token keeps the ``top_k``
  experts with the highest logits among those it may use. The combination is::

      out(x) = sum_{e in topk(x)} g_e(x) * expert_e(x) + sum_s shared_s(x)

  where the gate of a selected expert depends **only on its own logit**:

  - learned routers (``pos_embed``, ``modality``): ``g_e = sigmoid(z_e)``, so the router gets
    a gradient through the gate even for ``top_k = 1``;
  - ``deterministic`` router (no learned router): ``g_e = 1``.

  Why not the Switch/GShard gate ``softmax(z)[e]``? Its denominator sums over *every* allowed
  expert, so physically removing an expert that no token ever selected would still rescale
  every other token's gate. With a per-expert gate, removing experts that received no tokens
  leaves the outputs unchanged (see :mod:`mapex_analysis.ops.prune`), and removing an
  expert is exactly masking its logit to ``-inf``.
* Routers (the seed's "Type of Router" ablation). They differ only in what the router sees
  and which prior it has; all score with one ``proj``, an ``nn.Linear(D, E)``
  (:class:`RouterProj`), use the same top-k, gate and load-balance loss, so pruning slices the
  same rows in every kind:

  - ``deterministic``: no learned choice between groups. A token of modality ``m`` may only
    use the experts of ``m``'s group (other logits are ``-inf``); with
    ``experts_per_modality > 1`` the choice *within* the group is made by ``proj(x)``
    (trained by the load-balance loss only) and every selected expert has gate 1. With one
    expert per modality the routing is fixed.
  - ``pos_embed``: a learned router that sees **only the token's 2-D sin-cos position
    embedding**: ``z = proj(pos)``. Its input carries no modality signal (the token itself
    does: modality-specific patch embeddings and the modality embedding are mixed into every
    token by attention, so a router on the token would not be modality-blind) and it has no
    modality prior: the same patch position of two modalities gets the same logits.
  - ``modality`` (the MAPEX router): a learned router on the token plus a learned
    modality-conditioned prior on the logits, ``z = proj(x) + b[m]``, where ``b[m]`` is an
    ``(E,)`` vector per modality initialised to ``prior_init`` (2.0) on the experts of
    ``m``'s own group and 0 on the others. The router may send a token to any expert; the
    prior makes the own group the starting point, and both the prior and the projection
    (which makes the choice inside the group) are learned through the gates.

  Why this mechanism (all numbers on ``mapex_tiny``, 2 experts per modality, top-1, the
  3,000-step recipe of ``studies/pretrain/mapex_tiny.yaml``, scored on 1,000 ``val``
  land-cover scenes): the earlier modality router, ``proj(x + e_m)`` with a learned
  modality embedding and no prior, never tied a modality to its own group (own-group share
  0.15-0.20, chance 1/6; static pruning removed experts that carried 80-85 % of a modality's tokens), because
  nothing in the objective prefers one expert identity over another. The own-group prior
  alone holds early (share 1.00 after 400 steps) but drifts: after 3,000 steps the share
  fell to 0.85-0.99 per layer and static pruning removed 0.5-4.0 % of a modality's traffic.
  The prior plus the group-level mutual-information loss below (``mi_weight`` 0.02) keeps
  every modality on its own group in every layer (share 1.00, removed traffic 0) at a
  slightly higher reconstruction loss (0.560 vs 0.541) and the same k-NN accuracy; a
  stronger prior alone (``prior_init`` 4.0) reached 0.9966-1.00. The shipped checkpoint
  uses the prior (2.0) and the loss (0.02); the test-split figures, taken afterwards, agree.
* Mutual-information loss (Mod-Squad, Chen et al. 2023, applied to modalities and expert
  *groups* instead of tasks and experts): with ``p(e | t) = softmax(z_t)`` over the experts
  token ``t`` may use, ``p(g | t)`` its sum over the experts of group ``g``,
  ``P(m, g) = sum_{t in m} p(g | t) / T`` over the routed tokens of a batch and
  ``mi = sum P(m, g) log(P(m, g) / (P(m) P(g)))`` in nats, the loss is ``-mi`` (weighted by
  the trainer's ``mi_weight``). Taken over groups, it rewards routing a modality to one group
  and leaves the choice of the expert inside the group to the reconstruction (an expert-level
  MI, tried at weight 0.05, also forced a sharp, balanced choice inside the group and raised
  the reconstruction loss from 0.757 to 0.845 after 400 steps). It is 0 for the deterministic
  router (the mask confines it to the own group) and has no modality signal to act on for the
  ``pos_embed`` router (on inputs where every modality covers the same positions its MI is
  exactly 0).
* Tokens whose modality index is ``-1`` (the CLS token) use the shared experts only.
* Load-balance loss (Switch Transformer, Fedus et al. 2021, eq. 4), a training signal only:
  ``aux = E * sum_e f_e * P_e`` with ``f_e`` the fraction of routed assignments sent to ``e``
  and ``P_e`` the mean over routed tokens of ``softmax(z)`` over the experts the token may use
  (all routed experts, or the token's group for ``deterministic``); 1.0 when balanced. The
  softmax appears only here, never in the output.
* Sparse dispatch: each routed expert runs only on the tokens that selected it, so MAC
  counters see the active cost. Per call: one ``bincount`` of (modality, expert) pairs gives
  the routing statistics and every expert's token count; the (token, slot) assignments are
  sorted by expert once (no sort when a single expert has tokens), the tokens gathered once
  (``index_select``), every expert with tokens runs on its contiguous slice, and the gated
  results are added into the shared experts' output with one ``index_add_``. Experts without
  tokens do not run. The models are small, so the per-op overhead is kept low on purpose.

The layer returns its output, auxiliary loss and routing statistics explicitly
(:class:`MoEOutput`); nothing that depends on the inputs is kept in module state between calls
(the only cache holds the deterministic router's group masks, a function of the configuration).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from mapex_analysis.modalities import ModalityError
from mapex_analysis.models.fastpath import fast_paths_allowed, module_dispatch
from mapex_analysis.options import ROUTERS
from mapex_analysis.options import Router as _RouterOption

__all__ = [
    "ROUTER_KINDS",
    "MoEMLP",
    "MoEOutput",
    "PRIOR_INIT",
    "Router",
    "RouterKind",
    "RouterProj",
    "Routing",
    "RoutingInfo",
    "RoutingStats",
    "module_dispatch",
    "mutual_information_loss",
]

RouterKind = _RouterOption
ROUTER_KINDS: tuple[str, ...] = ROUTERS


@dataclass
class RoutingStats:
    """Token counts of one MoE layer.

    Attributes:
        counts: ``(M, E)`` LongTensor: number of tokens of modality ``m`` whose top-k includes
            routed expert ``e``.
        modalities: The ``M`` row modalities (what ``modality_index`` refers to).
        expert_groups: The modality owning each of the ``E`` routed experts.
    """

    counts: torch.Tensor
    modalities: tuple[str, ...]
    expert_groups: tuple[str, ...]


@dataclass
class MoEOutput:
    """What :meth:`MoEMLP.forward` returns.

    Attributes:
        out: ``(B, N, D)`` layer output.
        aux_loss: Scalar Switch load-balance loss of this layer; ``None`` when the caller
            passed ``with_aux=False`` (inference: the loss is a training signal only).
        stats: Routing statistics of this call.
        mi_loss: Scalar ``-I(M; G)`` (nats; ``G`` the expert group) of this layer's router distribution (the
            Mod-Squad loss); ``None`` with ``with_aux=False`` and 0 for the deterministic
            router.
    """

    out: torch.Tensor
    aux_loss: torch.Tensor | None
    stats: RoutingStats
    mi_loss: torch.Tensor | None = None


@dataclass
class RoutingInfo:
    """Routing of a whole encoder pass.

    Attributes:
        aux_loss: Sum of the layers' load-balance losses (scalar).
        stats: One entry per block; ``None`` for blocks without an MoE.
        mi_loss: Sum of the layers' mutual-information losses ``-I(M; G)`` (scalar, 0 for
            encoders without a learned modality-aware router).
    """

    aux_loss: torch.Tensor
    stats: list[RoutingStats | None]
    mi_loss: torch.Tensor | None = None


@dataclass
class Routing:
    """Routing decision for flattened tokens (``T = B * N``).

    Attributes:
        probs: ``(T, E)`` softmax of the router logits over the experts each token may use
            (0 on masked experts; rows of unrouted tokens, e.g. CLS, are 0). Used only by the
            load-balance loss, never as a gate.
        top_idx: ``(T, k)`` selected routed experts (top-k of the logits).
        top_gate: ``(T, k)`` gate of each selected expert: ``sigmoid(logit)`` of that expert
            for the learned routers, ``1`` for ``deterministic``; 0 where not selected.
        routed: ``(T,)`` bool, tokens that use routed experts (modality tokens, not CLS).
        selected: ``(T, k)`` bool, slots that dispatch to their expert: the token is routed
            and the expert's logit is finite (a masked or removed expert is never used).
    """

    probs: torch.Tensor
    top_idx: torch.Tensor
    top_gate: torch.Tensor
    routed: torch.Tensor
    selected: torch.Tensor


@dataclass(frozen=True)
class _FusedPlan:
    """Stacked weights of one MoE layer's fused inference dispatch (see
    :meth:`MoEMLP._fused_plan`).

    Attributes:
        objs: The experts, their norms, activations and parameters it was built from (compared
            by identity).
        stamp: ``data_ptr`` and ``_version`` of each of those parameters.
        act: The experts' common activation.
        hs: Hidden units of the shared experts (the first ``hs`` rows of every stacked ``fc1``).
        rest: ``(fc1 weight, fc1 bias, fc2 weight transposed, fc2 bias)`` of the shared experts
            alone.
        experts: Per routed expert, the shared experts' and its own layers stacked: ``(fc1
            weight, fc1 bias, fc2 weight transposed, shared fc2 bias, expert fc2 bias, their
            sum)``.
    """

    objs: tuple[object, ...]
    stamp: tuple[int, ...]
    act: Any
    hs: int
    rest: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    experts: tuple[
        tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        ...,
    ]


class RouterProj(nn.Linear):
    """``nn.Linear(D, E)`` for router logits, computed as ``(W @ x^T)^T``.

    Same parameters, state-dict keys and values as ``nn.Linear`` (``bias + x @ W^T``), and the
    same ``T * D * E`` MACs; the product is formed as ``(E, T)`` and returned as its ``(T, E)``
    transposed view. With few outputs (``E``) and warm caches this orientation is about twice
    as fast on CPU, and the ``(E, T)`` memory layout makes the per-token reductions over
    experts (max, softmax) vectorise over tokens. Inside a forward pass, right after a GEMM
    has evicted the caches, plain ``nn.Linear`` measured faster (0.06 vs 0.14 ms for 1,088
    tokens, width 128, two experts); whole-model latency differed by less than its run-to-run
    spread, so the orientation (and with it the routing decisions, bit for bit) is kept.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, D)`` tokens to ``(T, E)`` logits (a transposed view of an ``(E, T)`` tensor)."""
        if x.dim() != 2:
            return super().forward(x)
        if self.bias is None:
            return torch.mm(self.weight, x.t()).t()
        return torch.addmm(self.bias.unsqueeze(1), self.weight, x.t()).t()


#: Default initial value of the modality router's prior on its own group's logits.
PRIOR_INIT = 2.0


class Router(nn.Module):
    """Scores routed experts for each token.

    Args:
        dim: Token width ``D``.
        num_experts: Number of routed experts ``E`` (rows of ``proj``).
        kind: ``deterministic``, ``pos_embed`` or ``modality``.
        modalities: Modalities that get a logit prior (``modality`` kind only).
        expert_groups: The modality owning each expert (``modality`` kind: where the prior
            starts at ``prior_init``).
        prior_init: Initial prior on the own group's logits (``modality`` kind).

    Raises:
        ValueError: for an unknown router kind or ``expert_groups`` of the wrong length.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        kind: str,
        modalities: Sequence[str] = (),
        expert_groups: Sequence[str] = (),
        prior_init: float = PRIOR_INIT,
    ) -> None:
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router {kind!r}; valid routers: {', '.join(ROUTER_KINDS)}")
        self.kind = cast(RouterKind, kind)
        self.proj: nn.Linear = RouterProj(dim, num_experts)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        groups = list(expert_groups) or [""] * num_experts
        if len(groups) != num_experts:
            raise ValueError(f"expert_groups has {len(groups)} entries for {num_experts} experts")
        # a plain dict keyed by modality name, so pruning a modality drops its row by name and
        # pruning experts slices every row
        self.prior = nn.ParameterDict(
            {
                m: nn.Parameter(torch.tensor([prior_init if g == m else 0.0 for g in groups]))
                for m in modalities
            }
            if self.kind == "modality"
            else {}
        )

    def forward(
        self,
        x: torch.Tensor,
        modality_index: torch.Tensor,
        modalities: Sequence[str],
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Router logits.

        Args:
            x: ``(T, D)`` tokens.
            modality_index: ``(T,)`` index into ``modalities`` (``-1``: no modality).
            modalities: Names the index refers to.
            pos: ``(T, D)`` position embedding of each token (``pos_embed`` kind: its only
                input).

        Returns:
            ``(T, E)`` logits (unmasked).

        Raises:
            ModalityError: if a modality has no prior (``modality`` kind).
            ValueError: for the ``pos_embed`` kind without ``pos``.
        """
        if self.kind == "pos_embed":
            if pos is None:
                raise ValueError("the pos_embed router needs the tokens' position embeddings")
            return cast(torch.Tensor, self.proj(pos))
        logits = cast(torch.Tensor, self.proj(x))
        if self.kind == "modality" and len(modalities) > 0:
            table = self._prior_table(modalities)  # (M + 1, E); row M (index -1, CLS) is zero
            # index_select, not table[index]: advanced indexing is several times slower on CPU
            logits = logits + table.index_select(0, modality_index % (len(modalities) + 1))
        return logits

    def _prior_table(self, modalities: Sequence[str]) -> torch.Tensor:
        """``(M + 1, E)`` logit priors of ``modalities`` plus a zero row (index ``-1``).

        Raises:
            ModalityError: if a modality has no prior.
        """
        params = self.prior._parameters  # by name, without ParameterDict's lookup cost
        try:
            rows = [cast(torch.Tensor, params[m]) for m in modalities]
        except KeyError:
            missing = [m for m in modalities if m not in params]
            raise ModalityError(
                f"router has no prior for modalities {missing}; "
                f"valid modalities: {', '.join(self.prior.keys())}"
            ) from None
        return torch.stack([*rows, rows[0].new_zeros(rows[0].shape)])


def mutual_information_loss(
    probs_t: torch.Tensor, modality_index: torch.Tensor, routed: torch.Tensor, num_modalities: int
) -> torch.Tensor:
    """``-I(M; G)`` in nats between token modality and expert *group* under the router
    distribution over a batch (Mod-Squad's loss, taken over groups).

    Args:
        probs_t: ``(E, T)`` softmax of the logits over the experts each token may use.
        modality_index: ``(T,)`` modality of each token (``-1``: not routed).
        routed: ``(T,)`` bool, tokens that use routed experts.
        num_modalities: ``M``.

    Returns:
        Scalar ``-sum_{m,e} P(m, e) log(P(m, e) / (P(m) P(e)))`` with ``P(m, e)`` the mean
        over routed tokens of ``p(e | t) [m(t) = m]``; 0 without routed tokens.
    """
    sel = routed.nonzero().squeeze(1)
    if sel.numel() == 0 or num_modalities == 0:
        return probs_t.new_zeros(())
    p = probs_t.t().index_select(0, sel)  # (T_r, E)
    joint = p.new_zeros(num_modalities, p.shape[1]).index_add_(
        0, modality_index.index_select(0, sel), p
    ) / float(sel.numel())
    pm = joint.sum(dim=1, keepdim=True)
    pe = joint.sum(dim=0, keepdim=True)
    eps = 1e-9
    mi = (joint * (torch.log(joint + eps) - torch.log(pm + eps) - torch.log(pe + eps))).sum()
    return -mi


class MoEMLP(nn.Module):
    """Mixture-of-modality-experts MLP with sparse dispatch (see the module docstring).

    Args:
        dim: Token width ``D``.
        hidden: Hidden size of every expert.
        modalities: Modality groups, in order; each gets ``experts_per_modality`` experts.
        experts_per_modality: Routed experts per modality.
        shared_experts: Experts applied to every token.
        top_k: Routed experts per token.
        router: Router kind (``deterministic``, ``pos_embed``, ``modality``).
        prior_init: Initial own-group logit prior of the ``modality`` router.

    Raises:
        ValueError: for an unknown router, a negative expert count or ``top_k`` larger than
            the experts a token can reach.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        modalities: Sequence[str],
        *,
        experts_per_modality: int = 1,
        shared_experts: int = 1,
        top_k: int = 1,
        router: str = "modality",
        prior_init: float = PRIOR_INIT,
    ) -> None:
        super().__init__()
        if experts_per_modality < 0 or shared_experts < 0:
            raise ValueError(
                f"expert counts must be >= 0, got experts_per_modality={experts_per_modality}, "
                f"shared_experts={shared_experts}"
            )
        reach = (
            experts_per_modality
            if router == "deterministic"
            else experts_per_modality * len(modalities)
        )
        if top_k < 1 or (reach > 0 and top_k > reach):
            raise ValueError(
                f"top_k={top_k} must be in [1, {max(reach, 1)}] (routed experts a token can "
                f"reach with router {router!r})"
            )
        self.expert_groups: list[str] = [m for m in modalities for _ in range(experts_per_modality)]
        self.experts = nn.ModuleList(Mlp(dim, hidden) for _ in self.expert_groups)
        self.shared_experts = nn.ModuleList(Mlp(dim, hidden) for _ in range(shared_experts))
        self.router = Router(
            dim, len(self.expert_groups), router, modalities, self.expert_groups, prior_init
        )
        self.top_k = top_k
        # deterministic router: group masks per (modalities, expert_groups, device, dtype);
        # a cache of configuration, not of inputs, and not part of the state dict
        self._mask_cache: dict[
            tuple[object, ...], tuple[torch.Tensor, torch.Tensor, tuple[bool, ...]]
        ] = {}
        self._group_cache: dict[tuple[object, ...], torch.Tensor] = {}
        # fused inference weights, rebuilt when a parameter is replaced or changed (see
        # _fused_plan); not part of the state dict
        self._plan: _FusedPlan | None = None

    @property
    def num_experts(self) -> int:
        """Number of routed experts ``E``."""
        return len(self.experts)

    def default_modalities(self) -> tuple[str, ...]:
        """Modality vocabulary used when the caller passes none: the groups, in order."""
        return tuple(dict.fromkeys(self.expert_groups))

    def _group_masks(
        self, modalities: tuple[str, ...], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[bool, ...]]:
        """Deterministic router tables per modality row ``m`` (row ``M`` is index ``-1``).

        Returns:
            ``(mask, has, has_host)``: additive logit mask ``(M + 1, E)``, ``0`` on the experts
            of ``modalities[m]``'s group and ``-inf`` elsewhere (no mask on rows whose modality
            has no expert, and on row ``M``); ``has`` ``(M + 1,)`` bool, the row's tokens are
            routed; ``has_host`` the same for the ``M`` modalities, as a tuple. Cached per
            configuration (the key holds ``expert_groups``, so pruning, which replaces them,
            invalidates it).
        """
        key = (modalities, tuple(self.expert_groups), device, dtype)
        hit = self._mask_cache.get(key)
        if hit is None:
            M, E = len(modalities), self.num_experts
            allowed = torch.tensor(
                [[g == m for g in self.expert_groups] for m in modalities], dtype=torch.bool
            ).reshape(M, E)
            has = torch.cat([allowed.any(dim=1), torch.zeros(1, dtype=torch.bool)])  # (M + 1,)
            blocked = torch.cat([~allowed, torch.zeros(1, E, dtype=torch.bool)]) & has[:, None]
            mask = torch.zeros(M + 1, E, dtype=dtype).masked_fill_(blocked, float("-inf"))
            hit = (mask.to(device), has.to(device), tuple(bool(h) for h in has[:M].tolist()))
            if len(self._mask_cache) >= 8:
                self._mask_cache.clear()
            self._mask_cache[key] = hit
        return hit

    def _fusable(self) -> bool:
        """Whether :meth:`forward` takes the fused inference dispatch (see :meth:`_fused_plan`)."""
        return self._fused_plan() is not None

    def _fused_plan(self) -> _FusedPlan | None:
        """The stacked weights of the fused inference dispatch, or ``None`` where it may not be
        taken: it needs eval mode without gradients or autocast, top-1 routing, at least one
        shared expert, and every expert a timm ``Mlp`` of ``nn.Linear`` layers with biases, no
        hidden norm and the same activation (what pruning and slimming produce from the
        layer's own experts); never inside :func:`module_dispatch` or a ``torch.jit`` trace.

        The plan is rebuilt whenever an expert, one of its layers or a parameter is replaced,
        moved or changed in place (checked once per call, by identity, storage and version:
        about 10 microseconds with warm caches, 0.1 ms right after a GEMM has evicted them).
        """
        first = next(self.parameters(), None)
        if self.training or self.top_k != 1 or first is None or not fast_paths_allowed(first):
            return None  # before the per-expert walk: gradients, autocast, module_dispatch, jit
        shared = self.shared_experts._modules
        if not shared:
            return None
        objs: list[object] = []
        stamp: list[int] = []
        for group in (shared, self.experts._modules):
            for m in group.values():
                if type(m) is not Mlp:
                    return None
                mods = m._modules
                objs += (m, mods["norm"], mods["act"])
                for lin in (mods["fc1"], mods["fc2"]):
                    if not isinstance(lin, nn.Linear):
                        return None
                    for p in (lin._parameters["weight"], lin._parameters["bias"]):
                        if p is None:
                            return None
                        objs.append(p)
                        stamp += (p.data_ptr(), p._version)
        plan = self._plan
        if (
            plan is not None
            and plan.stamp == tuple(stamp)
            and len(plan.objs) == len(objs)
            and all(a is b for a, b in zip(plan.objs, objs, strict=True))
        ):
            return plan
        self._plan = plan = self._build_plan(objs, stamp)
        return plan

    def _build_plan(self, objs: list[object], stamp: list[int]) -> _FusedPlan | None:
        """Stack the shared experts' weights with each routed expert's (see :class:`_FusedPlan`);
        ``None`` if the experts differ in activation or have a hidden norm."""
        mlps: list[Any] = [*self.shared_experts, *self.experts]
        act = type(mlps[0].act), getattr(mlps[0].act, "approximate", None)
        if not all(
            isinstance(m.norm, nn.Identity)
            and (type(m.act), getattr(m.act, "approximate", None)) == act
            for m in mlps
        ):
            return None
        shared: list[Any] = list(self.shared_experts)
        hs = sum(int(m.fc1.weight.shape[0]) for m in shared)
        b2 = torch.stack([m.fc2.bias for m in shared]).sum(dim=0)

        def stacked(extra: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            group = [*shared, *extra]
            w1 = torch.cat([m.fc1.weight for m in group])
            b1 = torch.cat([m.fc1.bias for m in group])
            w2 = torch.cat([m.fc2.weight for m in group], dim=1)
            return w1, b1, w2.t()

        routed: list[Any] = list(self.experts)
        experts = tuple((*stacked([e]), b2, e.fc2.bias, b2 + e.fc2.bias) for e in routed)
        return _FusedPlan(
            objs=tuple(objs),
            stamp=tuple(stamp),
            act=mlps[0].act,
            hs=hs,
            rest=(*stacked([]), b2),
            experts=experts,
        )

    def _fused_dispatch(
        self,
        plan: _FusedPlan,
        flat: torch.Tensor,
        eid: torch.Tensor,
        sizes: list[int],
        top_logit: torch.Tensor,
    ) -> torch.Tensor:
        """The layer's output at inference with the shared experts folded into each routed
        expert's GEMMs: the tokens of routed expert ``e`` go through one ``fc1`` of the shared
        experts' and ``e``'s rows stacked, the activation, the gate on ``e``'s hidden units
        (and its ``fc2`` bias), and one ``fc2`` of their columns side by side, so a token costs
        two GEMMs instead of two per expert it passes; tokens no routed expert takes (CLS, a
        modality without experts) pass the shared experts alone. The tokens are sorted by
        expert once (rest last), gathered once, every group writes its contiguous slice of one
        output buffer, and one gather with the inverse permutation puts them back in place (no
        sort and no gather when one group holds every token). The same products are computed
        as on the module path (equal within float rounding; MACs unchanged, no padding).

        Args:
            plan: The layer's stacked weights (:meth:`_fused_plan`).
            flat: ``(T, D)`` tokens.
            eid: ``(T, 1)`` routed expert of each token, ``E`` for tokens no expert takes.
            sizes: Tokens per routed expert, in expert order.
            top_logit: ``(T, 1)`` logit of each token's expert.

        Returns:
            ``(T, D)`` output.
        """
        T = flat.shape[0]
        n_sel = sum(sizes)
        groups: list[tuple[int | None, int]] = [(i, n) for i, n in enumerate(sizes) if n]
        if n_sel < T:
            groups.append((None, T - n_sel))
        order: torch.Tensor | None = None
        xs = flat
        if len(groups) > 1:
            order = torch.argsort(eid.reshape(-1), stable=True)
            xs = flat.index_select(0, order)
        gates: torch.Tensor | None = None
        if n_sel and self.router.kind != "deterministic":
            logit = top_logit.reshape(-1)
            gates = torch.sigmoid(logit if order is None else logit.index_select(0, order[:n_sel]))
        act, hs = plan.act, plan.hs
        ys = torch.empty_like(xs)
        start = 0
        for i, n in groups:
            x_g, y_g = xs[start : start + n], ys[start : start + n]
            if i is None:
                w1, b1, w2t, b2 = plan.rest
                torch.addmm(b2, act(F.linear(x_g, w1, b1)), w2t, out=y_g)
            else:
                w1, b1, w2t, b2, b2_e, b2_sum = plan.experts[i]
                h = act(F.linear(x_g, w1, b1))  # (n, shared hidden + expert hidden)
                if gates is None:  # deterministic: gate 1
                    torch.addmm(b2_sum, h, w2t, out=y_g)
                else:
                    g = gates[start : start + n].unsqueeze(-1)
                    h[:, hs:].mul_(g)  # the gate on the expert's hidden units ...
                    torch.addmm(b2, h, w2t, out=y_g)
                    y_g.addcmul_(g, b2_e)  # ... and on its fc2 bias
            start += n
        if order is None:
            return ys
        # back in token order by gathering with the inverse permutation (a gather is about
        # twice as fast as index_copy_ on CPU; the same rows are copied either way)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(T, device=order.device))
        return ys.index_select(0, inverse)

    def _group_index(self, device: torch.device) -> torch.Tensor:
        """``(E,)`` index of each routed expert's group (groups in order of first appearance);
        cached per configuration (the key holds ``expert_groups``, which pruning replaces)."""
        key = (tuple(self.expert_groups), device)
        hit = self._group_cache.get(key)
        if hit is None:
            names = list(dict.fromkeys(self.expert_groups))
            hit = torch.tensor([names.index(g) for g in self.expert_groups], device=device)
            self._group_cache = {key: hit}  # one configuration at a time
        return hit

    def _decide(
        self,
        x: torch.Tensor,
        modality_index: torch.Tensor,
        modalities: tuple[str, ...],
        pos: torch.Tensor | None,
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[bool, ...]
    ]:
        """Top-k choice on flattened tokens.

        Returns:
            ``(logits, top_logit, top_idx, selected, routed, routed_rows)``: logits ``(T, E)``
            (``-inf`` on experts outside a deterministic token's group), the top-k logits and
            experts ``(T, k)``, ``selected`` ``(T, k)`` (routed token and finite logit),
            ``routed`` ``(T,)`` and, per modality row, whether its tokens are routed.
        """
        logits = self.router(x, modality_index, modalities, pos)  # (T, E)
        if self.router.kind == "deterministic":
            mask, has, routed_rows = self._group_masks(modalities, x.device, logits.dtype)
            row = modality_index % (len(modalities) + 1)  # -1 (CLS) -> row M
            logits = logits + mask.index_select(0, row)
            routed = has.index_select(0, row)
        else:
            routed = modality_index >= 0
            routed_rows = (True,) * len(modalities)
        k = min(self.top_k, self.num_experts)
        if k == 1:
            top_logit, top_idx = logits.max(dim=-1, keepdim=True)
        else:
            top_logit, top_idx = logits.topk(k, dim=-1)
        selected = (top_logit > float("-inf")) & routed.unsqueeze(-1)
        return logits, top_logit, top_idx, selected, routed, routed_rows

    def route(
        self,
        x: torch.Tensor,
        modality_index: torch.Tensor,
        modalities: Sequence[str],
        pos: torch.Tensor | None = None,
    ) -> Routing:
        """Choose experts for flattened tokens (what :meth:`forward` dispatches).

        Args:
            x: ``(T, D)`` tokens.
            modality_index: ``(T,)`` index into ``modalities``; ``-1`` for CLS.
            modalities: Names the index refers to.
            pos: ``(T, D)`` position embeddings (used by the ``pos_embed`` router).

        Returns:
            The :class:`Routing` decision.
        """
        logits, top_logit, top_idx, selected, routed, _ = self._decide(
            x, modality_index, tuple(modalities), pos
        )
        if self.router.kind == "deterministic":
            gate = selected.to(top_logit.dtype)
        else:
            gate = torch.sigmoid(top_logit) * selected
        probs = torch.softmax(logits.t(), dim=0).t() * routed.unsqueeze(-1)
        return Routing(
            probs=probs, top_idx=top_idx, top_gate=gate, routed=routed, selected=selected
        )

    def forward(
        self,
        x: torch.Tensor,
        modality_index: torch.Tensor,
        modalities: Sequence[str] | None = None,
        pos: torch.Tensor | None = None,
        *,
        with_aux: bool = True,
    ) -> MoEOutput:
        """Apply the mixture.

        Args:
            x: ``(B, N, D)`` tokens.
            modality_index: ``(B, N)`` index into ``modalities``; ``-1`` for tokens (CLS) that
                take the shared experts only.
            modalities: Names ``modality_index`` refers to; defaults to
                :meth:`default_modalities`. The encoder passes its own ``modalities``.
            pos: ``(B, N, D)`` position embedding per token (``pos_embed`` router).
            with_aux: Compute the load-balance loss (``False``: its ``aux_loss`` is ``None``
                and its ops are skipped; the output and statistics are the same).

        Returns:
            :class:`MoEOutput` with the output ``(B, N, D)``, the load-balance loss and the
            per-modality, per-expert token counts.
        """
        mods = tuple(modalities) if modalities is not None else self.default_modalities()
        B, N, D = x.shape
        flat = x.reshape(B * N, D)  # (T, D)
        idx = modality_index.reshape(B * N)
        M, E = len(mods), self.num_experts

        plan = self._fused_plan() if E > 0 else None
        out: torch.Tensor | None = None
        for shared in () if plan is not None else self.shared_experts:
            y_s = shared(flat)
            out = y_s if out is None else out + y_s
        if E == 0:
            stats = RoutingStats(
                counts=torch.zeros(M, 0, dtype=torch.long, device=x.device),
                modalities=mods,
                expert_groups=(),
            )
            res = out if out is not None else torch.zeros_like(flat)
            aux0 = flat.new_zeros(()) if with_aux else None
            return MoEOutput(out=res.reshape(B, N, D), aux_loss=aux0, stats=stats, mi_loss=aux0)

        pos_flat = pos.reshape(B * N, D) if pos is not None else None
        logits, top_logit, top_idx, selected, routed, routed_rows = self._decide(
            flat, idx, mods, pos_flat
        )
        k = top_idx.shape[1]
        eid = torch.where(selected, top_idx, E)  # (T, k); E marks an unused slot
        # One bincount over (modality row, expert) pairs, with row 0 for index -1 (CLS) and
        # column E for unused slots; one tolist() then gives every size the dispatch needs.
        key = ((idx + 1) * (E + 1)).unsqueeze(-1) + eid
        table = torch.bincount(key.reshape(-1), minlength=(M + 1) * (E + 1)).view(M + 1, E + 1)
        counts = table[1:, :E].contiguous()  # (M, E) assignments per modality and expert
        rows = table.tolist()
        sizes = [sum(col) for col in zip(*rows[1:], strict=True)][:E] if M else [0] * E
        n_sel = sum(sizes)
        if plan is not None:
            out = self._fused_dispatch(plan, flat, eid, sizes, top_logit)
        elif n_sel > 0:
            # Sort the (token, slot) assignments by expert: each expert's tokens become one
            # contiguous slice of a single gather; unused slots (E) sort last and are cut.
            if sum(1 for s in sizes if s) == 1:  # one expert: its slots in order, no sort
                order = selected.reshape(-1).nonzero().squeeze(1)
            else:
                order = torch.argsort(eid.reshape(-1), stable=True)
                if n_sel < order.shape[0]:
                    order = order[:n_sel]
            tok = order if k == 1 else torch.div(order, k, rounding_mode="floor")
            xs = flat.index_select(0, tok)
            ys: list[torch.Tensor] = []
            start = 0
            for expert, n in zip(self.experts, sizes, strict=True):
                if n:  # experts without tokens do not run
                    ys.append(expert(xs if n == n_sel else xs[start : start + n]))
                    start += n
            y = ys[0] if len(ys) == 1 else torch.cat(ys)
            if self.router.kind != "deterministic":  # deterministic gates are exactly 1
                gate = torch.sigmoid(top_logit.reshape(-1).index_select(0, order))
                y = y * gate.unsqueeze(-1)
            if out is None:
                out = torch.zeros_like(flat)
            # In place into the shared experts' output: nothing saved it for backward (linear
            # layers keep their inputs, not their outputs), and no copy of it is needed.
            out.index_add_(0, tok, y.to(out.dtype))  # same dtype unless under autocast
        if out is None:
            out = torch.zeros_like(flat)

        stats = RoutingStats(
            counts=counts, modalities=mods, expert_groups=tuple(self.expert_groups)
        )
        if not with_aux:
            return MoEOutput(out=out.reshape(B, N, D), aux_loss=None, stats=stats)
        # routed tokens: every token of a routed modality row (each has k slots in its row)
        n_routed = sum(sum(r) for r, on in zip(rows[1:], routed_rows, strict=True) if on) // k
        # Switch load-balance loss, a training signal only: f_e from the counts, P_e the mean
        # over routed tokens of the softmax over the allowed experts (dim 0 of the (E, T) view
        # is the fast softmax layout on CPU).
        probs_t = torch.softmax(logits.t(), dim=0)
        p_sum = (probs_t * routed.to(probs_t.dtype)).sum(dim=1)  # (E,)
        scale = E / (max(n_sel, 1) * max(n_routed, 1))
        weight = torch.tensor([scale * s for s in sizes], dtype=p_sum.dtype, device=x.device)
        aux = (weight * p_sum).sum()
        if self.router.kind == "deterministic":
            mi = aux.new_zeros(())
        else:  # MI between the token's modality and the *group* of the chosen expert
            gidx = self._group_index(x.device)
            group_t = probs_t.new_zeros(int(gidx.max()) + 1, probs_t.shape[1])
            group_t.index_add_(0, gidx, probs_t)
            mi = mutual_information_loss(group_t, idx, routed, M)
        return MoEOutput(out=out.reshape(B, N, D), aux_loss=aux, stats=stats, mi_loss=mi)
