"""Other remote sensing foundation models behind one contract (see :mod:`mapex_analysis.models.adapters.base`).

Importing this package registers every adapter with :mod:`mapex_analysis.models.registry`.
"""

from mapex_analysis.models.adapters import (  # noqa: F401  (imports register the models)
    copernicusfm,
    croma,
    dofa,
    panopticon,
    satmae,
    scalemae,
    ssl4eo,
    timm_vit,
)
from mapex_analysis.models.adapters.base import FILL_POLICIES, Adapter, Normalization
from mapex_analysis.models.weights import WeightsError, WeightsReport

__all__ = ["FILL_POLICIES", "Adapter", "Normalization", "WeightsError", "WeightsReport"]
