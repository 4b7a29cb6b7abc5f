"""``mapex-study``: the command line. Thin: parse, call one library function, print.

The CLI owns user-facing output (rich tables, progress bars); the library logs.
"""

from __future__ import annotations

import logging
import shlex
import sys

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mapex_analysis.data.tasks import task_table
from mapex_analysis.models.registry import UnknownModelError
from mapex_analysis.options import FILL_POLICIES
from mapex_analysis.study.execution import job_script
from mapex_analysis.study.schema import StudyError, cluster_kind, load_study

console = Console()


def _table(rows: list[dict[str, object]], title: str) -> Table:
    table = Table(title=title)
    if rows:
        for col in rows[0]:
            table.add_column(str(col))
        for row in rows:
            table.add_row(*[f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()])
    return table


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Measure how much of a remote sensing foundation model a task needs."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.group("list")
def list_() -> None:
    """List registered modalities or models."""


@list_.command("modalities")
def list_modalities() -> None:
    """Sensors, bands, centre wavelengths and units of every modality."""
    from mapex_analysis.modalities import modality_table

    console.print(_table(modality_table(), "Modalities"))


@list_.command("tasks")
def list_tasks_cmd() -> None:
    """SynthEO tasks: label kind, number of classes, default cloud probability."""
    Console(width=max(console.width, 160)).print(_table(task_table(), "SynthEO tasks"))


@list_.command("models")
def list_models() -> None:
    """Registered models with their modalities, parameters and weight source."""
    from mapex_analysis.factory import model_table

    # at least 160 columns, so names and weight sources are not cut off in pipes and CI logs
    wide = Console(width=max(console.width, 160))
    wide.print(_table(model_table(), "Models"))


@main.command("macs")
@click.argument("model")
@click.option("--width", type=float, default=None, help="Slim to width s in (0, 1] first.")
@click.option("--modalities", default=None, help="Comma-separated modalities to feed.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option(
    "--fill",
    type=click.Choice(FILL_POLICIES),
    default=None,
    help="Fill the bands a fixed-band model needs that the fed modalities lack (0 in physical "
    "units, or each band's mean); default: a missing band is an error.",
)
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N.")
def macs(
    model: str,
    width: float | None,
    modalities: str | None,
    batch_size: int,
    fill: str | None,
    device: str,
) -> None:
    """MACs (per op, per modality, two counters) and parameters of MODEL.

    MODEL is a registry name, a checkpoint directory or timm/<name>.
    """
    from mapex_analysis.measure.cost import measure_cost
    from mapex_analysis.measure.macs import MacsError
    from mapex_analysis.modalities import ModalityError

    mods = [m.strip() for m in modalities.split(",") if m.strip()] if modalities else None
    try:
        cost = measure_cost(model, width=width, modalities=mods, batch_size=batch_size, fill=fill,
                            device=device)  # fmt: skip
    except (MacsError, ModalityError, UnknownModelError, ValueError) as err:
        if "missing bands" in str(err):
            err = ValueError(f"{err} (on the command line: --fill zeros or --fill mean)")
        _fail(err)
        return
    rep = cost.macs
    if cost.filled:
        console.print(
            f"filled bands {', '.join(cost.filled)} with {cost.fill} (no fed modality carries them)"
        )
    console.print(
        f"[bold]{cost.model}[/]"
        + (f" at width {cost.width:g}" if cost.width is not None else "")
        + f", batch {cost.batch_size}, on {cost.device}, inputs {rep.input_shapes}"
    )
    scale, prefix = (1e9, "G") if rep.total >= 1e9 else (1e6, "M")
    console.print(
        f"total: {rep.total:,} MACs = {rep.total / scale:.3f} {prefix} MACs "
        f"(FLOPs = 2 x MACs = {rep.flops / scale:.3f} {prefix} FLOPs)"
    )
    console.print(_table(rep.op_rows(), "MACs per op (uncounted ops listed with their calls)"))
    if rep.unsupported:
        console.print(
            "not counted (elementwise/routing ops): "
            + ", ".join(f"{op} x{n}" for op, n in sorted(rep.unsupported.items()))
        )
    if rep.cross_check:
        chk = rep.cross_check
        console.print(
            f"cross-check: fvcore {int(chk['fvcore_macs']):,} MACs vs torch FlopCounterMode "
            f"{int(chk['flopcounter_macs']):,} MACs, relative difference {chk['rel_diff']:.4%}"
        )
    if rep.by_modality:
        rows = [{"modality": m, "MACs (fed alone)": n} for m, n in rep.by_modality.items()]
        console.print(_table(rows, "MACs per modality (each modality fed alone)"))
    prm = cost.params
    console.print(
        f"parameters: {prm.total:,} total, {prm.active:,} active for "
        f"{', '.join(prm.modalities) or 'all inputs'}"
    )
    if prm.by_modality:
        console.print(_table(prm.rows(), "Active parameters per modality"))


