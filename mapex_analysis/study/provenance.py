"""Provenance of a study run: the checkpoint fingerprints cell ids depend on, the environment,
and the resolved config written next to the results.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from mapex_analysis.files import atomic_write_text, sha256_file
from mapex_analysis.study.schema import Study

__all__ = ["checkpoint_fingerprint", "environment", "save_config"]

#: Packages whose versions ``environment.json`` records.
_PACKAGES = ("mapex-analysis", "torch", "timm", "torchgeo", "numpy", "scikit-learn", "pandas",
             "pydantic", "plotly", "captum", "fvcore")  # fmt: skip


def checkpoint_fingerprint(source: str) -> str:
    """SHA-256 prefixes of a checkpoint's ``spec.json`` and weights, so that re-pretrained
    weights invalidate the finished cells of a study instead of being silently reused.

    Args:
        source: A checkpoint directory.

    Returns:
        ``"<spec sha>:<weights sha>"`` (16 hex digits each; empty parts for missing files).
    """
    parts = []
    for name in ("spec.json", "weights.safetensors"):
        f = Path(source) / name
        parts.append(sha256_file(f, cached=True)[:16] if f.is_file() else "")
    return ":".join(parts)


def model_fingerprint(cfg: Any) -> str:
    """What identifies a study model's weights: the checkpoint fingerprint of a checkpoint
    source, plus the SHA-256 prefix of a ``weights:`` file (a torchgeo weight name as is).

    Args:
        cfg: The model's :class:`~mapex_analysis.study.schema.ModelConfig`.

    Returns:
        A string that changes when the weights change.
    """
    parts = [checkpoint_fingerprint(cfg.source) if cfg.is_checkpoint else ""]
    if cfg.weights is not None:
        w = Path(cfg.weights)
        parts.append(sha256_file(w, cached=True)[:16] if w.is_file() else str(cfg.weights))
    return "|".join(parts)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment() -> dict[str, Any]:
    """Versions, threads, platform and git commit of this run.

    Returns:
        A JSON-able dict.
    """
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "git_commit": _git_commit(),
        "versions": versions,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save_config(study: Study, study_dir: Path, *, device: str = "") -> None:
    """Write the resolved config (``config.resolved.yaml``) and ``environment.json``.

    Args:
        study: The validated study.
        study_dir: Output folder.
        device: Name of the device the models run on (``environment.json``'s ``device``).
    """
    resolved = study.model_dump(mode="json")
    if study.operators.slim is not None:
        resolved["operators"]["slim"]["widths"] = study.operators.slim.width_list()
    atomic_write_text(study_dir / "config.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
    atomic_write_text(study_dir / "environment.json",
                      json.dumps(environment() | {"device": device, "precision": study.precision},
                                 indent=2, sort_keys=True, default=str))  # fmt: skip
