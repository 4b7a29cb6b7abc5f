"""Shared fixtures: copies of the smoke study in a temporary folder, and one run of it per
test session for the tests that only read its results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures.studies import write_smoke

from mapex_analysis.study.runner import run_study
from mapex_analysis.study.schema import load_study


@pytest.fixture
def smoke_yaml(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``smoke_yaml(**overrides)`` writes a smoke study into this test's folder."""
    return lambda **overrides: write_smoke(tmp_path, **overrides)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One uninterrupted serial run of the smoke study: ``(study, RunSummary)``. Tests must
    only read its folder."""
    study = load_study(write_smoke(tmp_path_factory.mktemp("smoke_run")))
    return study, run_study(study)
