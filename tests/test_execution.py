"""Scale-out: the smoke study on a local Dask cluster, killed workers and clients, two runs
racing on one folder, corrupt cell files, batch job scripts, SLURM-style DDP pretraining."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from fixtures.net import free_port
from fixtures.studies import write_smoke

from mapex_analysis.study.execution import cluster_kind, dask_client, job_script
from mapex_analysis.study.results import cell_file_problem, finished_cells, read_results
from mapex_analysis.study.runner import plan_grid, run_study
from mapex_analysis.study.schema import ExecutionConfig, StudyError, load_study, parse_study

ROOT = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).with_name("mapex-study"))]


def _smoke(tmp_path: Path, **execution: object) -> Path:
    return write_smoke(tmp_path, **({"execution": execution} if execution else {}))


def _rows(folder: Path) -> pd.DataFrame:
    return read_results(folder).reset_index(drop=True)


@pytest.fixture(scope="module")
def serial(smoke_serial_one_thread: pd.DataFrame) -> pd.DataFrame:
    """The smoke study run serially with one torch thread (what each Dask worker uses)."""
    return smoke_serial_one_thread


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _wait_for_cells(folder: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while len(finished_cells(folder)) < n:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        assert time.time() - t0 < timeout, f"fewer than {n} cells after {timeout} s"
        time.sleep(0.2)


def test_cluster_strings() -> None:
    assert cluster_kind("serial") == ("serial", 1)
    assert cluster_kind("local") == ("local", 2)
    assert cluster_kind("local:3") == ("local", 3)
    assert cluster_kind("slurm") == ("slurm", 0)
    assert cluster_kind("tcp://10.0.0.5:8786") == ("address", 0)
    with pytest.raises(ValueError, match=r"cluster 'local:0' is not one of serial, local"):
        cluster_kind("local:0")
    doc = {"name": "x", "models": {"m": {"source": "mapex_test"}}, "tasks": ["landcover"]}
    with pytest.raises(StudyError, match=r"execution.cluster: cluster 'k8s' is not one of"):
        parse_study(doc | {"execution": {"cluster": "k8s"}})
    with pytest.raises(StudyError, match=r"execution.resources.gpus"):
        parse_study(doc | {"execution": {"cluster": "slurm", "resources": {"gpus": -1}}})


def test_slurm_and_pbs_job_scripts_of_the_example_study() -> None:
    study = load_study(ROOT / "studies" / "cluster" / "slurm.yaml")
    script = job_script(study)
    for line in (
        "#SBATCH -J mapex-prune_vs_slim_slurm",
        "#SBATCH -p gpu",
        "#SBATCH -A my_project",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH -t 04:00:00",
        "#SBATCH --constraint=a100",
        "#SBATCH --gres=gpu:1",
        "export OMP_NUM_THREADS=8",
        "module load cuda/12.4",
    ):
        assert line in script.splitlines(), (line, script)
    worker = script.strip().splitlines()[-1]
    assert "-m distributed.cli.dask_worker tcp://SCHEDULER:8786" in worker
    assert "--nthreads 1" in worker and "--resources GPU=1" in worker and "--nanny" in worker
    pbs = job_script(study, "pbs")
    assert "#PBS -l select=1:ncpus=8:ngpus=1:mem=32GB" in pbs.splitlines()
    assert "#PBS -l walltime=04:00:00" in pbs.splitlines()
    with pytest.raises(
        ValueError, match="job scripts exist for slurm and pbs clusters, not 'local'"
    ):
        job_script(study, "local")


def test_local_cluster_table_equals_serial(tmp_path: Path, serial: pd.DataFrame) -> None:
    study = load_study(_smoke(tmp_path))
    summary = run_study(study, cluster="local:2")
    assert summary.ran == summary.cells == len(plan_grid(study))
    pd.testing.assert_frame_equal(_rows(study.study_dir), serial)
    # a rerun on the cluster finds everything finished
    again = run_study(study, cluster="local:2")
    assert again.ran == 0 and again.skipped == summary.cells


def test_killed_worker_and_killed_client_lose_nothing(tmp_path: Path, serial: pd.DataFrame) -> None:
    # one cluster run, two failures: a worker killed mid-study (the client carries on and the
    # lost cell is rerun), then the client with its scheduler and workers (a rerun resumes)
    path = _smoke(tmp_path)
    folder = tmp_path / "reports" / "smoke"
    proc = subprocess.Popen([*CLI, "run", "--cluster", "local:2", str(path)], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        _wait_for_cells(folder, 3, proc)
        workers = [
            c for c in psutil.Process(proc.pid).children(recursive=True)
            if any("spawn_main" in part for part in c.cmdline())
        ]  # fmt: skip
        assert len(workers) >= 2, [c.cmdline() for c in workers]
        os.kill(workers[0].pid, signal.SIGKILL)  # mid-study, most likely mid-cell
        at_kill = len(finished_cells(folder))
        _wait_for_cells(folder, at_kill + 4, proc)  # the client survived its worker
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client, its scheduler and its workers
        proc.wait(timeout=60)
    done = len(finished_cells(folder))
    total = len(plan_grid(load_study(path)))
    assert at_kill + 4 <= done < total
    rerun = subprocess.run([*CLI, "run", str(path)], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    flat = " ".join(rerun.stdout.split())
    assert f"{total} cells: {total - done} run, {done} already finished" in flat
    cells = list((folder / "cells").iterdir())
    assert not [c for c in cells if c.name.startswith(".")]  # dead writers' partial files swept
    assert len(cells) == total  # one file per cell
    pd.testing.assert_frame_equal(_rows(folder), serial)


def test_two_runs_at_once_write_one_copy_of_every_cell(
    tmp_path: Path, serial: pd.DataFrame
) -> None:
    path = _smoke(tmp_path)
    folder = tmp_path / "reports" / "smoke"
    procs = [
        subprocess.Popen([*CLI, "run", str(path)], cwd=tmp_path, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    cells = sorted(p.name for p in (folder / "cells").iterdir())
    assert len(cells) == len(set(cells)) == len(plan_grid(load_study(path)))
    assert not [c for c in cells if c.startswith(".")]
    table = _rows(folder)
    assert not table.duplicated().any()
    pd.testing.assert_frame_equal(table, serial)


def test_corrupt_cell_file_is_named_and_recomputed(
    tmp_path: Path, serial: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    study = load_study(_smoke(tmp_path))
    folder = study.study_dir
    # a finished run's cells, then one truncated (a partial copy) and one emptied (a full disk)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(study)
        files = sorted((folder / "cells").glob("*.parquet"))
        bad, empty = files[0], files[1]
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        empty.write_bytes(b"")
        assert "magic bytes" in str(cell_file_problem(bad))
        assert "0 bytes" in str(cell_file_problem(empty))
        with caplog.at_level(logging.WARNING, logger="mapex_analysis.study.results"):
            table = read_results(folder)  # the report path: skipped, named, no traceback
        assert f"corrupt cell file {bad}" in caplog.text and "skipped" in caplog.text
        assert len(table) < len(serial)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mapex_analysis.study.results"):
            summary = run_study(study)
    finally:
        torch.set_num_threads(threads)
    assert f"corrupt cell file {empty}" in caplog.text and "recomputed" in caplog.text
    assert summary.ran == 2 and summary.skipped == summary.cells - 2
    pd.testing.assert_frame_equal(_rows(folder), serial)


def test_cluster_errors_are_clear(tmp_path: Path) -> None:
    path = _smoke(tmp_path)
    res = subprocess.run([*CLI, "run", "--cluster", "local:x", str(path)], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2
    assert "cluster 'local:x' is not one of serial, local, local:N, slurm, pbs" in " ".join(
        res.stdout.split()
    )
    assert "Traceback" not in res.stdout + res.stderr


def test_slurm_environment_ddp_ranks_hold_identical_weights(tmp_path: Path) -> None:
    """Two processes started as ``srun -n 2`` would start them (SLURM_* variables per rank):
    Lightning's SLURM environment gives the ranks, gloo DDP keeps the weights identical."""
    from mapex_analysis.data import SynthEO

    cfg = {
        "name": "t", "model": "mapex_test",
        "data": {"n": 32, "img_size": 16, "cache_dir": str(tmp_path / "cache")},
        "batch_size": 8, "max_steps": 3, "warmup_steps": 1,
        "output_dir": str(tmp_path / "out"), "run_dir": str(tmp_path / "runs"),
        "accelerator": "cpu", "devices": 2,
    }  # fmt: skip
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import lightning as L, torch
        from mapex_analysis.train.pretrain import PretrainConfig, pretrain

        class Dump(L.Callback):
            def on_train_end(self, trainer, module):
                sd = {{k: v.detach().clone() for k, v in module.objective.state_dict().items()}}
                torch.save(sd, f"{tmp_path}/end_rank{{trainer.global_rank}}.pt")
                env = type(trainer.strategy.cluster_environment).__name__
                print("rank", trainer.global_rank, "world", trainer.world_size, "env", env)

        if __name__ == "__main__":
            res = pretrain(PretrainConfig.model_validate({cfg!r}), callbacks=[Dump()],
                           progress_bar=False)
            print("steps", res.steps, "backend", torch.distributed.get_backend())
    """))  # fmt: skip
    SynthEO("pretrain", n=32, img_size=16, cache_dir=tmp_path / "cache")
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(_env(), SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_JOB_ID="4242",
                   SLURM_JOB_NAME="mapex-pretrain", SLURM_NODELIST="localhost",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
            env.pop(k, None)
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert "rank 0 world 2 env SLURMEnvironment" in outs[0]
    assert "rank 1 world 2 env SLURMEnvironment" in outs[1]
    assert "steps 3 backend gloo" in outs[0]
    ends = [torch.load(tmp_path / f"end_rank{r}.pt") for r in (0, 1)]
    for k in ends[0]:
        assert torch.equal(ends[0][k], ends[1][k]), k
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- global batch: 16" in card.splitlines()  # 8 per process x 2 ranks
    assert "SLURMEnvironment" in card


def test_serial_reference_is_not_empty(serial: pd.DataFrame) -> None:
    # the equality checks above compare against this table: it must hold the whole grid
    assert serial["cell"].nunique() == 42 and len(serial) > 500


def _worker_environ() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}


def test_local_workers_keep_the_allocators_own_trim_threshold() -> None:
    """Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536, which made every freed activation go
    back to the OS and fault in again (29 % kernel time); local workers start without it."""
    import dask
    import distributed  # noqa: F401  (registers the distributed.* config)

    assert dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"]
    with dask_client(ExecutionConfig(cluster="local:1", threads_per_worker=1)) as client:
        (env,) = client.run(_worker_environ).values()
    assert env == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}


_FAULTS = """
import resource, sys, torch
from mapex_analysis.study.execution import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
torch.ones(2 << 20).sum()  # warm up: first touch of the heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    torch.ones(2 << 20).sum()  # 8 MiB allocated, touched and freed
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_workers_reuse_freed_memory_whatever_their_malloc_environment() -> None:
    """With MALLOC_TRIM_THRESHOLD_ set (as Dask's nanny sets it, also on SLURM / PBS nodes),
    every freed 8 MiB tensor is page-faulted again when re-allocated; after
    reuse_freed_memory() (each worker calls it before its first cell) it is reused."""
    env = dict(_env(), MALLOC_TRIM_THRESHOLD_="65536")
    faults = {
        mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()[-1])
        for mode in ("default", "reuse")
    }  # fmt: skip
    assert faults["default"] > 100 * 1000  # ~2,048 faults per 8 MiB allocation
    # with reuse, only the heap's growth faults (0-10,240 seen here over 100 allocations)
    assert faults["reuse"] < faults["default"] / 5
