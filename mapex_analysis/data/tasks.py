"""Task definitions: what a label is, how many classes, which splits exist.

A task is data, not code: :class:`TaskSpec` names the label kind (``multiclass``, ``multilabel``,
``binary``, ``segmentation``, or ``unlabelled`` for pretraining scenes), the number of classes and
their names. Probes, fine-tuning and the study runner pick their head and metric from ``kind``.

The land-cover legend is ESA-WorldCover-like (Zanaga et al., 2022, "ESA WorldCover 10 m 2021
v200"), refined so that some class pairs are separable by one modality only: broadleaf vs conifer
forest (red edge / NIR), lowland vs alpine grassland (elevation only), grassland vs wetland (SAR, SWIR), built-up vs bare (SAR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "LANDCOVER_CLASSES",
    "SPLITS",
    "TASKS",
    "TaskError",
    "TaskKind",
    "TaskSpec",
    "get_task",
    "list_tasks",
    "task_table",
    "validate_split",
]

TaskKind = Literal["multiclass", "multilabel", "binary", "segmentation", "unlabelled"]

#: The splits every SynthEO task provides; ``fewshot`` is k scenes per class drawn from ``train``.
SPLITS: tuple[str, ...] = ("train", "val", "test", "fewshot")

#: Land-cover legend of SynthEO, in label order.
LANDCOVER_CLASSES: tuple[str, ...] = (
    "water",
    "broadleaf_forest",
    "conifer_forest",
    "lowland_grassland",
    "alpine_grassland",
    "wetland",
    "built_up",
    "bare_soil",
    "snow_ice",
)


class TaskError(ValueError):
    """An unknown task or split name."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task's label is.

    Attributes:
        name: Task name (``landcover``, ``flood``, ...).
        kind: Label kind: ``multiclass`` (``LongTensor()``), ``multilabel`` (``FloatTensor(K)``
            of 0/1), ``binary`` (``LongTensor()`` in {0, 1}), ``segmentation``
            (``LongTensor(H, W)``) or ``unlabelled`` (no ``label`` key).
        num_classes: Number of classes (2 for binary, 0 for unlabelled).
        class_names: Class names in label order.
        description: One line for tables and reports.
        clouds: Default probability that a scene carries clouds (0 = never).
        ignore_index: Segmentation label value that marks pixels without a label (no data);
            they are left out of probe training and of every metric. ``None``: every pixel
            is labelled.
    """

    name: str
    kind: TaskKind
    num_classes: int
    class_names: tuple[str, ...]
    description: str = ""
    clouds: float = 0.0
    ignore_index: int | None = None


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "landcover",
            "multiclass",
            len(LANDCOVER_CLASSES),
            LANDCOVER_CLASSES,
            "scene label = dominant land-cover class (as ben-ge does with WorldCover fractions)",
        ),
        TaskSpec(
            "landcover_multilabel",
            "multilabel",
            len(LANDCOVER_CLASSES),
            LANDCOVER_CLASSES,
            "every land-cover class covering >= 5 % of the scene",
        ),
        TaskSpec(
            "flood",
            "binary",
            2,
            ("no_flood", "flood"),
            "flood water spreading over low ground, under cloud (SAR sees it, optical mostly not)",
            clouds=1.0,
        ),
        TaskSpec(
            "wildfire",
            "binary",
            2,
            ("no_burn", "burn_scar"),
            "fresh burn scar (dark in visible like water and conifers, distinct in NIR/SWIR)",
        ),
        TaskSpec(
            "segmentation",
            "segmentation",
            len(LANDCOVER_CLASSES),
            LANDCOVER_CLASSES,
            "per-pixel land-cover class (majority class of each pixel's mixture)",
        ),
        TaskSpec(
            "pretrain",
            "unlabelled",
            0,
            (),
            "unlabelled land-cover scenes with occasional clouds, for masked autoencoding",
            clouds=0.2,
        ),
    ]
}


def list_tasks() -> list[str]:
    """Names of all tasks, in definition order."""
    return list(TASKS)


def get_task(name: str) -> TaskSpec:
    """Look up a task by name.

    Args:
        name: A task name, e.g. ``"landcover"``.

    Returns:
        The task's :class:`TaskSpec`.

    Raises:
        TaskError: naming the unknown task and listing the valid ones.
    """
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise TaskError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def validate_split(split: str) -> str:
    """Check a split name.

    Args:
        split: One of :data:`SPLITS`.

    Returns:
        ``split`` unchanged.

    Raises:
        TaskError: naming the unknown split and listing the valid ones.
    """
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def task_table() -> list[dict[str, object]]:
    """Rows (task, kind, classes, default clouds, description) for ``mapex-study list tasks``."""
    return [
        {
            "task": t.name,
            "kind": t.kind,
            "classes": t.num_classes,
            "clouds": f"{t.clouds:g}",
            "description": t.description,
        }
        for t in TASKS.values()
    ]
