"""Data: the SynthEO generator, task definitions and real-data sources.

``from mapex_analysis.data import SynthEO, get_task, TASKS``. Real datasets (through torchgeo)
live in :mod:`mapex_analysis.data.sources`, imported on demand because torchgeo is heavy.
"""

from mapex_analysis.data.syntheo import SynthEO, default_cache_dir, generate
from mapex_analysis.data.tasks import (
    LANDCOVER_CLASSES,
    SPLITS,
    TASKS,
    TaskError,
    TaskSpec,
    get_task,
    list_tasks,
)

__all__ = [
    "LANDCOVER_CLASSES",
    "SPLITS",
    "TASKS",
    "SynthEO",
    "TaskError",
    "TaskSpec",
    "default_cache_dir",
    "generate",
    "get_task",
    "list_tasks",
]
