"""Short fine-tuning of an encoder plus a linear head (the seed tables' "fine-tune" protocol).

A few epochs of AdamW on a copy of the encoder (the input model is never modified) and a new
head, for every task kind:

* ``multiclass`` / ``binary``: linear head on the pooled features (``model(x)``), cross-entropy
  (binary tasks use two logits), metric ``accuracy``;
* ``multilabel``: linear head, binary cross-entropy per label, metric macro ``map``;
* ``segmentation``: linear head on every patch token (modality-averaged, see
  :func:`mapex_analysis.eval.features.patch_tokens`), logits upsampled bilinearly to the label
  map, per-pixel cross-entropy, metric ``miou``; a model with ``forward_dense(x) -> (B, D, H,
  W)`` (the U-Net baseline) gets the linear head on every pixel of that map instead.

The MoE load-balancing loss is not added during fine-tuning (the encoder is adapted to one
task; balancing is a pretraining concern). Runs are deterministic for a ``seed`` on CPU.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mapex_analysis.eval.features import as_arrays, patch_tokens
from mapex_analysis.eval.metrics import accuracy, mean_iou, multilabel_map
from mapex_analysis.eval.stats import bootstrap_interval
from mapex_analysis.modalities import validate_modalities

__all__ = ["TASK_KINDS", "FinetuneResult", "FinetunedModel", "finetune"]

logger = logging.getLogger(__name__)

#: Task kinds :func:`finetune` trains.
TASK_KINDS = ("multiclass", "binary", "multilabel", "segmentation")
_METRIC = {"multiclass": "accuracy", "binary": "accuracy", "multilabel": "map",
           "segmentation": "miou"}  # fmt: skip


class FinetunedModel(nn.Module):
    """An encoder and its task head; ``forward(x)`` returns logits.

    Args:
        encoder: The (copied) encoder.
        head: Maps features ``(B, D)`` (or patch tokens ``(B, P, D)`` for segmentation) to
            logits.
        kind: Task kind.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, kind: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.kind = kind

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        """Logits ``(B, K)``, or ``(B, K, H, W)`` for segmentation."""
        if self.kind != "segmentation":
            return self.head(self.encoder(x))  # (B, K)
        if hasattr(self.encoder, "forward_dense"):  # per-pixel features (a U-Net)
            net: Any = self.encoder
            dense = net.forward_dense(x)  # (B, D, H, W)
            return self.head(dense.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, K, H, W)
        tokens = patch_tokens(self.encoder, x)  # (B, P, D)
        b, p, _ = tokens.shape
        g = int(round(p**0.5))
        logits = self.head(tokens).transpose(1, 2).reshape(b, -1, g, g)  # (B, K, g, g)
        h, w = next(iter(x.values())).shape[-2:]
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


@dataclass
class FinetuneResult:
    """The outcome of :func:`finetune`.

    Attributes:
        model: The fine-tuned :class:`FinetunedModel` (eval mode).
        metric: Name of the validation metric.
        value: Validation metric after the last epoch, in [0, 1].
        history: Per epoch ``{"epoch", "train_loss", metric}``.
        interval: 95 % bootstrap interval of ``value`` over the validation scenes
            (:func:`~mapex_analysis.eval.stats.bootstrap_interval`, resampling seeded by the
            fine-tuning seed).
    """

    model: FinetunedModel
    metric: str
    value: float
    history: list[dict[str, float]] = field(default_factory=list)
    interval: tuple[float, float] = (float("nan"), float("nan"))


def _task(data: Any, task: Any) -> tuple[str, int]:
    spec = task if task is not None else getattr(data, "task", None)
    if spec is None:
        raise ValueError("finetune needs a task: pass task= or data with a .task attribute")
    kind, num_classes = spec.kind, int(spec.num_classes)
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; valid: {', '.join(TASK_KINDS)}")
    return kind, num_classes


def _tensors(data: Any, modalities: Sequence[str], kind: str) -> tuple[dict[str, Tensor], Tensor]:
    arrays = as_arrays(data, modalities)
    if "label" not in arrays:
        raise ValueError("finetune needs labelled data; the split has no 'label'")
    y = arrays.pop("label")
    label = torch.as_tensor(y.astype(np.float32 if kind == "multilabel" else np.int64))
    return {m: torch.from_numpy(a) for m, a in arrays.items()}, label


