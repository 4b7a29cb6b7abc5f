"""Studies: the validated YAML schema, the grid, the resumable runner and the results table.

Names in ``__init__.pyi``, loaded on first use: validating a study (:mod:`.schema`) needs no
torch.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
