"""Every exported name resolves; light modules stay light."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys

import pytest

import mapex_analysis

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(mapex_analysis.__path__, prefix="mapex_analysis.")
)


@pytest.mark.parametrize("name", ["mapex_analysis", *MODULES])
def test_every_name_in_all_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", [])
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names that do not resolve: {missing}"


def test_the_walk_found_the_package() -> None:
    # the parametrisation above is over real modules (a failed walk would test nothing)
    assert len(MODULES) > 40
    assert "mapex_analysis.measure.params" in MODULES
    assert "mapex_analysis.study.execution" in MODULES


def _loaded_after(imports: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of ``heavy`` a fresh interpreter has loaded after ``import <imports>``."""
    code = f"import sys, {imports}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return list(ast.literal_eval(out.stdout.strip()))


def test_execution_module_does_not_import_dask_until_a_cluster_is_asked_for() -> None:
    imports = "mapex_analysis.study.execution, mapex_analysis.study.runner"
    assert _loaded_after(imports, ("distributed", "torch")) == ["torch"]


def test_schema_imports_without_torch() -> None:
    # validating a study's structure needs no torch (the option sets live in options.py)
    assert _loaded_after("mapex_analysis.study.schema", ("torch", "timm", "torchgeo")) == []
