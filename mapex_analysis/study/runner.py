"""The study runner: expand the grid, run every unfinished cell, write the results table.

Grid (per model label, with ``A`` the model's modalities and ``P`` each prune set):

* ``base`` fed ``A`` (the reference every retention and relative cost is taken against);
* ``base`` fed ``P`` (the full model restricted to a task's modalities; for dense and
  supervised models this is their per-modality row of the seed-style tables);
* ``prune[P]`` fed ``P`` (MAPEX models only);
* ``slim[s,mode,order]`` fed ``A`` (and fed ``P`` with ``slim.modality_sets``);
* ``prune[P]+slim[s,mode,order]`` fed ``P`` (prune-then-slim, ``slim.apply_to: [pruned]``).

Each (model, variant, modalities) has one *cost* cell (MACs per sample, parameters, latency) and
one *eval* cell per (task, seed) (probes, redundancy, specialisation, attribution). A finished
cell writes its rows atomically (:mod:`.results`); a rerun skips it, so a killed run resumes
without recomputing or duplicating anything. Frozen features are cached on disk by
:func:`mapex_analysis.eval.extract_features`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch import nn

from mapex_analysis.study.execution import cluster_kind, run_on_dask
from mapex_analysis.study.results import (
    cell_file_problem,
    cell_path,
    finished_cells,
    remove_partial_files,
    write_cell,
    write_table,
)
from mapex_analysis.study.schema import ModelConfig, Study

__all__ = [
    "Cell",
    "RunSummary",
    "Variant",
    "environment",
    "feature_cache_key",
    "plan_grid",
    "run_study",
]

logger = logging.getLogger(__name__)

#: ``progress(done, total, cell, skipped)`` after every cell.
ProgressFn = Callable[[int, int, "Cell", bool], None]


@dataclass(frozen=True)
class Variant:
    """An operator chain applied to a model.

    Attributes:
        prune: Modality set the experts are pruned to, or ``None``.
        width: Slimming width factor, or ``None``.
        mode: Slimming mode.
        order: Slimming channel order.
        strategy: Pruning strategy (``static`` or ``routing``).
        coverage: Coverage of the ``routing`` strategy (``None`` for ``static``).
    """

    prune: tuple[str, ...] | None = None
    width: float | None = None
    mode: str = "attn+mlp"
    order: str = "first"
    strategy: str = "static"
    coverage: float | None = None

    @property
    def key(self) -> str:
        """``base``, ``prune[sar]``, ``prune[sar,routing@0.95]``, ``slim[0.25,attn+mlp,first]``
        or ``prune[sar]+slim[...]``."""
        parts = []
        if self.prune is not None:
            how = "" if self.strategy == "static" else f",routing@{self.coverage:g}"
            parts.append(f"prune[{'+'.join(self.prune)}{how}]")
        if self.width is not None:
            parts.append(f"slim[{self.width:g},{self.mode},{self.order}]")
        return "+".join(parts) or "base"

    @property
    def operator(self) -> str:
        """``none``, ``prune``, ``slim`` or ``prune+slim``."""
        ops = (["prune"] if self.prune is not None else []) + (
            ["slim"] if self.width is not None else []
        )
        return "+".join(ops) or "none"


@functools.lru_cache(maxsize=64)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def checkpoint_fingerprint(source: str) -> str:
    """SHA-256 prefix of a checkpoint's ``spec.json`` and weights, so that re-pretrained
    weights invalidate the finished cells of a study instead of being silently reused.

    Args:
        source: A checkpoint directory.

    Returns:
        ``"<spec sha>:<weights sha>"`` (empty parts for missing files).
    """
    parts = []
    for name in ("spec.json", "weights.safetensors"):
        f = Path(source) / name
        if f.is_file():
            st = f.stat()
            parts.append(_file_sha(str(f.resolve()), st.st_size, st.st_mtime_ns))
        else:
            parts.append("")
    return ":".join(parts)


@dataclass(frozen=True)
class Cell:
    """One unit of work whose rows are written together.

    Attributes:
        kind: ``cost`` (MACs, parameters, latency) or ``eval`` (probes and feature measures).
        model: Model label.
        variant: The operator chain.
        modalities: Modalities fed.
        task: Task (``eval`` cells).
        seed: Seed (``eval`` cells).
    """

    kind: Literal["cost", "eval"]
    model: str
    variant: Variant
    modalities: tuple[str, ...]
    task: str = ""
    seed: int = -1

    def cell_id(self, study: Study) -> str:
        """Stable id from everything that determines the cell's rows."""
        cfg = study.models[self.model]
        payload = {
            "study": study.name,
            "kind": self.kind,
            "model": self.model,
            # which widths and operators a model gets decides which cells exist, not the rows
            # of this one (its variant key holds its own width), so adding widths reruns nothing
            "model_cfg": cfg.model_dump(
                mode="json", exclude={"slim_widths", "slim_set_widths", "operators"}
            ),
            "weights": checkpoint_fingerprint(cfg.source) if cfg.is_checkpoint else "",
            "variant": self.variant.key,
            "slim_seed": study.operators.slim.seed if study.operators.slim else 0,
            "prune": study.operators.prune.model_dump(mode="json")
            if study.operators.prune
            else None,
            "modalities": list(self.modalities),
            "task": self.task,
            "seed": self.seed,
        }
        if self.kind == "eval":
            payload |= {
                "data": study.data.model_dump(mode="json"),
                "protocols": list(study.protocols),
                "knn_k": study.knn_k,
                "finetune": study.finetune.model_dump(mode="json"),
                "measure": sorted(
                    set(study.measurements) & {"redundancy", "specialization", "attribution"}
                ),
                "attribution_samples": study.attribution_samples,
            }
        else:
            payload |= {
                "measure": sorted(set(study.measurements) & {"macs", "params", "latency"}),
                "slim_widths": cfg.slim_widths,
                "latency": study.latency.model_dump(mode="json"),
            }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    def describe(self) -> str:
        """One line for progress bars and the dry-run listing."""
        where = f" {self.task} seed {self.seed}" if self.kind == "eval" else ""
        return f"{self.kind:4s} {self.model} {self.variant.key} @{'+'.join(self.modalities)}{where}"


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


