"""Sparse-dispatch overhead: MAPEX fed one modality vs a dense ViT of the same active size.

``mapex_tiny`` fed a single modality runs, per block, shared attention plus its top-k routed
experts and the shared experts on every token. The reference is a dense timm
``VisionTransformer`` with the same width, depth, heads, patch size, image size and input
bands, whose MLP hidden size equals the active expert hidden size (``top_k * expert hidden +
shared experts' hidden``), so both count (nearly) the same MACs; the benchmark prints both MAC
counts to show it. The remaining latency gap is the cost of routing and sparse dispatch
(router, top-k, ``index_select``/``index_add``).

A third model separates the two parts of that gap: ``split floor`` is the same MAPEX with each
MoE replaced by its own experts run at the routing split this input produced (shared experts
on every token, each routed expert on a contiguous slice of as many tokens as the router sent
it) with no router and no gather/scatter. Its ratio to dense is what splitting the tokens into
several smaller GEMMs costs; MAPEX over the floor is what routing and dispatch cost.

A fourth model is the deployment case: ``pruned``, the same MAPEX pruned (``static``) to the
modality it is fed, so only that modality's expert group, the shared experts and its patch
embedding remain; its ratio to the same dense twin is printed too (target the same).

All models are timed side by side in one process, one call of each in turn (so drifts in
machine load hit all of them), at batch 64 on CPU, for each router's checkpoint in turn
(modality, deterministic, pos_embed). The script prints the median over turns of each turn's
ratio (with its interquartile range) and exits with status 1 if
one exceeds its target (unpruned 1.10, pruned 1.05), naming the routers that missed::

    .venv/bin/python benchmarks/bench_moe_latency.py [--model M] [--router R ...] [--modality sar]

At inference MAPEX takes the fused dispatch of :class:`mapex_analysis.models.moe.MoEMLP` (the
shared experts folded into each routed expert's GEMMs); the split floor runs the experts as
modules.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from mapex_analysis.factory import create_model
from mapex_analysis.measure.cost import example_inputs
from mapex_analysis.measure.latency import measure_latency
from mapex_analysis.measure.macs import count_macs
from mapex_analysis.ops.prune import prune_experts

#: The trained study model (written by the MAPEX pretraining run), benchmarked by default.
DEFAULT_CHECKPOINT = "models/mapex_tiny"


def active_mlp_hidden(model: nn.Module) -> int:
    """Hidden units one token passes through in a MAPEX block's MoE (all blocks alike)."""
    mlp = model.blocks[0].mlp
    if not hasattr(mlp, "experts"):
        return int(mlp.fc1.out_features)
    routed = int(mlp.experts[0].fc1.out_features) * int(mlp.top_k)
    shared = sum(int(e.fc1.out_features) for e in mlp.shared_experts)
    return routed + shared


def dense_twin(model: nn.Module, in_chans: int) -> nn.Module:
    """A dense timm ViT with the width, depth, heads and active MLP size of ``model``."""
    img = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img,
        patch_size=model.patch_size,
        in_chans=in_chans,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=model.blocks[0].attn.num_heads,
        mlp_ratio=active_mlp_hidden(model) / model.embed_dim,
        num_classes=0,
        global_pool="token" if model.pool == "cls" else "avg",
    ).eval()