@main.command("pretrain")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--devices", default=None, help="Devices per node (count or 'auto').")
@click.option("--num-nodes", type=int, default=None, help="Number of nodes (DDP).")
@click.option("--accelerator", default=None, help="auto, cpu, gpu... (default: the config's).")
@click.option(
    "--device",
    default=None,
    help="One device: cpu, cuda, cuda:N or auto (sets --accelerator and --devices).",
)
@click.option(
    "--strategy",
    default=None,
    help="Lightning strategy (default: auto for one process, ddp with unused parameters "
    "allowed for several). Under SLURM (srun) and torchrun the ranks come from the "
    "environment.",
)
@click.option("--max-steps", type=int, default=None, help="Override the config's steps.")
@click.option("--output-dir", default=None, help="Override where the checkpoint is written.")
@click.option(
    "--knn-every",
    type=click.IntRange(min=1),
    default=None,
    help="Score SynthEO land-cover k-NN (k=5) of the frozen encoder at the start and every N "
    "steps (logged as knn/accuracy).",
)
def pretrain_cmd(
    config: str,
    devices: str | None,
    num_nodes: int | None,
    accelerator: str | None,
    device: str | None,
    strategy: str | None,
    max_steps: int | None,
    output_dir: str | None,
    knn_every: int | None,
) -> None:
    """Masked-autoencoding pretraining from CONFIG.yaml (studies/pretrain/*.yaml)."""
    from mapex_analysis.train.evaluation import KnnMonitor
    from mapex_analysis.train.pretrain import pretrain

    dev: int | str | list[int] | None = int(devices) if devices and devices.isdigit() else devices
    if device is not None:
        from mapex_analysis.device import DeviceError, resolve_device

        if devices is not None or accelerator is not None:
            _fail(ValueError("--device sets the accelerator and devices; give it alone"))
            return
        try:
            chosen = resolve_device(device)
        except DeviceError as err:
            _fail(err)
            return
        accelerator = "cpu" if chosen.type == "cpu" else "gpu"
        dev = 1 if chosen.type == "cpu" else [int(chosen.index or 0)]
    opts = {
        "--devices": devices,
        "--num-nodes": num_nodes,
        "--accelerator": accelerator if device is None else None,
        "--device": device,
        "--strategy": strategy,
        "--max-steps": max_steps,
        "--output-dir": output_dir,
        "--knn-every": knn_every,
    }
    command = " ".join(
        ["mapex-study", "pretrain", shlex.quote(config)]
        + [f"{k} {shlex.quote(str(v))}" for k, v in opts.items() if v is not None]
    )
    monitor = KnnMonitor(knn_every) if knn_every is not None else None
    try:
        res = pretrain(
            config,
            devices=dev,  # type: ignore[arg-type]
            num_nodes=num_nodes,
            accelerator=accelerator,
            strategy=strategy,
            max_steps=max_steps,
            output_dir=output_dir,
            command=command,
            callbacks=[monitor] if monitor is not None else [],
        )
    except (ValueError, TypeError) as err:  # ConfigError is a ValueError
        _fail(err)
        return
    if res.checkpoint_dir is not None:
        console.print(
            f"{res.config.name}: {res.steps} steps, final loss {res.final_loss:.4f}, "
            f"{res.seconds:.0f} s -> {res.checkpoint_dir}"
        )
    if monitor is not None and monitor.history:
        scores = ", ".join(f"step {s}: {a:.3f}" for s, a in monitor.history)
        console.print(f"land-cover k-NN (k=5): {scores}")


