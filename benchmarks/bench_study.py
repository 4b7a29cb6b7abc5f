"""Where a study's time goes: wall time per measurement, per pipeline stage and per cell kind.

Runs a sample of a study's cells serially in this process (every ``k``-th cell of the grid, so
cost and eval cells of every model, task and variant kind are represented) with timers around
each stage the cells go through: building base models, applying operator plans (variants),
generating data, extracting features, each probe protocol, fine-tuning, and every registered
measurement (:data:`mapex_analysis.study.measures.MEASUREMENTS`). Prints the breakdown, the
mean time of a cost and of an eval cell, per cell group (kind, model, variant kind, one or
several modalities), the CPU's user and system time (system time is page faulting: see
``data.batch_size``), and the full grid's projected serial time (sampled time per kind x cells
of that kind) and its wall time on ``--workers`` processes (serial / workers: ``make demo``
runs two single-threaded Dask workers; the projection leaves out Dask's start and the
report, ~15-25 s). Exits 1 if the projected wall time misses the target (the issue's 5
minutes)::

    .venv/bin/python benchmarks/bench_study.py [STUDY.yaml] [--cells 120] [--workers 2]
        [--threads 1] [--target 300]

The sample writes into a temporary folder (no cached features are reused), so it measures a
cold run, like ``make demo`` on a fresh clone.
"""

from __future__ import annotations

import argparse
import collections
import functools
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mapex_analysis.study import cells as cells_mod
from mapex_analysis.study.context import StudyContext
from mapex_analysis.study.grid import plan_grid
from mapex_analysis.study.schema import load_study

ROOT = Path(__file__).resolve().parents[1]
SECONDS: collections.Counter[str] = collections.Counter()
CALLS: collections.Counter[str] = collections.Counter()


def timed(label: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its wall time added to ``SECONDS[label]`` (``label(*args)`` if callable)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            key = label(*args, **kwargs) if callable(label) else label
            SECONDS[key] += time.perf_counter() - t0
            CALLS[key] += 1

    return wrapper


def group_of(cell: Any) -> str:
    """A cell's group for the per-group breakdown: kind, model, variant kind and whether it is
    fed one modality or several."""
    inputs = "one modality" if len(cell.modalities) == 1 else f"{len(cell.modalities)} modalities"
    return f"{cell.kind} {cell.model} {cell.variant.kind} ({inputs})"


def instrument() -> None:
    """Wrap the stages of :mod:`mapex_analysis.study.cells` and the study context in timers."""
    rows_function = cells_mod.rows_function
    cells_mod.rows_function = lambda name: timed(f"measure: {name}", rows_function(name))  # type: ignore[assignment]
    cells_mod.extract_features = timed("features", cells_mod.extract_features)  # type: ignore[assignment]
    cells_mod.run_probe = timed(
        lambda protocol, kind, *a, **k: f"probe: {protocol} ({kind})", cells_mod.run_probe
    )  # type: ignore[assignment]
    cells_mod.finetune = timed("probe: finetune", cells_mod.finetune)  # type: ignore[assignment]
    cells_mod.pruning_rows = timed("measure: pruning report", cells_mod.pruning_rows)  # type: ignore[assignment]
    for name, label in (("_build_base", "build base models"), ("_build_variant", "apply operators"),
                        ("_build_dataset", "generate data")):  # fmt: skip
        setattr(StudyContext, name, timed(label, getattr(StudyContext, name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", nargs="?", default=str(ROOT / "studies" / "prune_vs_slim.yaml"))
    parser.add_argument("--cells", type=int, default=120, help="cells to sample (0: all)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of make demo")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker's)")
    parser.add_argument("--target", type=float, default=300.0, help="wall seconds, full grid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    study = load_study(args.study)
    with tempfile.TemporaryDirectory() as tmp:
        study = study.model_copy(update={"output_dir": tmp})
        instrument()
        ctx = StudyContext(study)
        grid = plan_grid(study, None)
        step = max(1, len(grid) // args.cells) if args.cells else 1
        sample = grid[::step]
        per_kind: dict[str, list[float]] = collections.defaultdict(list)
        per_group: dict[str, list[float]] = collections.defaultdict(list)
        t_all = time.perf_counter()
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        for cell in sample:
            t0 = time.perf_counter()
            cells_mod.cell_rows(ctx, cell)
            per_kind[cell.kind].append(time.perf_counter() - t0)
            per_group[group_of(cell)].append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_all
        usage = resource.getrusage(resource.RUSAGE_SELF)

    total_by_kind = collections.Counter(c.kind for c in grid)
    print(f"study {study.name}: {len(grid)} cells ({dict(total_by_kind)}); sampled {len(sample)} "
          f"(every {step}th), {wall:.1f} s, torch threads {torch.get_num_threads()}")  # fmt: skip
    # kernel time is mostly page faults of freshly mapped tensors (data.batch_size too large)
    print(f"CPU: user {usage.ru_utime - usage0.ru_utime:.1f} s, system "
          f"{usage.ru_stime - usage0.ru_stime:.1f} s, "
          f"{usage.ru_minflt - usage0.ru_minflt:,} minor page faults")  # fmt: skip
    print(f"{'stage':32s} {'seconds':>9s} {'share':>7s} {'calls':>6s}")
    for key, sec in SECONDS.most_common():
        print(f"{key:32s} {sec:9.2f} {sec / wall:7.1%} {CALLS[key]:6d}")
    print("(stages nest: 'apply operators' includes building the base model and the pruning")
    print(" calibration data the first time; 'features' includes the forward passes)")
    groups = collections.Counter(group_of(c) for c in grid)
    print(f"{'cell group (kind model variant inputs)':52s} {'cells':>6s} {'mean s':>7s} "
          f"{'projected s':>11s}")  # fmt: skip
    for key, times in sorted(
        per_group.items(), key=lambda kv: -sum(kv[1]) / len(kv[1]) * groups[kv[0]]
    ):
        mean = sum(times) / len(times)
        print(f"{key:52s} {groups[key]:6d} {mean:7.3f} {mean * groups[key]:11.0f}")
    projected = 0.0
    for kind, times in sorted(per_kind.items()):
        mean = sum(times) / len(times)
        projected += mean * total_by_kind[kind]
        print(f"{kind} cell: mean {mean:.3f} s over {len(times)} sampled "
              f"(x {total_by_kind[kind]} cells = {mean * total_by_kind[kind]:.0f} s)")  # fmt: skip
    wall_n = projected / args.workers
    print(f"projected full grid: serial {projected:.0f} s, on {args.workers} workers "
          f"{wall_n:.0f} s (target {args.target:.0f} s)")  # fmt: skip
    if wall_n > args.target:
        print(f"MISSED: projected {wall_n:.0f} s on {args.workers} workers > target "
              f"{args.target:.0f} s")  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
