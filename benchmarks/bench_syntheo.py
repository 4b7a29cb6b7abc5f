"""SynthEO generation speed: scenes per second for 32x32 scenes with all six modalities.

Times :func:`mapex_analysis.data.syntheo.generate` (no disk cache, ``--workers`` threads) for
each task, median of ``--repeats`` runs after one warm-up, and prints wall-clock scenes/s and
scenes per CPU-second (process time summed over threads; less sensitive to other jobs sharing
the machine). The target on the project's 2-core CPU is >= 2,000 scenes/s wall-clock; the
script exits with status 1 below ``--target``::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_syntheo.py [--n 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from mapex_analysis.data.syntheo import SceneConfig, generate
from mapex_analysis.data.tasks import TASKS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="scenes per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--tasks", default="landcover,flood,wildfire,segmentation")
    parser.add_argument("--workers", type=int, default=2, help="generator threads")
    parser.add_argument("--target", type=float, default=2000.0, help="scenes/s to pass")
    args = parser.parse_args()

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"SynthEO {args.img_size}x{args.img_size}, 6 modalities (13 channels), "
        f"n={args.n}, repeats={args.repeats}, workers={args.workers}, "
        f"OMP_NUM_THREADS={threads}, cpus={os.cpu_count()}"
    )
    worst = float("inf")
    for task in args.tasks.split(","):
        clouds = TASKS[task].clouds
        cfg = SceneConfig(task, "train", 0, args.n, args.img_size, clouds)
        generate(SceneConfig(task, "train", 0, 512, args.img_size, clouds))  # warm-up
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            generate(cfg, workers=args.workers)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        rate = args.n / statistics.median(times)
        cpu_rate = args.n / statistics.median(cpu)
        worst = min(worst, rate)
        print(
            f"  {task:<14} clouds={clouds:.1f}  {rate:8,.0f} scenes/s  "
            f"{cpu_rate:8,.0f} scenes/CPU-s  "
            f"(median {statistics.median(times) * 1e3:.0f} ms for {args.n} scenes)"
        )
    ok = worst >= args.target
    print(
        f"slowest task: {worst:,.0f} scenes/s; target {args.target:,.0f}: "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