def _loss(kind: str, logits: Tensor, y: Tensor) -> Tensor:
    if kind == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.cross_entropy(logits, y)


@torch.no_grad()
def _predict(
    model: FinetunedModel, x: dict[str, Tensor], y: Tensor, kind: str, bs: int
) -> tuple[str, np.ndarray]:
    """The metric name of ``kind`` and the predictions it scores (classes, or label
    probabilities for multi-label)."""
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        outs = [
            model({m: t[i : i + bs].to(dev) for m, t in x.items()}).float().cpu()
            for i in range(0, len(y), bs)
        ]
    logits = torch.cat(outs)
    if kind == "multilabel":
        return "map", torch.sigmoid(logits).numpy()
    return ("miou" if kind == "segmentation" else "accuracy"), logits.argmax(dim=1).numpy()


def _score(name: str, y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    if name == "map":
        return multilabel_map(y, pred)
    return mean_iou(y, pred, num_classes) if name == "miou" else accuracy(y, pred)


def finetune(
    model: nn.Module,
    train_data: Any,
    val_data: Any,
    *,
    modalities: Sequence[str],
    task: Any = None,
    epochs: int = 3,
    lr: float = 1e-3,
    head: str | nn.Module = "linear",
    batch_size: int = 64,
    weight_decay: float = 0.05,
    seed: int = 0,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` with a new head for a few epochs.

    Args:
        model: Encoder following the model contract (``forward(x) -> (B, D)``;
            ``tokenize``/``encode`` for segmentation). Not modified.
        train_data: Training split (dataset with ``arrays()`` and ``task``, or dict of arrays).
        val_data: Validation split, same form.
        modalities: Modalities to feed.
        task: Object with ``kind`` and ``num_classes`` (a ``TaskSpec``); default
            ``train_data.task``.
        epochs: Passes over the training split.
        lr: AdamW learning rate for encoder and head.
        head: ``"linear"`` (a new ``nn.Linear(num_features, outputs)``) or a module mapping
            features to logits.
        batch_size: Samples per step.
        weight_decay: AdamW weight decay.
        seed: Seeds the head initialisation and the shuffling.

    Returns:
        :class:`FinetuneResult` with the validation metric after the last epoch.

    Raises:
        ValueError: for an unknown task kind or head, unlabelled data, ``epochs < 1``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    modalities = validate_modalities(modalities, getattr(model, "modalities", None))
    kind, num_classes = _task(train_data, task)
    outputs = max(num_classes, 2) if kind == "binary" else num_classes
    torch.manual_seed(seed)
    encoder = copy.deepcopy(model)
    if isinstance(head, str):
        if head != "linear":
            raise ValueError(f"unknown head {head!r}; valid: 'linear' or an nn.Module")
        net: Any = model
        head_module: nn.Module = nn.Linear(int(net.num_features), outputs)
    else:
        head_module = copy.deepcopy(head)
    dev = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    ft = FinetunedModel(encoder, head_module.to(dev), kind)
    for p in ft.parameters():
        p.requires_grad_(True)
    x_tr, y_tr = _tensors(train_data, modalities, kind)
    x_va, y_va = _tensors(val_data, modalities, kind)
    opt = torch.optim.AdamW(ft.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    metric = _METRIC[kind]
    history: list[dict[str, float]] = []
    value = float("nan")
    for epoch in range(1, epochs + 1):
        ft.train()
        order = torch.randperm(len(y_tr), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = _loss(kind, ft({m: t[idx].to(dev) for m, t in x_tr.items()}), y_tr[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        name, pred = _predict(ft, x_va, y_va, kind, batch_size)
        value = _score(name, y_va.numpy(), pred, num_classes)
        history.append({"epoch": epoch, "train_loss": total / seen, metric: value})
        logger.info("finetune epoch %d: loss %.4f, val %s %.4f", epoch, total / seen, metric, value)
    ft.eval()
    interval = bootstrap_interval(name, y_va.numpy(), pred, num_classes=num_classes, seed=seed)
    return FinetuneResult(ft, metric, value, history, interval)
