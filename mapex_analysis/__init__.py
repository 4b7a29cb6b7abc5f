"""mapex-analysis: how much of a remote sensing foundation model does a task need?

The public API is declared in ``__init__.pyi`` (what type checkers and IDEs read) and loaded on
first use, so that importing a light module such as :mod:`mapex_analysis.study.schema` does not
load torch::

    from mapex_analysis import prune_experts, slim_width, count_macs, create_model
"""

import lazy_loader as _lazy

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
__all__ = [*__all__, "__version__"]
