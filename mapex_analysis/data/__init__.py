"""Data: the SynthEO generator, task definitions and real-data sources.

``from mapex_analysis.data import SynthEO, get_task, TASKS`` (names in ``__init__.pyi``, loaded
on first use: the task table needs no torch). Real datasets (through torchgeo) live in
:mod:`mapex_analysis.data.sources`.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
