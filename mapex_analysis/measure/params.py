"""Parameter counts: total, and active per modality for modality-aware models.

A parameter is *active* for a modality set if a token of one of those modalities can touch it.
Ownership is read from the model's structure (no hooks, no forward pass):

* routed experts of a mixture-of-experts layer (any module with an ``experts`` list and an
  ``expert_groups`` list naming the modality that owns each routed expert, as
  :class:`mapex_analysis.models.moe.MoEMLP` has) belong to their group's modality;
* entries of an ``nn.ModuleDict`` / ``nn.ParameterDict`` keyed by modality names (the
  per-modality patch embeddings and modality embeddings, the router's per-modality logit
  priors, reconstruction heads...) belong to that modality;
* everything else is shared: attention, norms, shared experts, the router's projection (it
  scores every expert for every token), the position embedding table.

So for MAPEX the active parameters of modality ``m`` are the shared attention and norms, the
patch embedding of ``m``, the routed experts of ``m``'s group and the shared experts: what a model
pruned to ``m`` with the ``static`` strategy keeps. With a learned router and ``top_k`` routing a
token may reach another group's expert; that traffic is measured by the pruning operator's
``traffic_to_removed``, and :func:`routed_active_params` counts the parameters a modality's
tokens *did* reach on data (the experts its tokens were routed to, from measured routing counts).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mapex_analysis.modalities import ModalityError
from mapex_analysis.models.contract import is_moe_layer, moe_layers, num_params

__all__ = ["ParamsReport", "count_params", "parameter_owners", "routed_active_params"]


@dataclass(frozen=True)
class ParamsReport:
    """Parameter counts of a model.

    Attributes:
        total: Number of parameters (shared tensors counted once).
        active: Parameters active for :attr:`modalities` (``total`` when the model declares
            no modalities).
        modalities: The modality set ``active`` refers to.
        shared: Parameters every modality uses.
        by_modality: Active parameters when the model is fed each modality alone, for every
            modality the model declares.
        owned: Parameters owned by each modality (its patch embedding, its experts...).
    """

    total: int
    active: int
    modalities: tuple[str, ...]
    shared: int
    by_modality: dict[str, int] = field(default_factory=dict)
    owned: dict[str, int] = field(default_factory=dict)

    def rows(self) -> list[dict[str, object]]:
        """One row per modality plus the total, for tables.

        Returns:
            Dicts with ``modality``, ``active params`` and ``share of total``.
        """
        out: list[dict[str, object]] = [
            {
                "modality": m,
                "active params": n,
                "share of total": f"{n / self.total:.1%}" if self.total else "-",
            }
            for m, n in self.by_modality.items()
        ]
        out.append({"modality": "(all)", "active params": self.total, "share of total": "100.0%"})
        return out


def parameter_owners(model: nn.Module) -> dict[int, tuple[int, str | None]]:
    """Which modality owns each parameter.

    Args:
        model: Any module; modality ownership needs ``model.modalities``.

    Returns:
        ``{id(parameter): (numel, owner)}`` with ``owner`` a modality name or ``None`` for
        shared parameters. Each parameter tensor appears once.

    Raises:
        ValueError: if an MoE layer's ``expert_groups`` does not match its experts.
    """
    modalities = set(getattr(model, "modalities", ()) or ())
    owners: dict[int, tuple[int, str | None]] = {
        id(p): (p.numel(), None) for p in model.parameters()
    }
    if not modalities:
        return owners

    def claim(params: Iterable[nn.Parameter], owner: str) -> None:
        for p in params:
            owners[id(p)] = (p.numel(), owner)

    for name, module in model.named_modules():
        if is_moe_layer(module):
            experts, groups = module.experts, list(module.expert_groups)
            if len(groups) != len(experts):
                raise ValueError(
                    f"{name or type(module).__name__}: {len(experts)} experts but "
                    f"{len(groups)} expert_groups {groups}"
                )
            for expert, group in zip(experts, groups, strict=True):
                if group in modalities:
                    claim(expert.parameters(), group)
        elif isinstance(module, nn.ModuleDict) and module and set(module) <= modalities:
            for key, sub in module.items():
                claim(sub.parameters(), key)
        elif isinstance(module, nn.ParameterDict) and module and set(module) <= modalities:
            for key, param in module.items():
                claim([param], key)
    return owners


def count_params(model: nn.Module, modalities: Iterable[str] | None = None) -> ParamsReport:
    """Count total parameters and the parameters active for a modality set.

    Args:
        model: The model. Modality-aware models declare ``model.modalities``.
        modalities: Modalities of the task; ``None`` means all the model declares.

    Returns:
        The :class:`ParamsReport`.

    Raises:
        ModalityError: if ``modalities`` is given for a model that declares none, or names a
            modality the model does not have (the message lists the valid ones).
    """
    declared = tuple(getattr(model, "modalities", ()) or ())
    if modalities is None:
        selected = declared
    else:
        selected = tuple(modalities)
        if not declared:
            raise ModalityError(
                f"{type(model).__name__} declares no modalities; count it with modalities=None"
            )
        unknown = [m for m in selected if m not in declared]
        if unknown or not selected:
            raise ModalityError(
                f"{type(model).__name__} has no modality {unknown or selected}; "
                f"valid: {', '.join(declared)}"
            )
    owners = parameter_owners(model).values()
    total = sum(n for n, _ in owners)
    shared = sum(n for n, owner in owners if owner is None)
    owned = {m: sum(n for n, owner in owners if owner == m) for m in declared}
    active = shared + sum(owned[m] for m in dict.fromkeys(selected)) if declared else total
    return ParamsReport(
        total=total,
        active=active,
        modalities=selected,
        shared=shared,
        by_modality={m: shared + owned[m] for m in declared},
        owned=owned,
    )


def routed_active_params(model: nn.Module, routing: Iterable[Any], modality: str) -> int:
    """Parameters a modality's tokens reached on data: measured routing, not group labels.

    Args:
        model: A token model with MoE blocks (``model.blocks[i].mlp``).
        routing: One entry per block, ``None`` for blocks without MoE, else an object with
            ``counts`` ``(M, E)``, ``modalities`` and ``expert_groups`` (``RoutingCounts`` of
            :func:`~mapex_analysis.measure.specialization.collect_routing`).
        modality: The modality whose tokens are followed.

    Returns:
        Shared parameters (everything but routed experts and other modalities' embeddings),
        plus ``modality``'s own per-modality parameters, plus every routed expert that
        received at least one of its tokens.

    Raises:
        ModalityError: if the routing has no row for ``modality``.
        ValueError: if the routing does not match the model's MoE layers.
    """
    owners = parameter_owners(model)
    experts_of: dict[int, nn.ModuleList] = {
        int(name.split(".")[1]): moe.experts for name, moe in moe_layers(model).items()
    }
    routed_ids = {id(p) for ex in experts_of.values() for p in ex.parameters()}
    total = sum(
        n
        for pid, (n, owner) in owners.items()
        if pid not in routed_ids and owner in (None, modality)
    )
    entries = list(routing)
    if sorted(i for i, r in enumerate(entries) if r is not None) != sorted(experts_of):
        raise ValueError(
            f"routing has entries for blocks {[i for i, r in enumerate(entries) if r is not None]}"
            f", the model has MoE blocks {sorted(experts_of)}"
        )
    for i, r in enumerate(entries):
        if r is None:
            continue
        mods = list(r.modalities)
        if modality not in mods:
            raise ModalityError(f"routing of block {i} has no modality {modality!r}: {mods}")
        row = r.counts[mods.index(modality)]
        for e, expert in enumerate(experts_of[i]):
            if int(row[e]) > 0:
                total += num_params(expert)
    return total
