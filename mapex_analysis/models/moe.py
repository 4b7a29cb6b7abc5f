"""Mixture of modality experts: grouped experts, three routers, sparse dispatch.

Our reading of MAPEX (DESIGN.md section 4; the authors' code is not public):

* The MLP of a transformer block is replaced by ``E = M * experts_per_modality`` routed experts
  (timm :class:`~timm.layers.Mlp`), grouped by modality (``expert_groups[e]`` names the
  modality owning expert ``e``), plus ``shared_experts`` that every token passes through.
* A router scores the routed experts per token; each token keeps its ``top_k`` experts.
  The combination is Switch/GShard style without renormalisation::

      out(x) = sum_{e in topk(x)} p_e(x) * expert_e(x) + sum_s shared_s(x)

  with ``p = softmax(router logits)`` over the (allowed) routed experts, so the router gets a
  gradient through the gate even for ``top_k = 1``.
* Routers (the seed's "Type of Router" ablation), all scoring with one ``proj: nn.Linear(D, E)``
  so pruning slices the same rows in every kind:

  - ``deterministic``: a token of modality ``m`` may only use the experts of ``m``'s group
    (logits of other experts are masked); ``proj`` only chooses *within* the group, which with
    one expert per modality makes every gate exactly 1.
  - ``pos_embed``: learned linear router on the token plus its 2-D sin-cos position embedding;
    no modality signal is added.
  - ``modality``: learned linear router on the token plus a learned per-layer embedding of the
    token's modality (MAPEX's modality-conditioned router).

* Tokens whose modality index is ``-1`` (the CLS token) use the shared experts only.
* Load-balance loss (Switch Transformer, Fedus et al. 2021, eq. 4):
  ``aux = E * sum_e f_e * P_e`` with ``f_e`` the fraction of routed assignments sent to ``e``
  and ``P_e`` the mean router probability of ``e`` over routed tokens; 1.0 when balanced.
* Sparse dispatch: each routed expert runs only on the tokens that selected it
  (``index_select`` / ``index_add_``), so MAC counters see the active cost.

The layer returns its output, auxiliary loss and routing statistics explicitly
(:class:`MoEOutput`); nothing is kept in module state between calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast, get_args

import torch
from timm.layers import Mlp
from torch import nn

__all__ = [
    "ROUTER_KINDS",
    "MoEMLP",
    "MoEOutput",
    "Router",
    "RouterKind",
    "Routing",
    "RoutingInfo",
    "RoutingStats",
]

RouterKind = Literal["deterministic", "pos_embed", "modality"]
ROUTER_KINDS: tuple[str, ...] = get_args(RouterKind)


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
        aux_loss: Scalar Switch load-balance loss of this layer.
        stats: Routing statistics of this call.
    """

    out: torch.Tensor
    aux_loss: torch.Tensor
    stats: RoutingStats


@dataclass
class RoutingInfo:
    """Routing of a whole encoder pass.

    Attributes:
        aux_loss: Sum of the layers' load-balance losses (scalar).
        stats: One entry per block; ``None`` for blocks without an MoE.
    """

    aux_loss: torch.Tensor
    stats: list[RoutingStats | None]


@dataclass
class Routing:
    """Routing decision for flattened tokens (``T = B * N``).

    Attributes:
        probs: ``(T, E)`` router probabilities (zero on masked experts, rows of CLS tokens 0).
        top_idx: ``(T, k)`` selected routed experts.
        top_gate: ``(T, k)`` gate weight of each selected expert (0 for tokens not routed).
        routed: ``(T,)`` bool, tokens that use routed experts (modality tokens, not CLS).
    """

    probs: torch.Tensor
    top_idx: torch.Tensor
    top_gate: torch.Tensor
    routed: torch.Tensor


