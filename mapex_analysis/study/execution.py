"""Where a study's cells run: one process, or tasks of a Dask cluster.

The cells of a study are independent and every cell writes its rows to one file named by its
content-addressed id, through a temporary file and an atomic rename
(:mod:`mapex_analysis.study.results`). So the natural engine for more than one process is an
existing scheduler, **dask.distributed**, not a home-made one:

* ``local`` / ``local:N``: a ``LocalCluster`` of ``N`` worker processes on this machine (one
  thread each by default; with ``execution.gpus`` one GPU per worker, resource ``GPU=1``);
* ``slurm`` / ``pbs``: ``dask-jobqueue`` starts one batch job per worker with the resources of
  ``execution.resources`` (:func:`job_script` shows the script it submits);
* ``tcp://host:port``: an already running scheduler.

Each pending cell becomes one task keyed by its cell id (so the scheduler never runs the same
cell twice at once); a worker builds and caches models, operator variants and data locally
(one :class:`~mapex_analysis.study.runner` context per study per worker process) and writes the
cell file itself. The cell files and the feature cache therefore live in the study folder,
which every worker must see (a shared filesystem on a cluster). A worker that dies mid-cell
leaves at most a temporary file (ignored); the scheduler reruns its task on another worker.
Two runs racing on one cell both write the same rows to the same file name: one copy remains.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dask

from mapex_analysis.memory import reuse_freed_memory
from mapex_analysis.study.schema import ExecutionConfig, Study, cluster_kind

__all__ = [
    "cluster_kind",
    "dask_client",
    "gpu_per_worker",
    "job_script",
    "local_worker_environ",
    "reuse_freed_memory",
    "run_on_dask",
]

logger = logging.getLogger(__name__)

#: ``execute(study, cell, cell_id) -> ran`` (a module-level function, so Dask pickles it by name).
CellFn = Callable[[Study, Any, str], bool]
#: ``progress(done, total, cell, skipped)``.
ProgressFn = Callable[[int, int, Any, bool], None]


def _jobqueue_kwargs(execution: ExecutionConfig, kind: str) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue``'s cluster and job classes for one worker per job."""
    r = execution.resources
    kwargs: dict[str, Any] = dict(
        cores=1,  # one Dask thread: a worker runs one cell at a time; torch uses the job's cores
        memory=r.memory,
        processes=1,  # one worker process per job: it builds and caches the models
        walltime=r.walltime,
        job_extra_directives=list(r.job_extra),
        job_script_prologue=[f"export OMP_NUM_THREADS={execution.threads_per_worker}", *r.prologue],
        worker_extra_args=["--resources", f"GPU={r.gpus}"] if r.gpus else [],
    )
    if r.queue:
        kwargs["queue"] = r.queue
    if r.account:
        kwargs["account"] = r.account
    if kind == "slurm":
        kwargs["job_cpu"] = r.cores
        kwargs["job_mem"] = r.memory
        if r.gpus:
            kwargs["job_extra_directives"].append(f"--gres=gpu:{r.gpus}")
    if kind == "pbs":
        gpus = f":ngpus={r.gpus}" if r.gpus else ""
        kwargs["resource_spec"] = f"select=1:ncpus={r.cores}{gpus}:mem={r.memory}"
    return kwargs


def job_script(
    study: Study, kind: str | None = None, scheduler: str = "tcp://SCHEDULER:8786"
) -> str:
    """The batch script ``dask-jobqueue`` submits for one worker of this study.

    Args:
        study: The study (its ``execution.resources``).
        kind: ``slurm`` or ``pbs`` (default: the study's ``execution.cluster``).
        scheduler: Scheduler address written into the script (the real one is known only
            once the cluster starts).

    Returns:
        The job script text.

    Raises:
        ValueError: for a cluster kind without batch jobs.
        ModuleNotFoundError: without ``dask-jobqueue`` (``pip install dask-jobqueue``).
    """
    kind = kind or study.execution.cluster
    if kind not in ("slurm", "pbs"):
        raise ValueError(f"job scripts exist for slurm and pbs clusters, not {kind!r}")
    from dask_jobqueue.pbs import PBSJob
    from dask_jobqueue.slurm import SLURMJob

    job_cls = SLURMJob if kind == "slurm" else PBSJob
    job = job_cls(scheduler=scheduler, name=f"mapex-{study.name}", job_name=f"mapex-{study.name}",
                  **_jobqueue_kwargs(study.execution, kind))  # fmt: skip
    return str(job.job_script())


