"""Computing one cell's rows: the variant model, then its measurements.

A ``cost`` cell runs the study's ``cost`` measurements on the variant model (plus the rows
that say what a pruning step kept). An ``eval`` cell extracts frozen features of the task's
splits (cached on disk), runs the probe protocols, then the study's ``eval`` measurements,
which receive the features and probe results (:mod:`mapex_analysis.study.measures`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import Any

from torch import nn

from mapex_analysis.eval.features import extract_features
from mapex_analysis.eval.finetune import finetune
from mapex_analysis.eval.probes import run_probe
from mapex_analysis.measure.specialization import RoutingRecorder
from mapex_analysis.modalities import unit_checks
from mapex_analysis.ops.record import applied_ops
from mapex_analysis.study.context import StudyContext, seed_everything
from mapex_analysis.study.grid import Cell
from mapex_analysis.study.measures import rows_function, selected
from mapex_analysis.study.measures.base import CostInputs, EvalInputs, base_row
from mapex_analysis.study.measures.cost import pruning_rows
from mapex_analysis.study.measures.specialization import measures_routing
from mapex_analysis.study.provenance import model_fingerprint
from mapex_analysis.study.schema import ModelConfig

__all__ = ["cell_rows", "feature_cache_key"]

logger = logging.getLogger(__name__)


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
    weights = model_fingerprint(cfg)
    plan = json.dumps(applied_ops(model), sort_keys=True, default=str)
    return (
        f"{cell.model}|{cfg.source}|{weights}|{json.dumps(cfg.kwargs, sort_keys=True)}|"
        f"{cfg.router}|{cfg.init_seed}|{cell.variant.key}|{plan}"
    )


def _cost_rows(ctx: StudyContext, cell: Cell) -> list[dict[str, Any]]:
    m = CostInputs(ctx, cell, ctx.model(cell.model, cell.variant),
                   base_row(ctx.study, cell) | {"protocol": "cost", "device": ctx.device_name})  # fmt: skip
    rows = []
    for name in selected(ctx.study.measurements, "cost"):
        rows += rows_function(name)(m)
    return rows + pruning_rows(m)


def _probe_rows(m: EvalInputs) -> list[dict[str, Any]]:
    """The probe protocols' rows (``protocol`` = ``knn``, ``linear``, ``finetune``); probe
    results are kept in ``m.probes`` for the measurements that reuse them."""
    study, cell, spec, feats = m.study, m.cell, m.task, m.features
    assert spec is not None
    rows: list[dict[str, Any]] = []
    for protocol in study.models[cell.model].protocols or study.protocols:
        if protocol == "finetune":
            ft = study.finetune
            if cell.variant.kind not in ft.variants:
                continue  # frozen protocols only (finetune.variants)
            res = finetune(m.model, m.train, m.test, modalities=cell.modalities, epochs=ft.epochs,
                           lr=ft.lr, batch_size=ft.batch_size, seed=cell.seed)  # fmt: skip
            rows.append(m.row | {"protocol": "finetune", "metric": res.metric,
                                 "value": res.value, "unit": "fraction",
                                 "ci_low": res.interval[0], "ci_high": res.interval[1]})  # fmt: skip
            continue
        assert feats is not None  # frozen-feature protocols run on extracted features
        if spec.kind == "segmentation" and protocol == "knn":
            logger.info("segmentation has no k-NN probe; skipped for %s", cell.describe())
            continue
        kwargs: dict[str, Any] = {"k": study.knn_k} if protocol == "knn" else {"seed": cell.seed}
        if spec.kind == "segmentation":
            kwargs["ignore_index"] = spec.ignore_index
        res_p = run_probe(protocol, spec.kind, feats.train.X, feats.train.y, feats.test.X,
                          feats.test.y, num_classes=spec.num_classes, ci_seed=max(cell.seed, 0),
                          **kwargs)  # fmt: skip
        m.probes[protocol] = res_p
        for metric, value in sorted(res_p.metrics.items()):
            lo, hi = res_p.intervals.get(metric, (float("nan"), float("nan")))
            rows.append(m.row | {"protocol": protocol, "metric": metric, "value": float(value),
                                 "unit": "fraction", "ci_low": lo, "ci_high": hi})  # fmt: skip
    return rows


def _eval_rows(ctx: StudyContext, cell: Cell) -> list[dict[str, Any]]:
    study = ctx.study
    model = ctx.model(cell.model, cell.variant)
    train = ctx.dataset(cell.task, cell.seed, "train")
    test = ctx.dataset(cell.task, cell.seed, "test")
    row = base_row(study, cell) | {"device": ctx.device_name, "precision": study.precision}
    if study.models[cell.model].protocols == ["finetune"]:
        # only trained end to end (a supervised model): no frozen features, and no measures
        # of them, which would describe the untrained initialisation
        return _probe_rows(EvalInputs(ctx, cell, model, row, train=train, test=test,
                                      task=train.task))  # fmt: skip
    kw: dict[str, Any] = dict(
        modalities=cell.modalities,
        pool="patch" if train.task.kind == "segmentation" else None,
        batch_size=study.data.batch_size,
        cache_dir=ctx.study_dir / "features",
        cache_key=feature_cache_key(study.models[cell.model], cell, model),
        precision=study.precision,
    )
    feats = extract_features(model, {"train": train}, **kw)
    # the test pass also records the routing the specialisation measure reads (no pass of
    # its own), unless its features come from the cache
    recorder = RoutingRecorder(model)
    with recorder if measures_routing(study, cell, model) else contextlib.nullcontext():
        test_feats = extract_features(model, {"test": test}, **kw)
    feats = dataclasses.replace(feats, splits={**feats.splits, **test_feats.splits})
    m = EvalInputs(ctx, cell, model, row, train=train, test=test, task=train.task,
                   features=feats, routing=recorder.counts(len(test)))  # fmt: skip
    rows = _probe_rows(m)
    for name in selected(study.measurements, "eval"):
        rows += rows_function(name)(m)
    return rows


def cell_rows(ctx: StudyContext, cell: Cell) -> list[dict[str, Any]]:
    """Every result row of ``cell`` (seeded by the cell's seed; model inputs unit-checked
    unless ``data.check_units`` is false)."""
    seed_everything(max(cell.seed, 0))
    with unit_checks(ctx.study.data.check_units):
        return _cost_rows(ctx, cell) if cell.kind == "cost" else _eval_rows(ctx, cell)
