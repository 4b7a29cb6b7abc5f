"""One on-disk cache for arrays: SynthEO scenes and frozen features both use it.

An entry is one ``.npz`` file named by a SHA-256 of its JSON-able ``meta`` (what determines the
arrays: generator config and version, or model variant, data and pooling), and it stores the
``meta`` it was written for: an entry whose stored meta differs (a hash collision, an edited
file) or that cannot be read (a truncated copy) is ignored with a warning and recomputed, never
trusted. Writes are atomic (:func:`mapex_analysis.files.atomic_write`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mapex_analysis.files import atomic_write

__all__ = ["ArrayCache"]

logger = logging.getLogger(__name__)


class ArrayCache:
    """A folder of ``.npz`` entries keyed by their meta.

    Args:
        folder: Where entries live (created on the first write).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(meta: Mapping[str, Any]) -> str:
        """24 hex digits of the SHA-256 of ``meta`` as sorted JSON."""
        blob = json.dumps(meta, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def path(self, meta: Mapping[str, Any], prefix: str = "entry") -> Path:
        """``<folder>/<prefix>-<key>.npz``."""
        return self.folder / f"{prefix}-{self.key(meta)}.npz"

    def load(self, meta: Mapping[str, Any], prefix: str = "entry") -> dict[str, np.ndarray] | None:
        """The arrays stored for ``meta``, or ``None`` (absent, unreadable or another meta)."""
        path = self.path(meta, prefix)
        if not path.is_file():
            return None
        want = json.dumps(meta, sort_keys=True, default=str)
        try:
            with np.load(path) as z:
                if str(z["__meta__"]) != want:
                    logger.warning("cache entry %s holds other data; recomputing", path)
                    return None
                return {name: z[name] for name in z.files if name != "__meta__"}
        except (OSError, ValueError, KeyError) as err:
            logger.warning("unreadable cache entry %s (%s); recomputing", path, err)
            return None

    def save(
        self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], prefix: str = "entry"
    ) -> Path:
        """Store ``arrays`` for ``meta`` atomically; returns the entry's path."""
        path = self.path(meta, prefix)
        payload: dict[str, Any] = dict(arrays)
        payload["__meta__"] = np.array(json.dumps(meta, sort_keys=True, default=str))
        with atomic_write(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **payload)
        return path