class Router(nn.Module):
    """Scores routed experts for each token.

    Args:
        dim: Token width ``D``.
        num_experts: Number of routed experts ``E`` (rows of ``proj``).
        kind: ``deterministic``, ``pos_embed`` or ``modality``.
        modalities: Modalities that get a router embedding (``modality`` kind only).

    Raises:
        ValueError: for an unknown router kind.
    """

    def __init__(
        self, dim: int, num_experts: int, kind: str, modalities: Sequence[str] = ()
    ) -> None:
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router {kind!r}; valid routers: {', '.join(ROUTER_KINDS)}")
        self.kind = cast(RouterKind, kind)
        self.proj = nn.Linear(dim, num_experts)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        # a plain dict keyed by modality name, so pruning a modality drops its row by name
        self.modality_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(dim)) for m in modalities}
            if self.kind == "modality"
            else {}
        )
        for p in self.modality_embed.values():
            nn.init.normal_(p, std=0.02)

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
            pos: ``(T, D)`` position embedding of each token (``pos_embed`` kind).

        Returns:
            ``(T, E)`` logits (unmasked).

        Raises:
            ModalityError: if a modality has no router embedding (``modality`` kind).
        """
        h = x
        if self.kind == "pos_embed" and pos is not None:
            h = h + pos
        elif self.kind == "modality" and len(modalities) > 0:
            from mapex_analysis.modalities import ModalityError

            missing = [m for m in modalities if m not in self.modality_embed]
            if missing:
                raise ModalityError(
                    f"router has no embedding for modalities {missing}; "
                    f"valid modalities: {', '.join(self.modality_embed.keys())}"
                )
            table = torch.stack([self.modality_embed[m] for m in modalities])  # (M, D)
            emb = table[modality_index.clamp(min=0)] * (modality_index >= 0).unsqueeze(-1)
            h = h + emb
        return cast(torch.Tensor, self.proj(h))


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
        self.router = Router(dim, len(self.expert_groups), router, modalities)
        self.top_k = top_k

    @property
    def num_experts(self) -> int:
        """Number of routed experts ``E``."""
        return len(self.experts)

    def default_modalities(self) -> tuple[str, ...]:
        """Modality vocabulary used when the caller passes none: the groups, in order."""
        return tuple(dict.fromkeys(self.expert_groups))

    def route(
        self,
        x: torch.Tensor,
        modality_index: torch.Tensor,
        modalities: Sequence[str],
        pos: torch.Tensor | None = None,
    ) -> Routing:
        """Choose experts for flattened tokens.

        Args:
            x: ``(T, D)`` tokens.
            modality_index: ``(T,)`` index into ``modalities``; ``-1`` for CLS.
            modalities: Names the index refers to.
            pos: ``(T, D)`` position embeddings (used by the ``pos_embed`` router).

        Returns:
            The :class:`Routing` decision.
        """
        E = self.num_experts
        routed = modality_index >= 0
        logits = self.router(x, modality_index, modalities, pos)  # (T, E)
        if self.router.kind == "deterministic":
            # allowed[m, e]: expert e belongs to modality m's group
            allowed = torch.tensor(
                [[g == m for g in self.expert_groups] for m in modalities],
                dtype=torch.bool,
                device=x.device,
            ).reshape(len(modalities), E)
            token_allowed = allowed[modality_index.clamp(min=0)]  # (T, E)
            routed = routed & token_allowed.any(dim=-1)
            logits = logits.masked_fill(~token_allowed, float("-inf"))
            logits = torch.where(routed.unsqueeze(-1), logits, torch.zeros_like(logits))
        probs = torch.softmax(logits, dim=-1) * routed.unsqueeze(-1)  # (T, E)
        k = min(self.top_k, E)
        top_gate, top_idx = probs.topk(k, dim=-1)
        return Routing(probs=probs, top_idx=top_idx, top_gate=top_gate, routed=routed)

    def forward(
        self,
        x: torch.Tensor,
        modality_index: torch.Tensor,
        modalities: Sequence[str] | None = None,
        pos: torch.Tensor | None = None,
    ) -> MoEOutput:
        """Apply the mixture.

        Args:
            x: ``(B, N, D)`` tokens.
            modality_index: ``(B, N)`` index into ``modalities``; ``-1`` for tokens (CLS) that
                take the shared experts only.
            modalities: Names ``modality_index`` refers to; defaults to
                :meth:`default_modalities`. The encoder passes its own ``modalities``.
            pos: ``(B, N, D)`` position embedding per token (``pos_embed`` router).

        Returns:
            :class:`MoEOutput` with the output ``(B, N, D)``, the load-balance loss and the
            per-modality, per-expert token counts.
        """
        mods = tuple(modalities) if modalities is not None else self.default_modalities()
        B, N, D = x.shape
        flat = x.reshape(B * N, D)  # (T, D)
        idx = modality_index.reshape(B * N)
        pos_flat = pos.reshape(B * N, D) if pos is not None else None
        E = self.num_experts
        out = torch.zeros_like(flat)
        aux = flat.new_zeros(())
        counts = torch.zeros(len(mods), E, dtype=torch.long, device=x.device)
        if E > 0:
            r = self.route(flat, idx, mods, pos_flat)
            selected = r.top_gate > 0  # (T, k); unrouted tokens carry gate 0
            for e, expert in enumerate(self.experts):
                hit = (r.top_idx == e) & selected  # (T, k)
                tok = hit.any(dim=-1).nonzero(as_tuple=True)[0]  # tokens routed to e
                if tok.numel() == 0:
                    continue
                gate = (r.top_gate * hit).sum(dim=-1).index_select(0, tok)  # (n_e,)
                y = expert(flat.index_select(0, tok)) * gate.unsqueeze(-1)
                out.index_add_(0, tok, y)
            n_routed = r.routed.sum()
            if int(n_routed) > 0:
                assign = torch.zeros(flat.shape[0], E, device=x.device, dtype=flat.dtype)
                assign.scatter_(1, r.top_idx, selected.to(flat.dtype))  # (T, E) 0/1
                f = assign.sum(0) / assign.sum().clamp(min=1)
                p = r.probs.sum(0) / n_routed
                aux = E * (f * p).sum()
                m_idx = idx[r.routed]
                one_hot = torch.nn.functional.one_hot(m_idx, len(mods)).float()  # (T_r, M)
                # exact for fewer than 2**24 tokens per call
                counts = (one_hot.T @ assign[r.routed].float()).detach().round().long()  # (M, E)
        for shared in self.shared_experts:
            out = out + shared(flat)
        stats = RoutingStats(
            counts=counts, modalities=mods, expert_groups=tuple(self.expert_groups)
        )
        return MoEOutput(out=out.reshape(B, N, D), aux_loss=aux, stats=stats)
