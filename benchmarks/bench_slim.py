"""Realised speedup of post-hoc width slimming vs its MACs reduction.

A timm ViT-S/16 (random init, 224 px, 3 bands) is slimmed with
:func:`mapex_analysis.slim_width` to each width ``s`` (default 1.0, 0.5, 0.25, 0.1) and all
variants are timed side by side in one process, in alternating rounds (so drifts in machine
load hit every width alike), at batch 32 on CPU. MACs are counted with
:func:`mapex_analysis.measure.macs.count_macs` on the same batch (attention matmuls and the
unslimmed patch embedding included, as in the slimmability paper).

For each width it prints the MACs ratio ``MACs(s) / MACs(1)``, the realised speedup
``latency(1) / latency(s)`` (median over rounds of each round's ratio; the range of the
resulting efficiency over rounds is printed too), the MACs reduction ``MACs(1) / MACs(s)``
and their quotient, the efficiency ``speedup / MACs reduction`` (1.0 = the full saving is realised). It exits with
status 1 if the efficiency is below its target: 0.9 for every ``s >= 0.25``, 0.7 below. A
table then shows where the time goes: one profiled pass per width, split into operator groups
(linear layers, the attention kernel, the patch-embedding convolution, layer norms and residual
adds at the full width ``d``, GELU, the rest), each with how many times less it takes than at
``s = 1``::

    .venv/bin/python benchmarks/bench_slim.py [--threads 1] [--rounds 5] [--batch 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import timm
import torch

from mapex_analysis.measure.latency import measure_latency
from mapex_analysis.measure.macs import count_macs
from mapex_analysis.memory import reuse_freed_memory
from mapex_analysis.ops import slim_width

#: Operator groups of the time breakdown (torch profiler names, self CPU time), in print order.
GROUPS = {
    "linear": ("aten::addmm", "aten::mm", "aten::copy_"),  # copy_: the bias broadcast of addmm
    "attention": ("scaled_dot_product",),
    "patch conv": ("convolution",),
    "norm+add": ("aten::native_layer_norm", "aten::add"),
    "gelu": ("aten::gelu",),
}


def breakdown(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Milliseconds of one forward pass per operator group (profiler self CPU time; ``other``
    is the rest, Python included), measured on a warm pass."""
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            model(x)
            wall = (time.perf_counter() - start) * 1e3
    out = dict.fromkeys(GROUPS, 0.0)
    for event in prof.key_averages():
        for group, names in GROUPS.items():
            if any(n in event.key for n in names):
                out[group] += event.self_cpu_time_total / 1e3
                break
    out["other"] = max(wall - sum(out.values()), 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7, help="timed repeats per width")
    parser.add_argument("--target", type=float, default=0.9, help="efficiency, s >= 0.25")
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip the per-operator time breakdown"
    )
    parser.add_argument("--target-small", type=float, default=0.7, help="efficiency, s < 0.25")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    base = timm.create_model(
        args.model, pretrained=False, img_size=args.img_size, num_classes=0
    ).eval()
    widths = sorted(set(args.widths) | {1.0}, reverse=True)
    models = {s: (base if s == 1.0 else slim_width(base, s)) for s in widths}
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)

    macs = {
        s: count_macs(m, x[:1], cross_check=False).total * args.batch for s, m in models.items()
    }
    params = {s: sum(p.numel() for p in m.parameters()) for s, m in models.items()}
    for m in models.values():
        measure_latency(m, x, warmup=args.warmup, repeats=1, threads=args.threads)
    times: dict[float, list[float]] = {s: [] for s in widths}
    for _ in range(args.rounds):
        for s, m in models.items():
            rep = measure_latency(m, x, warmup=0, repeats=1, threads=args.threads)
            times[s].append(rep.points[0].median_ms)
    median = {s: statistics.median(t) for s, t in times.items()}
    # each round timed every width back to back: the speedup is the median over rounds of that
    # round's ratio, so a load swing between rounds cancels
    per_round = {s: [a / b for a, b in zip(times[1.0], t, strict=True)] for s, t in times.items()}

    print(
        f"{args.model} at {args.img_size} px, batch {args.batch}, CPU, {args.threads} thread(s), "
        f"median of {args.rounds} alternating rounds; torch {torch.__version__}"
    )
    header = (
        f"{'s':>6} {'params':>11} {'G MACs':>9} {'MACs ratio':>10} {'latency ms':>11} "
        f"{'speedup':>8} {'MACs red.':>9} {'efficiency':>10} {'over rounds':>11}"
    )
    print(header)
    failed = []
    for s in widths:
        speedup = statistics.median(per_round[s])
        reduction = macs[1.0] / macs[s]
        eff = speedup / reduction
        lo, hi = min(per_round[s]) / reduction, max(per_round[s]) / reduction
        print(
            f"{s:>6g} {params[s]:>11,} {macs[s] / 1e9:>9.2f} {macs[s] / macs[1.0]:>10.4f} "
            f"{median[s]:>11.1f} {speedup:>8.2f} {reduction:>9.2f} {eff:>10.2f} "
            f"{lo:>5.2f}-{hi:.2f}"
        )
        if eff < (args.target if s >= 0.25 else args.target_small):
            failed.append(s)
    if not args.no_breakdown:
        # where the time goes: each operator group's ms per pass and how many times faster it
        # is than at s = 1 (compare with the MACs reduction: fixed-width groups stay at 1x)
        parts = {s: breakdown(m, x) for s, m in models.items()}
        names = [*GROUPS, "other"]
        print("time per pass by operator group, ms (and how many times less than at s = 1):")
        print(f"{'s':>6} " + " ".join(f"{n:>17}" for n in names))
        for s in widths:
            cells = [
                f"{parts[s][n]:8.1f} ({parts[1.0][n] / max(parts[s][n], 1e-9):5.1f}x)"
                for n in names
            ]
            print(f"{s:>6g} " + " ".join(f"{c:>17}" for c in cells))
    if failed:
        print(f"MISSED: efficiency below target ({args.target} for s >= 0.25, "
              f"{args.target_small} below) at s = {failed}")  # fmt: skip
        return 1
    print(f"efficiency >= {args.target} for s >= 0.25 and >= {args.target_small} below")
    return 0


if __name__ == "__main__":
    sys.exit(main())
