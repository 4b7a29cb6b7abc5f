"""The study runner: run every unfinished cell of the grid, then write the results table.

The grid and cell ids live in :mod:`.grid`, one cell's computation in :mod:`.cells`, the
measurements in :mod:`.measures`, provenance in :mod:`.provenance`. This module only
orchestrates: it removes results that no longer match the study, skips finished cells, runs
the rest serially or on a Dask cluster (:mod:`.execution`), and unions the cell files.

A finished cell writes its rows atomically (:mod:`.results`); a rerun skips it, so a killed run
resumes without recomputing or duplicating anything. Frozen features are cached on disk by
:func:`mapex_analysis.eval.extract_features`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mapex_analysis.device import check_device_spec
from mapex_analysis.models.contract import modalities_of
from mapex_analysis.study.cells import cell_rows, feature_cache_key
from mapex_analysis.study.context import StudyContext
from mapex_analysis.study.execution import cluster_kind, reuse_freed_memory, run_on_dask
from mapex_analysis.study.grid import (
    Cell,
    Variant,
    collapsed_widths,
    plan_grid,
    slim_key_of,
    sorted_modalities,
    takes_subsets,
)
from mapex_analysis.study.provenance import environment, save_config
from mapex_analysis.study.results import (
    cell_file_problem,
    cell_path,
    finished_cells,
    remove_partial_files,
    write_cell,
    write_table,
)
from mapex_analysis.study.schema import Study

__all__ = [
    "COLLAPSED_FILE",
    "Cell",
    "RunSummary",
    "Variant",
    "environment",
    "execute_cell",
    "feature_cache_key",
    "iter_pending",
    "plan_grid",
    "run_study",
]

logger = logging.getLogger(__name__)

#: File in the study folder naming the slimming widths that were not run because a wider width
#: gives the same model (:func:`mapex_analysis.study.grid.collapsed_widths`).
COLLAPSED_FILE = "collapsed_widths.json"

#: ``progress(done, total, cell, skipped)`` after every cell.
ProgressFn = Callable[[int, int, Cell, bool], None]


@dataclass
class RunSummary:
    """What a run did.

    Attributes:
        study_dir: Output folder.
        cells: Cells in the grid.
        ran: Cells computed by this run.
        skipped: Cells already finished before this run.
        rows: Rows in the final table.
        seconds: Wall-clock time of this run.
    """

    study_dir: Path
    cells: int
    ran: int
    skipped: int
    rows: int
    seconds: float


def iter_pending(study: Study, cells: list[Cell]) -> Iterator[tuple[Cell, str, bool]]:
    """``(cell, cell id, already finished)`` for every cell.

    Args:
        study: The study.
        cells: From :func:`plan_grid`.

    Yields:
        One tuple per cell, in grid order.
    """
    done = finished_cells(study.study_dir)
    for cell in cells:
        cid = cell.cell_id(study)
        yield cell, cid, cid in done


def _needs_gpu(study: Study) -> bool:
    """Whether every cell takes one ``GPU`` worker resource (local GPUs, or GPU batch jobs)."""
    ex = study.execution
    return ex.gpus > 0 or (ex.cluster in ("slurm", "pbs") and ex.resources.gpus > 0)


#: Worker-local contexts (models, variants, data), one per study, reused by the cells a worker
#: process runs (``execute_cell``).
_WORKER_CONTEXTS: dict[str, StudyContext] = {}


def execute_cell(study: Study, cell: Cell, cell_id: str) -> bool:
    """Compute one cell and write its file, in whatever process runs it (a Dask worker).

    Models, variants and data are cached per process and study. A cell whose file another
    worker or run already wrote whole is not computed again.

    Args:
        study: The study.
        cell: The cell.
        cell_id: Its id (``cell.cell_id(study)``).

    Returns:
        Whether this call computed the cell.
    """
    path = cell_path(study.study_dir, cell_id)
    if path.is_file() and cell_file_problem(path) is None:
        return False
    torch.set_num_threads(study.execution.threads_per_worker)
    key = study.model_dump_json()
    ctx = _WORKER_CONTEXTS.get(key)
    if ctx is None:
        reuse_freed_memory()  # whatever MALLOC_* variables the worker was started with
        _WORKER_CONTEXTS.clear()  # one study at a time per worker
        ctx = _WORKER_CONTEXTS[key] = StudyContext(study)
    _compute(ctx, cell, cell_id)
    return True


def _compute(ctx: StudyContext, cell: Cell, cell_id: str) -> None:
    """Run one cell in ``ctx`` and write its file (serial loop and Dask workers alike)."""
    t_cell = time.perf_counter()
    rows = cell_rows(ctx, cell)
    write_cell(ctx.study_dir, cell_id, rows)
    logger.info("%s: %d rows in %.2f s (pid %d)", cell.describe(), len(rows),
                time.perf_counter() - t_cell, os.getpid())  # fmt: skip


def run_study(
    study: Study,
    *,
    fresh: bool = False,
    progress: ProgressFn | None = None,
    cluster: str | None = None,
    device: str | None = None,
) -> RunSummary:
    """Run every unfinished cell of a study and write the results table.

    Cell files that do not belong to the current grid (an edited study, re-pretrained
    checkpoint weights) are removed first, so the table always describes this config.

    Args:
        study: The validated study.
        fresh: Delete the study's previous cell results (and feature cache) first.
        progress: Called after every cell with ``(done, total, cell, skipped)``.
        cluster: Where the cells run (overrides ``study.execution.cluster``): ``serial``,
            ``local[:N]``, ``slurm``, ``pbs`` or ``tcp://host:port`` (see
            :mod:`mapex_analysis.study.execution`).
        device: Where models run (overrides ``study.device``): ``auto``, ``cpu``, ``cuda``,
            ``cuda:N``.

    Returns:
        A :class:`RunSummary`.

    Raises:
        ValueError: for a malformed cluster string.
        DeviceError: for a malformed device or one this machine does not have.
    """
    if cluster is not None:
        cluster_kind(cluster)  # a clear error before any work
        study = study.model_copy(
            update={"execution": study.execution.model_copy(update={"cluster": cluster})}
        )
    if device is not None:
        study = study.model_copy(update={"device": check_device_spec(device)})

    t0 = time.perf_counter()
    study_dir = study.study_dir
    if fresh:
        for sub in ("cells", "features"):
            shutil.rmtree(study_dir / sub, ignore_errors=True)
    ctx = StudyContext(study)  # an unavailable device fails here, before anything is written
    study_dir.mkdir(parents=True, exist_ok=True)
    save_config(study, study_dir, device=ctx.device_name)
    if study.data.is_real:  # a missing root, split or file fails here, before any cell runs
        for split in ("train", "test"):
            ctx.dataset(study.tasks[0], study.seeds[0], split)
    keys = {label: slim_key_of(ctx.base(label)) for label in study.models}
    cells = plan_grid(study, {label: sorted_modalities(modalities_of(ctx.base(label)))
                              for label in study.models},
                      {label: takes_subsets(ctx.base(label)) for label in study.models},
                      keys)  # fmt: skip
    collapsed = collapsed_widths(study, keys)
    (study_dir / COLLAPSED_FILE).write_text(json.dumps(collapsed, indent=1, sort_keys=True))
    for label, by_plan in collapsed.items():
        for plan, dropped in by_plan.items():
            logger.info("%s slim %s: widths %s give the same model as a wider one; not run",
                        label, plan, ", ".join(dropped))  # fmt: skip
    current = {cell.cell_id(study) for cell in cells}
    stale = finished_cells(study_dir) - current
    for cid in sorted(stale):  # cells of an earlier config or earlier checkpoint weights
        cell_path(study_dir, cid).unlink(missing_ok=True)
    if stale:
        logger.warning("removed %d cell results that no longer match the study", len(stale))
    ran = skipped = 0
    if study.execution.cluster != "serial":
        pending = []
        for cell, cid, done in iter_pending(study, cells):
            if done:
                skipped += 1
                if progress is not None:
                    progress(skipped, len(cells), cell, True)
            else:
                pending.append((cell, cid))
        ran = run_on_dask(study, pending, execute_cell, total=len(cells), done_before=skipped,
                          progress=progress, needs_gpu=_needs_gpu(study))  # fmt: skip
    else:
        for i, (cell, cid, done) in enumerate(iter_pending(study, cells)):
            if done:
                skipped += 1
            else:
                _compute(ctx, cell, cid)
                ran += 1
            if progress is not None:
                progress(i + 1, len(cells), cell, done)
    remove_partial_files(study_dir)  # temp files of writers killed mid-write
    table = write_table(study_dir)
    return RunSummary(study_dir, len(cells), ran, skipped, len(table), time.perf_counter() - t0)