class SplitFloorMLP(nn.Module):
    """An MoE's experts at a fixed routing split, without router or dispatch (the floor).

    Args:
        moe: The MoE layer whose experts run.
        sizes: Tokens per routed expert (from the layer's routing statistics).
    """

    def __init__(self, moe: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.shared = moe.shared_experts
        self.experts = moe.experts
        self.sizes = sizes

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Shared experts on every token; routed expert ``e`` on the next ``sizes[e]`` tokens."""
        B, N, D = h.shape
        flat = h.reshape(B * N, D)
        out = sum(e(flat) for e in self.shared) if len(self.shared) else torch.zeros_like(flat)
        ys, start = [], 0
        for expert, n in zip(self.experts, self.sizes, strict=True):
            if n:
                ys.append(expert(flat[start : start + n]))
                start += n
        if ys:
            out[:start] += torch.cat(ys)
        return out.reshape(B, N, D)


def split_floor(model: nn.Module, x: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose MoE layers run as :class:`SplitFloorMLP` at ``x``'s routing."""
    with torch.no_grad():
        _, info = model.encode(*model.tokenize(x), return_routing=True)
    floor = copy.deepcopy(model)
    for block, stats in zip(floor.blocks, info.stats, strict=True):
        if stats is not None:
            block.mlp = SplitFloorMLP(block.mlp, stats.counts.sum(dim=0).tolist())
    return floor.eval()


def main(argv: list[str] | None = None) -> int:
    """Every router given (default: the three trained checkpoints), one after the other."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--router", nargs="+", default=["modality", "deterministic", "pos_embed"])
    known, rest = parser.parse_known_args(argv)
    missed = [r for r in known.router if bench(["--router", r, *rest]) != 0]
    if missed:
        print(f"MoE latency targets missed for router(s): {', '.join(missed)}")
    return 1 if missed else 0


def bench(argv: list[str] | None = None) -> int:
    """One model: MAPEX, its dense twin, the split floor and the pruned model, side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        default=None,
        help="Registry name or checkpoint directory (default: the trained checkpoint "
        f"{DEFAULT_CHECKPOINT}, or {DEFAULT_CHECKPOINT}_<router> with --router, if present; "
        "else mapex_tiny at random init).",
    )
    parser.add_argument("--modality", default="sar")
    parser.add_argument("--router", default=None, help="Router kind override (default: model's).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=10, help="turns = rounds x repeats")
    parser.add_argument("--target", type=float, default=1.10, help="unpruned MAPEX / dense")
    parser.add_argument("--target-pruned", type=float, default=1.05, help="pruned / dense")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.model is None:
        # the study trains one checkpoint per router: models/mapex_tiny (modality router) and
        # models/mapex_tiny_<router>; without it, mapex_tiny at random init with that router
        ckpt = DEFAULT_CHECKPOINT
        if args.router not in (None, "modality"):
            ckpt = f"{DEFAULT_CHECKPOINT}_{args.router}"
        if Path(ckpt).is_dir():
            args.model, args.router = ckpt, None  # a checkpoint is loaded as saved
        else:
            args.model = "mapex_tiny"
    overrides = {"router": args.router} if args.router else {}
    mapex = create_model(args.model, **overrides).eval()
    x = example_inputs(mapex, batch_size=args.batch_size, modalities=[args.modality])
    assert isinstance(x, dict)
    dense_x = x[args.modality]
    dense = dense_twin(mapex, in_chans=dense_x.shape[1])

    macs_mapex = count_macs(mapex, x, cross_check=False).total
    macs_dense = count_macs(dense, dense_x, cross_check=False).total
    floor = split_floor(mapex, x)
    pruned = prune_experts(mapex, [args.modality]).eval()
    macs_pruned = count_macs(pruned, x, cross_check=False).total
    models = (
        ("mapex", mapex, x),
        ("dense", dense, dense_x),
        ("floor", floor, x),
        ("pruned", pruned, x),
    )
    for _, model, inp in models:
        measure_latency(model, inp, warmup=2, repeats=1, threads=args.threads)
    # One call per model in turn, rounds x repeats times: the four calls of one turn run within
    # ~0.2 s of each other, so the machine's load swings (seconds long on a shared VM) hit them
    # alike; a ratio is the median over turns of that turn's ratio.
    times: dict[str, list[float]] = {name: [] for name, _, _ in models}
    for _ in range(args.rounds * args.repeats):
        for name, model, inp in models:
            rep = measure_latency(model, inp, warmup=0, repeats=1, threads=args.threads)
            times[name].append(rep.points[0].median_ms)
    t_mapex, t_dense, t_floor, t_pruned = (
        statistics.median(times[n]) for n in ("mapex", "dense", "floor", "pruned")
    )

    def paired(name: str) -> tuple[float, float, float]:
        """Median and interquartile range over turns of the turn's ratio to dense."""
        r = [a / b for a, b in zip(times[name], times["dense"], strict=True)]
        q1, _, q3 = statistics.quantiles(r, n=4)
        return statistics.median(r), q1, q3

    ratio, lo, hi = paired("mapex")
    ratio_pruned, lo_p, hi_p = paired("pruned")
    print(
        f"{args.model} (router {getattr(mapex, 'router_kind', '?')}) fed {args.modality!r}, batch {args.batch_size}, {args.threads} thread(s), "
        f"torch {torch.__version__}"
    )
    print(f"  MAPEX : {t_mapex:8.2f} ms  {macs_mapex / 1e6:9.2f} M MACs")
    print(f"  dense : {t_dense:8.2f} ms  {macs_dense / 1e6:9.2f} M MACs")
    print(f"  pruned: {t_pruned:8.2f} ms  {macs_pruned / 1e6:9.2f} M MACs "
          f"(static, to {args.modality!r})")  # fmt: skip
    print(f"  split floor (same expert GEMMs, no routing): {t_floor:8.2f} ms")
    print(f"  ratio MAPEX / dense = {ratio:.3f} (IQR {lo:.3f}-{hi:.3f}; target <= {args.target})")
    print(f"  ratio pruned MAPEX / dense = {ratio_pruned:.3f} (IQR {lo_p:.3f}-{hi_p:.3f}; "
          f"target <= {args.target_pruned})")  # fmt: skip
    print(
        f"  of which splitting tokens over experts: floor / dense = {t_floor / t_dense:.3f}; "
        f"routing and dispatch: MAPEX / floor = {t_mapex / t_floor:.3f}"
    )
    return 0 if ratio <= args.target and ratio_pruned <= args.target_pruned else 1


if __name__ == "__main__":
    sys.exit(main())