# ----------------------------------------------------------------------------- models


def _seed_everything(seed: int) -> None:
    # Model init and torch-side randomness; probes and data take explicit seeds.
    torch.manual_seed(seed)


def build_base(cfg: ModelConfig) -> nn.Module:
    """The unmodified model of a study entry (seeded random init for registry names).

    Args:
        cfg: The model entry.

    Returns:
        The model in eval mode.
    """
    from mapex_analysis.models.registry import create_model

    if cfg.is_checkpoint:
        model = create_model(cfg.source)
    else:
        kwargs = dict(cfg.kwargs)
        if cfg.router is not None:
            kwargs.setdefault("router", cfg.router)
        _seed_everything(cfg.init_seed)
        model = create_model(cfg.source, **kwargs)
    return model.eval()


def _is_moe(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", [])
    return any(hasattr(getattr(b, "mlp", None), "experts") for b in blocks)


def _model_modalities(model: nn.Module) -> tuple[str, ...]:
    from mapex_analysis.modalities import DEFAULT_MODALITIES

    mods = tuple(getattr(model, "modalities", ()) or ())
    return tuple(m for m in DEFAULT_MODALITIES if m in mods) or mods


# ----------------------------------------------------------------------------- grid


def _variants(study: Study, cfg: ModelConfig, mods: tuple[str, ...]) -> list[tuple[Variant, tuple]]:
    out: list[tuple[Variant, tuple[str, ...]]] = [(Variant(), mods)]
    prune = study.operators.prune if "prune" in cfg.operators else None
    slim = study.operators.slim if "slim" in cfg.operators else None
    # Input-restricted references exist for every prune set, even where pruning does not apply.
    sets = study.operators.prune.expanded(mods) if study.operators.prune is not None else []
    sets = [s for s in sets if s != mods]
    plans = prune.plans() if prune is not None else []
    for s in sets:
        out.append((Variant(), s))
        if prune is not None and cfg.role == "mapex":
            out += [(Variant(prune=s, strategy=st, coverage=c), s) for st, c in plans]
    if slim is not None:
        # widths on all the model's modalities, and widths on each prune set's modalities
        # (``modality_sets`` repeats the former there; ``slim_set_widths`` adds its own)
        base_widths = (
            [w for w in slim.width_list(override=cfg.slim_widths) if w < 1.0]
            if "base" in slim.apply_to
            else []
        )
        set_widths = list(base_widths) if slim.modality_sets else []
        set_widths += [w for w in cfg.slim_set_widths or [] if w < 1.0 and w not in set_widths]
        pruned_widths = (
            [w for w in slim.width_list(pruned=True) if w < 1.0]
            if "pruned" in slim.apply_to and prune is not None and cfg.role == "mapex"
            else []
        )
        for mode in slim.modes:
            for order in slim.orders:
                out += [(Variant(width=w, mode=mode, order=order), mods) for w in base_widths]
                out += [(Variant(width=w, mode=mode, order=order), s)
                        for w in set_widths for s in sets]  # fmt: skip
                st0, c0 = plans[0] if plans else ("static", None)
                out += [(Variant(prune=s, width=w, mode=mode, order=order, strategy=st0,
                                 coverage=c0), s)
                        for w in pruned_widths for s in sets]  # fmt: skip
    return out


def plan_grid(study: Study, modalities: dict[str, tuple[str, ...]] | None = None) -> list[Cell]:
    """Every cell of the study, cost cells first, in a stable order.

    Args:
        study: The validated study.
        modalities: Model label -> its modalities; default: built from each model.

    Returns:
        The cells.
    """
    mods_of = dict(modalities or {})
    for label, cfg in study.models.items():
        if label not in mods_of:
            mods_of[label] = _model_modalities(build_base(cfg))
    want_cost = bool(set(study.measurements) & {"macs", "params", "latency"})
    cost: list[Cell] = []
    evals: list[Cell] = []
    for label, cfg in study.models.items():
        for variant, mods in _variants(study, cfg, mods_of[label]):
            if want_cost:
                cost.append(Cell("cost", label, variant, mods))
            for task in study.tasks:
                for seed in study.seeds:
                    evals.append(Cell("eval", label, variant, mods, task, seed))
    return cost + evals


# ----------------------------------------------------------------------------- environment


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment() -> dict[str, Any]:
    """Versions, threads, platform and git commit of this run.

    Returns:
        A JSON-able dict.
    """
    versions = {}
    for pkg in ("mapex-analysis", "torch", "timm", "torchgeo", "numpy", "scikit-learn",
                "pandas", "pydantic", "plotly", "captum", "fvcore"):  # fmt: skip
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "git_commit": _git_commit(),
        "versions": versions,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- execution


@dataclass
class _Context:
    study: Study
    study_dir: Path
    bases: dict[str, nn.Module] = field(default_factory=dict)
    variants: OrderedDict[tuple[str, str], nn.Module] = field(default_factory=OrderedDict)
    data: OrderedDict[tuple[str, int, str], Any] = field(default_factory=OrderedDict)

    def base(self, label: str) -> nn.Module:
        if label not in self.bases:
            self.bases[label] = build_base(self.study.models[label])
        return self.bases[label]

    def model(self, label: str, variant: Variant) -> nn.Module:
        key = (label, variant.key)
        if key in self.variants:
            self.variants.move_to_end(key)
            return self.variants[key]
        model = self.base(label)
        if variant.prune is not None:
            model = self._prune(model, variant)
        if variant.width is not None:
            from mapex_analysis.ops.slim import slim_width

            seed = self.study.operators.slim.seed if self.study.operators.slim else 0
            model = slim_width(model, variant.width, mode=variant.mode, order=variant.order,  # type: ignore[arg-type]
                               seed=seed)  # fmt: skip
        model.eval()
        self.variants[key] = model
        while len(self.variants) > 8:
            self.variants.popitem(last=False)
        return model

    def _prune(self, model: nn.Module, variant: Variant) -> nn.Module:
        """Prune with calibration data always given (the first task's ``train`` split, seed
        of the first study seed), so every pruned model reports ``traffic_to_removed``."""
        from mapex_analysis.ops import prune_experts

        cfg = self.study.operators.prune
        assert cfg is not None and variant.prune is not None  # only with a prune config
        mods = variant.prune
        calib = self.dataset(self.study.tasks[0], self.study.seeds[0], "train")
        arrays = calib.arrays()
        n, bs = cfg.calibration_samples, self.study.data.batch_size
        calibration = [
            {m: torch.as_tensor(arrays[m][i : min(i + bs, n)]) for m in mods}
            for i in range(0, min(n, len(arrays[mods[0]])), bs)
        ]
        coverage = variant.coverage if variant.coverage is not None else cfg.coverage
        return prune_experts(model, list(mods), strategy=variant.strategy,
                             calibration=calibration, coverage=coverage)  # fmt: skip

    def dataset(self, task: str, seed: int, split: str) -> Any:
        key = (task, seed, split)
        if key not in self.data:
            from mapex_analysis.data import SynthEO

            d = self.study.data
            self.data[key] = SynthEO(
                task,
                split,
                seed=d.seed + seed,
                n=d.n_train if split == "train" else d.n_test,
                img_size=d.img_size,
                clouds=d.clouds,
            )
            while len(self.data) > 16:
                self.data.popitem(last=False)
        return self.data[key]


def _base_row(ctx: _Context, cell: Cell) -> dict[str, Any]:
    cfg = ctx.study.models[cell.model]
    v = cell.variant
    return {
        "study": ctx.study.name,
        "model": cell.model,
        "source": cfg.source,
        "role": cfg.role,
        "router": cfg.router or "",
        "variant": v.key,
        "operator": v.operator,
        "prune": "+".join(v.prune) if v.prune is not None else "",
        "width": 1.0 if v.width is None else v.width,
        "mode": v.mode if v.width is not None else "",
        "order": v.order if v.width is not None else "",
        "task": cell.task,
        "modalities": "+".join(cell.modalities),
        "seed": cell.seed,
    }


def _cost_rows(ctx: _Context, cell: Cell) -> list[dict[str, Any]]:
    from mapex_analysis.measure.cost import example_inputs

    study = ctx.study
    model = ctx.model(cell.model, cell.variant)
    row0 = _base_row(ctx, cell) | {"protocol": "cost"}
    rows = []
    if "macs" in study.measurements:
        from mapex_analysis.measure.macs import count_macs

        rep = count_macs(model, example_inputs(model, batch_size=1, modalities=cell.modalities),
                         cross_check=False)  # fmt: skip
        rows.append(row0 | {"metric": "macs", "value": float(rep.total), "unit": "MACs"})
    if "params" in study.measurements:
        from mapex_analysis.measure.params import count_params

        prm = count_params(model, cell.modalities if getattr(model, "modalities", None) else None)
        rows.append(row0 | {"metric": "params_total", "value": float(prm.total),
                            "unit": "parameters"})  # fmt: skip
        rows.append(row0 | {"metric": "params_active", "value": float(prm.active),
                            "unit": "parameters"})  # fmt: skip
    prune_reps = [r for r in getattr(model, "op_reports", []) if "traffic_to_removed" in r]
    rep_p = prune_reps[-1] if prune_reps else None
    traffic = rep_p.get("traffic_to_removed") if isinstance(rep_p, dict) else None
    if cell.variant.prune is not None and isinstance(rep_p, dict):
        kept = sum(len(r["kept"]) for r in rep_p["layers"])
        before = sum(r["experts_before"] for r in rep_p["layers"])
        rows.append(row0 | {"metric": "experts_kept", "value": float(kept), "unit": "experts"})
        rows.append(row0 | {"metric": "experts_kept_share", "value": kept / before,
                            "unit": "fraction"})  # fmt: skip
        if traffic is not None:
            rows.append(row0 | {"metric": "traffic_to_removed", "value": float(traffic["overall"]),
                                "unit": "fraction of calibration assignments"})  # fmt: skip
    lat_widths = study.latency.widths
    timed = cell.variant.width is None or lat_widths is None or cell.variant.width in lat_widths
    if "latency" in study.measurements and timed:
        from mapex_analysis.measure.latency import measure_latency

        lat = study.latency
        inputs = example_inputs(model, batch_size=max(lat.batch_sizes), modalities=cell.modalities)
        rep_l = measure_latency(model, inputs, warmup=lat.warmup, repeats=lat.repeats,
                                batch_sizes=lat.batch_sizes, threads=lat.threads)  # fmt: skip
        for p in rep_l.points:
            rows.append(row0 | {"metric": "latency_median", "value": p.median_ms, "unit": "ms",
                                "batch_size": p.batch_size})  # fmt: skip
            rows.append(row0 | {"metric": "throughput", "value": p.throughput,
                                "unit": "samples/s", "batch_size": p.batch_size})  # fmt: skip
    return rows


def feature_cache_key(cfg: ModelConfig, cell: Cell, model: nn.Module) -> str:
    """Feature-cache key of an eval cell: the model's source, weights and keyword arguments
    and the **applied operator plans** (``model.applied_ops``: strategy, coverage, kept
    experts, slim widths and seed...), not the variant's name, so two plans that share a name
    (``prune[sar]`` static vs routing) never share features.

    Args:
        cfg: The model's study entry.
        cell: The eval cell.
        model: The variant model the features are extracted from.

    Returns:
        The key (the feature cache hashes it together with the data).
    """
    weights = checkpoint_fingerprint(cfg.source) if cfg.is_checkpoint else ""
    plan = json.dumps(getattr(model, "applied_ops", []), sort_keys=True, default=str)
    return (
        f"{cell.model}|{cfg.source}|{weights}|{json.dumps(cfg.kwargs, sort_keys=True)}|"
        f"{cfg.router}|{cfg.init_seed}|{cell.variant.key}|{plan}"
    )


def _eval_rows(ctx: _Context, cell: Cell) -> list[dict[str, Any]]:
    from mapex_analysis.eval import extract_features, run_probe

    study = ctx.study
    cfg = study.models[cell.model]
    model = ctx.model(cell.model, cell.variant)
    train = ctx.dataset(cell.task, cell.seed, "train")
    test = ctx.dataset(cell.task, cell.seed, "test")
    spec = train.task
    seg = spec.kind == "segmentation"
    cache_key = feature_cache_key(cfg, cell, model)
    feats = extract_features(
        model,
        {"train": train, "test": test},
        modalities=cell.modalities,
        pool="patch" if seg else None,
        batch_size=study.data.batch_size,
        cache_dir=ctx.study_dir / "features",
        cache_key=cache_key,
    )
    row0 = _base_row(ctx, cell)
    rows: list[dict[str, Any]] = []
    linear_est = None
    for protocol in study.protocols:
        if protocol == "finetune":
            from mapex_analysis.eval import finetune

            ft = study.finetune
            res = finetune(model, train, test, modalities=cell.modalities, epochs=ft.epochs,
                           lr=ft.lr, batch_size=ft.batch_size, seed=cell.seed)  # fmt: skip
            rows.append(row0 | {"protocol": "finetune", "metric": res.metric,
                                "value": res.value, "unit": "fraction"})  # fmt: skip
            continue
        if seg and protocol == "knn":
            logger.info("segmentation has no k-NN probe; skipped for %s", cell.describe())
            continue
        kwargs: dict[str, Any] = {"k": study.knn_k} if protocol == "knn" else {"seed": cell.seed}
        res_p = run_probe(protocol, spec.kind, feats.train.X, feats.train.y, feats.test.X,
                          feats.test.y, num_classes=spec.num_classes, **kwargs)  # fmt: skip
        if protocol == "linear":
            linear_est = res_p.estimator
        for metric, value in sorted(res_p.metrics.items()):
            rows.append(row0 | {"protocol": protocol, "metric": metric, "value": float(value),
                                "unit": "fraction"})  # fmt: skip
    if "redundancy" in study.measurements and not seg:
        from mapex_analysis.measure.redundancy import redundancy_metrics

        red = redundancy_metrics(feats.test.X)
        for metric, unit in (("mean_abs_correlation", "|r|"),
                             ("spectrum_slope", "log-log slope"),
                             ("effective_dimensionality", "dimensions")):  # fmt: skip
            rows.append(row0 | {"protocol": "features", "metric": metric,
                                "value": float(getattr(red, metric)), "unit": unit})  # fmt: skip
    if (
        "specialization" in study.measurements
        and cell.variant.width is None
        and cell.task == study.tasks[0]
        and _is_moe(model)
    ):
        rows += _specialization_rows(model, test, cell, row0)
    if (
        "attribution" in study.measurements
        and cell.variant.key == "base"
        and len(cell.modalities) > 1
        and spec.kind in ("multiclass", "binary")
    ):
        rows += _attribution_rows(ctx, model, feats, test, cell, row0, linear_est)
    return rows


def _specialization_rows(model: nn.Module, test: Any, cell: Cell, row0: dict) -> list[dict]:
    from mapex_analysis.measure.specialization import collect_routing, specialization_metrics

    counts = collect_routing(model, test.arrays(), modalities=cell.modalities)
    rep = specialization_metrics(counts)
    rows = []
    for r in rep.rows():
        value = r["value"]
        rows.append(row0 | {
            "protocol": "routing",
            "metric": r["metric"],
            "value": float(value),
            "unit": r["unit"],
            "subject": r["modality"] or "",
            "layer": int(r["layer"]),
            "expert": -1 if r["expert"] is None else int(r["expert"]),
            "expert_group": r["expert_group"] or "",
        })  # fmt: skip
    from mapex_analysis.measure.params import routed_active_params

    for m in cell.modalities:  # what the tokens reached, not what the group labels say
        rows.append(row0 | {"protocol": "routing", "metric": "params_active_routed",
                            "value": float(routed_active_params(model, counts, m)),
                            "unit": "parameters", "subject": m})  # fmt: skip
    return rows


def _attribution_rows(
    ctx: _Context, model: nn.Module, feats: Any, test: Any, cell: Cell, row0: dict, est: Any
) -> list[dict]:
    """Feature-ablation attribution of the linear probe's true-class probability."""
    from mapex_analysis.eval import linear_probe
    from mapex_analysis.measure.attribution import modality_ablation

    if est is None:
        est = linear_probe(feats.train.X, feats.train.y, feats.test.X, feats.test.y,
                           seed=cell.seed).estimator  # fmt: skip
    n = min(ctx.study.attribution_samples, len(test))
    arrays = test.arrays()
    x = {m: torch.as_tensor(arrays[m][:n]) for m in cell.modalities}
    y = np.asarray(arrays["label"][:n])
    classes = list(est.classes_)
    col = np.array([classes.index(v) for v in y])

    def true_class_prob(inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            f = model(dict(inputs)).float().numpy()
        p = est.predict_proba(f)
        return torch.as_tensor(p[np.arange(len(col)), col], dtype=torch.float32)

    att = modality_ablation(true_class_prob, x)
    rows = []
    for m in att.modalities:
        rows.append(row0 | {"protocol": "attribution", "metric": "true_class_prob_drop",
                            "value": float(att.values[m].mean()), "unit": "probability",
                            "subject": m})  # fmt: skip
    return rows


def _run_cell(ctx: _Context, cell: Cell) -> list[dict[str, Any]]:
    _seed_everything(max(cell.seed, 0))
    return _cost_rows(ctx, cell) if cell.kind == "cost" else _eval_rows(ctx, cell)


def save_config(study: Study, study_dir: Path) -> None:
    """Write the resolved config (``config.resolved.yaml``) and ``environment.json``.

    Args:
        study: The validated study.
        study_dir: Output folder.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    resolved = study.model_dump(mode="json")
    if study.operators.slim is not None:
        resolved["operators"]["slim"]["widths"] = study.operators.slim.width_list()
    tmp = study_dir / ".config.resolved.yaml.tmp"
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    os.replace(tmp, study_dir / "config.resolved.yaml")
    _write_json(study_dir / "environment.json", environment())


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
_WORKER_CONTEXTS: dict[str, _Context] = {}


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
        _WORKER_CONTEXTS.clear()  # one study at a time per worker
        ctx = _WORKER_CONTEXTS[key] = _Context(study, study.study_dir)
    _compute(ctx, cell, cell_id)
    return True


def _compute(ctx: _Context, cell: Cell, cell_id: str) -> None:
    """Run one cell in ``ctx`` and write its file (serial loop and Dask workers alike)."""
    t_cell = time.perf_counter()
    rows = _run_cell(ctx, cell)
    write_cell(ctx.study_dir, cell_id, rows)
    logger.info("%s: %d rows in %.2f s (pid %d)", cell.describe(), len(rows),
                time.perf_counter() - t_cell, os.getpid())  # fmt: skip


def run_study(
    study: Study,
    *,
    fresh: bool = False,
    progress: ProgressFn | None = None,
    cluster: str | None = None,
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

    Returns:
        A :class:`RunSummary`.

    Raises:
        ValueError: for a malformed cluster string.
    """
    import shutil

    if cluster is not None:
        cluster_kind(cluster)  # a clear error before any work
        study = study.model_copy(
            update={"execution": study.execution.model_copy(update={"cluster": cluster})}
        )

    t0 = time.perf_counter()
    study_dir = study.study_dir
    if fresh:
        for sub in ("cells", "features"):
            shutil.rmtree(study_dir / sub, ignore_errors=True)
    save_config(study, study_dir)
    ctx = _Context(study, study_dir)
    cells = plan_grid(study, {label: _model_modalities(ctx.base(label)) for label in study.models})
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
    remove_partial_files(study_dir)  # every writer has finished: a temp file is a killed write
    table = write_table(study_dir)
    return RunSummary(study_dir, len(cells), ran, skipped, len(table), time.perf_counter() - t0)
