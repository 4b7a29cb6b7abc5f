"""Cost measurements: MACs, parameters, latency, and what a pruning step kept."""

from __future__ import annotations

from typing import Any

import torch

from mapex_analysis.measure.cost import example_inputs
from mapex_analysis.measure.latency import measure_latency
from mapex_analysis.measure.macs import count_macs
from mapex_analysis.measure.params import count_params
from mapex_analysis.ops.record import op_reports
from mapex_analysis.ops.slim import slimmable_modules
from mapex_analysis.study.measures.base import CostInputs

__all__ = ["latency_rows", "macs_rows", "params_rows", "pruning_rows"]


def _on_model(model: Any, inputs: Any) -> Any:
    """Example inputs moved to the device of the model's weights."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(inputs, dict):
        return {k: v.to(dev) for k, v in inputs.items()}
    return inputs.to(dev)


def _share_rows(m: CostInputs, rep: Any) -> list[dict[str, Any]]:
    """MACs that slimming narrows inside attention and MLP modules (their linear layers and the
    attention matmuls) and everything else (``other``: embeddings, norms, including a norm
    inside an attention or MLP module such as CROMA's input norms, heads): what sets the floor
    of each slimming mode."""
    attns, mlps = slimmable_modules(m.model)
    by = rep.by_module
    modules = dict(m.model.named_modules())

    def narrowed(name: str) -> int:
        fixed = sum(
            by.get(f"{name}.{sub}", 0)
            for sub, mod in modules[name].named_modules()
            if sub and not isinstance(mod, torch.nn.Linear) and not list(mod.children())
        )
        return by.get(name, 0) - fixed

    attn = sum(narrowed(n) for n in attns)
    mlp = sum(narrowed(n) for n in mlps)
    other = rep.total - attn - mlp
    return [
        m.row | {"metric": f"macs_{part}", "value": float(v), "unit": "MACs"}
        for part, v in (("attn", attn), ("mlp", mlp), ("other", other))
    ]


def macs_rows(m: CostInputs) -> list[dict[str, Any]]:
    """MACs of one sample fed the cell's modalities, and their split into attention, MLP and
    other modules (``macs_attn``, ``macs_mlp``, ``macs_other``)."""
    inputs = _on_model(m.model, example_inputs(m.model, batch_size=1, modalities=m.cell.modalities))
    rep = count_macs(m.model, inputs, cross_check=False)
    total = [m.row | {"metric": "macs", "value": float(rep.total), "unit": "MACs"}]
    return total + _share_rows(m, rep)


def params_rows(m: CostInputs) -> list[dict[str, Any]]:
    """Total parameters, and the parameters active for the fed modalities."""
    prm = count_params(m.model, m.cell.modalities)
    return [
        m.row | {"metric": "params_total", "value": float(prm.total), "unit": "parameters"},
        m.row | {"metric": "params_active", "value": float(prm.active), "unit": "parameters"},
    ]


def pruning_rows(m: CostInputs) -> list[dict[str, Any]]:
    """Experts kept and the calibration traffic the removed experts carried (pruned variants;
    written by every cost cell of a pruned variant, whatever the study measures)."""
    reports = [r for r in op_reports(m.model) if "traffic_to_removed" in r]
    if m.cell.variant.prune is None or not reports:
        return []
    rep = reports[-1]
    kept = sum(len(r["kept"]) for r in rep["layers"])
    before = sum(r["experts_before"] for r in rep["layers"])
    rows = [
        m.row | {"metric": "experts_kept", "value": float(kept), "unit": "experts"},
        m.row | {"metric": "experts_kept_share", "value": kept / before, "unit": "fraction"},
    ]
    traffic = rep.get("traffic_to_removed")
    if traffic is not None:
        rows.append(m.row | {"metric": "traffic_to_removed", "value": float(traffic["overall"]),
                             "unit": "fraction of calibration assignments"})  # fmt: skip
    return rows


def latency_rows(m: CostInputs) -> list[dict[str, Any]]:
    """Median latency and throughput per batch size (slimmed variants only at the widths
    ``latency.widths`` names, when it names any)."""
    lat = m.study.latency
    width = m.cell.variant.width
    if width is not None and lat.widths is not None and width not in lat.widths:
        return []
    inputs = _on_model(m.model, example_inputs(m.model, batch_size=max(lat.batch_sizes),
                                               modalities=m.cell.modalities))  # fmt: skip
    rep = measure_latency(m.model, inputs, warmup=lat.warmup, repeats=lat.repeats,
                          batch_sizes=lat.batch_sizes, threads=lat.threads)  # fmt: skip
    rows = []
    for p in rep.points:
        rows.append(m.row | {"metric": "latency_median", "value": p.median_ms, "unit": "ms",
                             "batch_size": p.batch_size})  # fmt: skip
        rows.append(m.row | {"metric": "throughput", "value": p.throughput,
                             "unit": "samples/s", "batch_size": p.batch_size})  # fmt: skip
    return rows