def gpu_per_worker(gpus: int) -> Any:
    """A Dask worker plugin: worker ``i`` of a local cluster sees GPU ``i mod gpus`` only.

    It sets ``CUDA_VISIBLE_DEVICES`` before the worker's first CUDA call (workers start without
    touching CUDA; models are built inside the first task). A restarted worker keeps its name,
    so it gets the same GPU back.

    Args:
        gpus: GPUs of this machine.

    Returns:
        A ``distributed.WorkerPlugin``.
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class GpuPerWorker(WorkerPlugin):
        name = "mapex-gpu-per-worker"

        def setup(self, worker: Any) -> None:
            try:
                index = int(worker.name)
            except (TypeError, ValueError):
                index = sum(map(ord, str(worker.name)))
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)

    return GpuPerWorker()


def local_worker_environ() -> dict[str, Any]:
    """The environment a local cluster's nanny sets before it spawns a worker: Dask's
    (``distributed.nanny.pre-spawn-environ``) without ``MALLOC_TRIM_THRESHOLD_``.

    Dask sets that threshold to 64 KiB so that workers hand freed memory back to the OS at
    once. A cell frees and re-allocates activations of several MB per layer and batch, so
    with it every tensor is mapped and page-faulted afresh: in the default study 29 % of a
    two-worker run's CPU time was kernel time (a six-modality feature pass 5.8 s instead of
    3.8 s, 1.8 M instead of ~0 page faults). Without it glibc keeps its dynamic thresholds and
    reuses the memory (the worker's peak resident memory is unchanged: the same tensors).
    """
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


@contextmanager
def dask_client(execution: ExecutionConfig) -> Iterator[Any]:
    """A ``distributed.Client`` for ``execution.cluster`` (started and closed here).

    Args:
        execution: The study's execution settings (cluster already overridden by the CLI).

    Yields:
        The client.

    Raises:
        ValueError: for ``serial`` or a malformed cluster string.
        ModuleNotFoundError: when ``distributed`` (or, for slurm/pbs, ``dask-jobqueue``) is
            not installed, with the package to install.
    """
    kind, workers = cluster_kind(execution.cluster)
    if kind == "serial":
        raise ValueError("a serial study runs without a Dask client")
    try:
        from distributed import Client, LocalCluster
    except ModuleNotFoundError as err:  # pragma: no cover - distributed is a core dependency
        raise ModuleNotFoundError(
            f"--cluster {execution.cluster} needs dask.distributed: pip install distributed"
        ) from err
    cluster: Any = None
    env = {"OMP_NUM_THREADS": str(execution.threads_per_worker)}
    if kind == "local":
        with dask.config.set({"distributed.nanny.pre-spawn-environ": local_worker_environ()}):
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,  # one cell at a time per worker process
                processes=True,
                dashboard_address=None,
                resources={"GPU": 1} if execution.gpus else None,
                env=env,
            )
    elif kind in ("slurm", "pbs"):
        try:
            import dask_jobqueue
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"--cluster {kind} needs dask-jobqueue: pip install 'mapex-analysis[cluster]'"
            ) from err
        cls = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
        cluster = cls(**_jobqueue_kwargs(execution, kind))
        cluster.scale(jobs=execution.resources.jobs)
    client = Client(cluster if cluster is not None else execution.cluster)
    try:
        if kind == "local" and execution.gpus:
            client.register_plugin(gpu_per_worker(execution.gpus))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_on_dask(
    study: Study,
    pending: Sequence[tuple[Any, str]],
    execute: CellFn,
    *,
    total: int,
    done_before: int = 0,
    progress: ProgressFn | None = None,
    needs_gpu: bool = False,
) -> int:
    """Run ``pending`` cells as Dask tasks on the study's cluster.

    Args:
        study: The study (pickled to the workers; ``execution`` says where).
        pending: ``(cell, cell id)`` of the cells to compute.
        execute: Module-level ``execute(study, cell, cell_id) -> ran`` run by a worker.
        total: Cells in the grid (for progress).
        done_before: Cells already finished (for progress).
        progress: Called as tasks finish, from the scheduler's task states.
        needs_gpu: Every task takes one ``GPU`` worker resource.

    Returns:
        Cells computed by this run (cells another run wrote first are not counted).
    """
    from distributed import as_completed

    if not pending:
        return 0
    t0 = time.perf_counter()
    ran = 0
    with dask_client(study.execution) as client:
        resources = {"GPU": 1} if needs_gpu else None
        futures = {
            client.submit(execute, study, cell, cid, key=f"cell-{cid}", pure=False,
                          resources=resources, retries=2): cell
            for cell, cid in pending
        }  # fmt: skip
        n = done_before
        for fut in as_completed(list(futures)):
            ran += bool(fut.result())  # re-raises a cell's error with its traceback
            n += 1
            if progress is not None:
                progress(n, total, futures[fut], False)
    logger.info("%d cells on %s in %.1f s", ran, study.execution.cluster, time.perf_counter() - t0)
    return ran
