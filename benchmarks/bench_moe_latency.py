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
embedding remain; its ratio to the same dense twin is printed too (target the same). Its floor,
``pruned floor``, runs each pruned MoE's fused GEMMs (the inference dispatch's stacked weights)
on contiguous slices at this input's routing split, with no router, no sort and no gather:
the ratio the pruned model would reach if routing cost nothing.

The trained checkpoints are ``mapex_tiny`` (width 128): a layer's MLP is ~2 ms at batch 64,
so the router's and dispatch's fixed per-layer cost (~30 small operators) weighs heavily.
``--base`` (on by default in :func:`main`) repeats every router at the width of the paper's
models: ``mapex_base`` (width 768, depth 12, random init, 2 experts per modality like the tiny
model) on 64 px inputs, so a scene has as many tokens as the tiny model's 32 px scenes.

All models are timed side by side in one process, one call of each in turn (so drifts in
machine load hit all of them), at batch 64 on CPU, for each router's checkpoint in turn
(modality, deterministic, pos_embed). The script prints the median over turns of each turn's
ratio (with its interquartile range) and exits with status 1 if
one exceeds its target (unpruned 1.10, pruned 1.05), naming the runs that missed, after a
summary table of every run::

    .venv/bin/python benchmarks/bench_moe_latency.py [--model M] [--router R ...] [--no-base]
        [--modality sar] [--img-size PX] [--experts-per-modality N]

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
import torch.nn.functional as F
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