@main.command("validate")
@click.argument("study", type=click.Path(dir_okay=False))
def validate(study: str) -> None:
    """Validate a STUDY YAML file (errors name the YAML path and the allowed values)."""
    try:
        cfg = load_study(study)
    except StudyError as err:
        _fail(err)
        return
    console.print(f"{study}: valid study [bold]{cfg.name}[/] -> {cfg.study_dir}")


@main.command("run")
@click.argument("study", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="List the grid and its size; run nothing.")
@click.option("--fresh", is_flag=True, help="Discard finished cells and cached features first.")
@click.option(
    "--cluster",
    default=None,
    help="Where cells run: serial (default), local[:N] (N Dask worker processes), slurm, pbs "
    "(dask-jobqueue, resources from the YAML's execution:) or tcp://host:port (a running "
    "scheduler). Overrides execution.cluster.",
)
@click.option(
    "--device",
    default=None,
    help="Where models run: auto, cpu, cuda, cuda:N (default: the study's device).",
)
def run(study: str, dry_run: bool, fresh: bool, cluster: str | None, device: str | None) -> None:
    """Run a STUDY (resumable: finished cells are skipped), writing reports/<study>/."""
    try:
        if cluster is not None:
            cluster_kind(cluster)  # a malformed cluster string fails before any model loads
        cfg = load_study(study)
    except (StudyError, ValueError) as err:
        _fail(err)
        return
    from mapex_analysis.study.runner import iter_pending, plan_grid, run_study

    if dry_run:
        cells = plan_grid(cfg)
        rows: list[dict[str, object]] = [
            {"cell": cid, "status": "done" if done else "todo", "work": cell.describe()}
            for cell, cid, done in iter_pending(cfg, cells)
        ]
        console.print(_table(rows, f"Grid of study {cfg.name}"))
        n_done = sum(r["status"] == "done" for r in rows)
        console.print(f"{len(rows)} cells ({n_done} finished, {len(rows) - n_done} to run)")
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        job = bar.add_task(f"study {cfg.name}", total=None)

        def on_cell(done: int, total: int, cell: object, skipped: bool) -> None:
            bar.update(job, completed=done, total=total,
                       description=f"{'skip' if skipped else 'done'} {cell.describe()}"[:70])  # type: ignore[attr-defined]  # fmt: skip

        from mapex_analysis.models.weights import WeightsError

        try:
            summary = run_study(cfg, fresh=fresh, progress=on_cell, cluster=cluster,
                                device=device)  # fmt: skip
        except (ValueError, ModuleNotFoundError, FileNotFoundError, WeightsError) as err:
            _fail(err)
            return
    console.print(
        f"{summary.cells} cells: {summary.ran} run, {summary.skipped} already finished; "
        f"{summary.rows:,} result rows in {summary.seconds:.1f} s -> {summary.study_dir}"
    )


@main.command("job-script")
@click.argument("study", type=click.Path(dir_okay=False))
@click.option("--kind", type=click.Choice(["slurm", "pbs"]), default=None,
              help="Batch system (default: the YAML's execution.cluster).")  # fmt: skip
def job_script_cmd(study: str, kind: str | None) -> None:
    """Print the batch script of one Dask worker of STUDY (what --cluster slurm|pbs submits)."""
    try:
        cfg = load_study(study)
        click.echo(job_script(cfg, kind))
    except (StudyError, ValueError, ModuleNotFoundError) as err:
        _fail(err)


@main.command("report")
@click.argument("study_dir", required=False, type=click.Path(file_okay=False))
def report(study_dir: str | None) -> None:
    """Render STUDY_DIR/report.html (default: the most recent study under reports/)."""
    from mapex_analysis.report import latest_study_dir, render_report

    try:
        folder = study_dir if study_dir is not None else latest_study_dir("reports")
        path = render_report(folder)
    except FileNotFoundError as err:
        _fail(err)
        return
    console.print(f"report -> {path}")


def _fail(err: Exception) -> None:
    console.print(
        f"[bold red]error:[/] {escape(str(err))}", highlight=False, markup=True, soft_wrap=True
    )
    sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
