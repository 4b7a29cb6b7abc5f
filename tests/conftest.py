"""Shared fixtures: copies of the smoke study in a temporary folder, and one run of it per
test session for the tests that only read its results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from fixtures.studies import write_smoke

from mapex_analysis.study.results import read_results
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


@pytest.fixture(scope="session")
def smoke_serial_one_thread(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The results table of the smoke study run serially with one torch thread (what each
    Dask worker and an ``OMP_NUM_THREADS=1`` command line use), for bit-identity checks."""
    study = load_study(write_smoke(tmp_path_factory.mktemp("smoke_1thread")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(study)
    finally:
        torch.set_num_threads(threads)
    return read_results(study.study_dir).reset_index(drop=True)
