"""Shared-weight sub-networks for slimmable training (the sandwich rule).

A slimmable model is an ordinary model whose narrower sub-networks are trained too. Here a
sub-network at width ``s`` is **the model that** :func:`~mapex_analysis.ops.slim.slim_width`
**would build** (mode and ``order="first"``: the first ``floor(s * d)`` dims of every head and
hidden units of every MLP, every MoE expert alike), but its weights are **views into the full
model's parameters**, so a gradient through the sub-network lands on the shared weights and a
model trained this way is slimmed post hoc by the same operator.

How the views are found (no second implementation of the slicing): the full model is copied
with every floating parameter and buffer replaced by its **position** in one flat index space
(float64, exact below 2**53); ``slim_width`` slices that tagged copy; each tensor of the result
then *is* the list of full-model entries it keeps. :class:`SlimmableNetwork` keeps the sliced
skeleton and these index tensors per width and runs ``torch.func.functional_call`` on the
skeleton with ``full_param.flatten()[index]`` (differentiable gathers).

:func:`sandwich_step` is one training step of Universally Slimmable Networks' sandwich rule
(Yu and Huang, ICCV 2019), as the slimmability paper (Hackel et al., arXiv 2601.22841) trains:
the full width with the task loss, the smallest width and ``n_random`` widths sampled from the
grid with in-place distillation from the full width's (detached) output; each width's loss is
back-propagated once, so the shared weights accumulate one gradient per width.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from mapex_analysis.ops.slim import SlimMode, slim_width

__all__ = ["SandwichResult", "SlimmableNetwork", "sandwich_step", "sandwich_widths"]


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """Floating parameters and buffers of ``model`` by name (the tensors widths share)."""
    out: dict[str, Tensor] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            out[name] = t
    return out


@dataclass
class _Sub:
    skeleton: nn.Module
    #: sub-network tensor name -> (full-model tensor name, flat indices into it, shape)
    index: dict[str, tuple[str, Tensor, torch.Size]]


class SlimmableNetwork(nn.Module):
    """A model with shared-weight sub-networks at any width of ``slim_width``.

    Args:
        model: The full-width model (kept as ``self.model``; its ``state_dict`` is an ordinary
            checkpoint of the non-slimmable architecture).
        mode: Which modules are slimmed (``attn+mlp``, ``attn``, ``mlp``), as ``slim_width``.
        part: Dotted name of the submodule that is slimmed (``"encoder"`` of a pretraining
            objective, whose decoder or projection head stays at full width); ``""``: all.

    ``net(x, width=s)`` runs the sub-network at ``s`` (``s = 1``: ``model(x)`` itself).
    """

    def __init__(self, model: nn.Module, mode: SlimMode = "attn+mlp", part: str = "") -> None:
        super().__init__()
        self.model = model
        self.mode = mode
        self.part = part
        model.get_submodule(part)  # fails early, naming the missing submodule
        self._subs: dict[float, _Sub] = {}

    def _build(self, s: float) -> _Sub:
        full = _tensors(self.model)
        names = list(full)
        offsets = np.cumsum([0] + [full[n].numel() for n in names])
        if offsets[-1] >= 2**53:
            raise ValueError(f"model too large to tag ({offsets[-1]} entries)")
        tagged = copy.deepcopy(self.model).to(torch.float64)
        tagged_tensors = _tensors(tagged)
        with torch.no_grad():
            for i, n in enumerate(names):
                t = tagged_tensors[n]
                t.copy_(torch.arange(int(offsets[i]), int(offsets[i + 1]), dtype=torch.float64)
                        .view_as(t))  # fmt: skip
        slim_width(tagged.get_submodule(self.part), s, mode=self.mode, order="first",
                   inplace=True)  # fmt: skip
        skeleton = tagged
        index: dict[str, tuple[str, Tensor, torch.Size]] = {}
        for n, t in _tensors(skeleton).items():
            flat = t.detach().reshape(-1).to(torch.int64)
            owner = int(np.searchsorted(offsets, int(flat[0]), side="right")) - 1
            lo, hi = int(offsets[owner]), int(offsets[owner + 1])
            if not bool(((flat >= lo) & (flat < hi)).all()):
                raise RuntimeError(f"slim_width mixed several tensors into {n}")
            index[n] = (names[owner], (flat - lo).to(full[names[owner]].device), t.shape)
        dtype = next(iter(full.values())).dtype if full else torch.float32
        skeleton.to(dtype)
        return _Sub(skeleton, index)

    def subnetwork(self, s: float) -> _Sub:
        """The skeleton and index tensors of width ``s`` (built once per width)."""
        key = float(s)
        if key not in self._subs:
            self._subs[key] = self._build(key)
        return self._subs[key]

    def tensors_at(self, s: float) -> dict[str, Tensor]:
        """The sub-network's parameters and buffers at ``s``: gathers from the full model's
        tensors (differentiable: gradients reach the shared weights)."""
        sub = self.subnetwork(s)
        full = _tensors(self.model)
        return {n: full[src].reshape(-1)[idx].view(shape)
                for n, (src, idx, shape) in sub.index.items()}  # fmt: skip

    def forward(self, *args: Any, width: float = 1.0, **kwargs: Any) -> Any:
        if not 0.0 < width <= 1.0 or not math.isfinite(width):
            raise ValueError(f"width must be in (0, 1], got {width}")
        if width == 1.0:
            return self.model(*args, **kwargs)
        sub = self.subnetwork(width)
        sub.skeleton.train(self.model.training)
        return functional_call(sub.skeleton, self.tensors_at(width), args, kwargs)


def sandwich_widths(grid: Sequence[float], n_random: int, rng: np.random.Generator) -> list[float]:
    """The widths of one sandwich step: 1.0, the grid's smallest width and ``n_random``
    distinct widths drawn from the rest of the grid (fewer if the grid has fewer).

    Args:
        grid: Widths trained for (values in (0, 1]).
        n_random: Random widths per step.
        rng: The draw's generator.

    Returns:
        Widths, largest first.
    """
    widths = sorted({float(w) for w in grid} | {1.0}, reverse=True)
    smallest = widths[-1]
    middle = [w for w in widths if w not in (1.0, smallest)]
    k = min(n_random, len(middle))
    drawn = [middle[i] for i in sorted(rng.choice(len(middle), size=k, replace=False))] if k else []
    return [1.0, *drawn, *([smallest] if smallest < 1.0 else [])]


@dataclass
class SandwichResult:
    """One sandwich step: ``losses[s]`` per width (the full width's task loss, the others'
    distillation losses), ``widths`` in the order they ran, and ``total`` (their sum, still
    attached to the graph) when the step did not back-propagate itself."""

    losses: dict[float, float]
    widths: list[float]
    total: Tensor | None = None


def sandwich_step(
    forward: Callable[[float], Any],
    widths: Sequence[float],
    task_loss: Callable[[Any], Tensor],
    distill_loss: Callable[[Any, Any], Tensor],
    *,
    backward: bool = True,
) -> SandwichResult:
    """The losses of every width of one step (the caller zeroes gradients before and steps
    the optimiser after).

    Args:
        forward: ``forward(s)`` runs the model at width ``s`` on the step's batch (e.g.
            ``lambda s: net(x, width=s)``; replay random state inside it when the objective
            draws masks or views, so every width sees the same ones).
        widths: From :func:`sandwich_widths` (first 1.0).
        task_loss: Loss of the full width's output (e.g. the MAE reconstruction loss).
        distill_loss: ``distill_loss(sub_output, full_output_detached)``.
        backward: Back-propagate each width's loss right after its forward (one graph alive
            at a time); ``False`` returns their sum as ``total`` instead (one backward, e.g.
            under Lightning's automatic optimisation; the same gradient).

    Returns:
        The per-width losses.

    Raises:
        ValueError: if the first width is not 1.0 (distillation needs the full output first).
    """
    if not widths or widths[0] != 1.0:
        raise ValueError(f"the sandwich starts with the full width 1.0, got {list(widths)}")
    out = forward(1.0)
    loss = task_loss(out)
    total = loss
    if backward:
        loss.backward()
    losses = {1.0: float(loss.detach())}
    target = _detach(out)
    for s in widths[1:]:
        sub = distill_loss(forward(s), target)
        if backward:
            sub.backward()
        else:
            total = total + sub
        losses[float(s)] = float(sub.detach())
    return SandwichResult(losses, list(widths), None if backward else total)


def _detach(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return dataclasses.replace(out, **{f.name: _detach(getattr(out, f.name))
                                           for f in dataclasses.fields(out) if f.init})  # fmt: skip
    if isinstance(out, dict):
        return {k: _detach(v) for k, v in out.items()}
    if isinstance(out, tuple | list):
        return type(out)(_detach(v) for v in out)
    return out
