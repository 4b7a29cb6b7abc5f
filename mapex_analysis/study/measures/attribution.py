"""Modality attribution: how much the linear probe's true-class probability drops when one
modality is ablated (base variants fed several modalities, classification tasks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mapex_analysis.eval.probes import linear_probe
from mapex_analysis.measure.attribution import modality_ablation
from mapex_analysis.study.measures.base import EvalInputs

__all__ = ["attribution_rows"]


def attribution_rows(m: EvalInputs) -> list[dict[str, Any]]:
    """``true_class_prob_drop`` per modality (``protocol="attribution"``)."""
    cell = m.cell
    assert m.task is not None and m.features is not None
    if cell.variant.key != "base" or len(cell.modalities) < 2:
        return []
    if m.task.kind not in ("multiclass", "binary"):
        return []
    probe = m.probes.get("linear")
    feats = m.features
    est = (probe.estimator if probe is not None else
           linear_probe(feats.train.X, feats.train.y, feats.test.X, feats.test.y,
                        seed=cell.seed).estimator)  # fmt: skip
    n = min(m.study.attribution_samples, len(m.test))
    arrays = m.test.arrays()
    dev = next((p.device for p in m.model.parameters()), torch.device("cpu"))
    x = {mod: torch.as_tensor(arrays[mod][:n]).to(dev) for mod in cell.modalities}
    y = np.asarray(arrays["label"][:n])
    classes = list(est.classes_)
    col = np.array([classes.index(v) for v in y])
    model = m.model

    def true_class_prob(inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            f = model(dict(inputs)).float().cpu().numpy()
        p = est.predict_proba(f)
        return torch.as_tensor(p[np.arange(len(col)), col], dtype=torch.float32)

    att = modality_ablation(true_class_prob, x)
    return [
        m.row
        | {
            "protocol": "attribution",
            "metric": "true_class_prob_drop",
            "value": float(att.values[mod].mean()),
            "unit": "probability",
            "subject": mod,
        }  # fmt: skip
        for mod in att.modalities
    ]