class FusedFloorMLP(nn.Module):
    """An MoE's fused inference GEMMs at a fixed routing split, without router or dispatch.

    Routed expert ``e`` takes the next ``sizes[e]`` tokens through the shared experts' and its
    own weights stacked (:meth:`MoEMLP._fused_plan`), the remaining tokens (CLS) the shared
    experts alone: the products the fused dispatch computes, with the tokens already in order.

    Args:
        moe: The MoE layer (in eval mode, fusable).
        sizes: Tokens per routed expert (from the layer's routing statistics).
    """

    def __init__(self, moe: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        with torch.inference_mode():
            plan = moe._fused_plan()
        if plan is None:
            raise ValueError("the MoE layer has no fused inference plan")
        self.plan = plan
        self.sizes = sizes

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Each group's two GEMMs on its slice of the tokens, written into one buffer."""
        B, N, D = h.shape
        flat = h.reshape(B * N, D)
        ys = torch.empty_like(flat)
        groups = [(i, n) for i, n in enumerate(self.sizes) if n]
        groups.append((None, flat.shape[0] - sum(self.sizes)))
        start, plan = 0, self.plan
        for i, n in groups:
            if n:
                w1, b1, w2t, b2 = plan.rest if i is None else plan.experts[i][:4]
                hidden = plan.act(F.linear(flat[start : start + n], w1, b1))
                torch.addmm(b2, hidden, w2t, out=ys[start : start + n])
                start += n
        return ys.reshape(B, N, D)


def split_floor(
    model: nn.Module, x: dict[str, torch.Tensor], mlp: type[nn.Module] = SplitFloorMLP
) -> nn.Module:
    """A copy of ``model`` whose MoE layers run as ``mlp`` (:class:`SplitFloorMLP` or
    :class:`FusedFloorMLP`) at ``x``'s routing."""
    with torch.no_grad():
        _, info = model.encode(*model.tokenize(x), return_routing=True)
    floor = copy.deepcopy(model).eval()
    for block, stats in zip(floor.blocks, info.stats, strict=True):
        if stats is not None:
            block.mlp = mlp(block.mlp, stats.counts.sum(dim=0).tolist())
    return floor.eval()


#: ``--base`` runs: the paper's width at random init, 64 px scenes (as many tokens per scene as
#: the tiny model's 32 px), 2 experts per modality as in the tiny model; fewer turns (a pass
#: takes ~1.4 s on one core).
BASE_ARGS = ["--model", "mapex_base", "--img-size", "64", "--experts-per-modality", "2",
             "--rounds", "2", "--repeats", "4"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Every router given (default: the three trained checkpoints), one after the other, then
    (unless ``--no-base`` or ``--model``) each router again at base width; a summary table."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--router", nargs="+", default=["modality", "deterministic", "pos_embed"])
    parser.add_argument("--no-base", action="store_true", help="skip the base-width runs")
    known, rest = parser.parse_known_args(argv)
    runs = [(r, ["--router", r, *rest]) for r in known.router]
    if not known.no_base and "--model" not in rest and "-h" not in rest and "--help" not in rest:
        runs += [(f"{r}, base width", ["--router", r, *BASE_ARGS, *rest]) for r in known.router]
    results = [(name, bench(args)) for name, args in runs]
    print("summary: median over turns of the per-turn ratio to the dense twin (IQR)")
    print(f"{'run':<28} {'MAPEX':>19} {'pruned':>19} {'pruned floor':>13}")
    for name, res in results:
        print(
            f"{name:<28} {res['ratio']:6.3f} ({res['lo']:.2f}-{res['hi']:.2f}) "
            f"{res['ratio_pruned']:6.3f} ({res['lo_p']:.2f}-{res['hi_p']:.2f}) "
            f"{res['pruned_floor']:13.3f}"
        )
    missed = [name for name, res in results if not res["ok"]]
    if missed:
        print(f"MoE latency targets missed for: {'; '.join(missed)}")
    return 1 if missed else 0


def bench(argv: list[str] | None = None) -> dict[str, float]:
    """One model: MAPEX, its dense twin, the split floors and the pruned model, side by side.

    Returns:
        The ratios to dense (``ratio``, ``ratio_pruned`` with their quartiles ``lo``/``hi``,
        ``lo_p``/``hi_p``, ``floor``, ``pruned_floor``) and ``ok`` (1.0 if both targets held).
    """
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
    parser.add_argument("--img-size", type=int, default=None, help="registry models only")
    parser.add_argument("--experts-per-modality", type=int, default=None, help="registry only")
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
    overrides = {
        k: v
        for k, v in (
            ("router", args.router),
            ("img_size", args.img_size),
            ("experts_per_modality", args.experts_per_modality),
        )
        if v is not None
    }
    mapex = create_model(args.model, **overrides).eval()
    x = example_inputs(mapex, batch_size=args.batch_size, modalities=[args.modality])
    assert isinstance(x, dict)
    dense_x = x[args.modality]
    dense = dense_twin(mapex, in_chans=dense_x.shape[1])

    macs_mapex = count_macs(mapex, x, cross_check=False).total
    macs_dense = count_macs(dense, dense_x, cross_check=False).total
    floor = split_floor(mapex, x)
    pruned = prune_experts(mapex, [args.modality]).eval()
    pruned_floor = split_floor(pruned, x, FusedFloorMLP)
    macs_pruned = count_macs(pruned, x, cross_check=False).total
    models = (
        ("mapex", mapex, x),
        ("dense", dense, dense_x),
        ("floor", floor, x),
        ("pruned", pruned, x),
        ("pruned floor", pruned_floor, x),
    )
    for _, model, inp in models:
        measure_latency(model, inp, warmup=2, repeats=1, threads=args.threads)
    # One call per model in turn, rounds x repeats times: the calls of one turn run within
    # ~0.2 s of each other (tiny model), so the machine's load swings (seconds long on a shared
    # VM) hit them alike; a ratio is the median over turns of that turn's ratio.
    times: dict[str, list[float]] = {name: [] for name, _, _ in models}
    for _ in range(args.rounds * args.repeats):
        for name, model, inp in models:
            rep = measure_latency(model, inp, warmup=0, repeats=1, threads=args.threads)
            times[name].append(rep.points[0].median_ms)
    median = {name: statistics.median(t) for name, t in times.items()}

    def paired(name: str) -> tuple[float, float, float]:
        """Median and interquartile range over turns of the turn's ratio to dense."""
        r = [a / b for a, b in zip(times[name], times["dense"], strict=True)]
        q1, _, q3 = statistics.quantiles(r, n=4)
        return statistics.median(r), q1, q3

    ratio, lo, hi = paired("mapex")
    ratio_pruned, lo_p, hi_p = paired("pruned")
    ratio_floor, ratio_pruned_floor = paired("floor")[0], paired("pruned floor")[0]
    print(
        f"{args.model} (router {getattr(mapex, 'router_kind', '?')}, width {mapex.embed_dim}, "
        f"{len(mapex.blocks[0].mlp.experts)} routed experts) fed {args.modality!r}, batch "
        f"{args.batch_size}, {args.threads} thread(s), {args.rounds * args.repeats} turns, "
        f"torch {torch.__version__}"
    )
    print(f"  MAPEX : {median['mapex']:8.2f} ms  {macs_mapex / 1e6:9.2f} M MACs")
    print(f"  dense : {median['dense']:8.2f} ms  {macs_dense / 1e6:9.2f} M MACs")
    print(f"  pruned: {median['pruned']:8.2f} ms  {macs_pruned / 1e6:9.2f} M MACs "
          f"(static, to {args.modality!r})")  # fmt: skip
    print(f"  ratio MAPEX / dense = {ratio:.3f} (IQR {lo:.3f}-{hi:.3f}; target <= {args.target})")
    print(f"  ratio pruned MAPEX / dense = {ratio_pruned:.3f} (IQR {lo_p:.3f}-{hi_p:.3f}; "
          f"target <= {args.target_pruned})")  # fmt: skip
    print(
        f"  of which splitting tokens over experts: floor / dense = {ratio_floor:.3f}, "
        f"pruned floor (fused GEMMs, no routing) / dense = {ratio_pruned_floor:.3f}; "
        "routing and dispatch: pruned / pruned floor = "
        f"{median['pruned'] / median['pruned floor']:.3f}"
    )
    ok = ratio <= args.target and ratio_pruned <= args.target_pruned
    return {
        "ratio": ratio, "lo": lo, "hi": hi, "ratio_pruned": ratio_pruned, "lo_p": lo_p,
        "hi_p": hi_p, "floor": ratio_floor, "pruned_floor": ratio_pruned_floor, "ok": float(ok),
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
