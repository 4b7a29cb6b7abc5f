"""The package's structure: no import cycles, imports at the top, a resolvable public API, a
torch-free schema, and one model contract every model family follows."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from mapex_analysis.factory import create_model
from mapex_analysis.models.contract import FoundationModel

PKG = Path(__file__).resolve().parents[1] / "mapex_analysis"

#: Modules that may be imported inside a function: optional or heavy third-party packages used
#: by one code path (torchgeo's datasets pull in rasterio and fiona; dask.distributed only runs
#: with --cluster; dask-jobqueue is an extra).
LAZY_ALLOWED = ("torchgeo", "distributed", "dask_jobqueue")
#: The command line imports each command's subsystem when the command runs, so that
#: ``--help``, ``validate`` and ``job-script`` start without torch.
LAZY_FILES = {"cli.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """``(imported project module, at top level, line)`` for every import in a file,
    inside functions included."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for n in tree.body:  # imports under a top-level `if TYPE_CHECKING:` or `try:` are top level
        if isinstance(n, ast.If | ast.Try):
            top |= {id(c) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            out.append((t, id(node) in top, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_modules() -> None:
    # every import counts, the ones inside functions too (they no longer hide a cycle)
    assert _cycles(_graph()) == []


def test_no_import_cycles_between_subpackages() -> None:
    def unit(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "(root)"

    graph: dict[str, set[str]] = defaultdict(set)
    for src, targets in _graph().items():
        for t in targets:
            if unit(src) != unit(t) and unit(t) != "(root)":
                graph[unit(src)].add(unit(t))
    assert _cycles(graph) == []
    assert "ops" not in graph["models"]  # operators act on models, never the reverse


def test_imports_inside_functions_are_only_optional_heavy_dependencies() -> None:
    modules = _modules()
    bad = [
        f"{path.relative_to(PKG.parent)}:{line} imports {target}"
        for name, path in modules.items()
        if path.name not in LAZY_FILES
        for target, at_top, line in _imports(name, path, modules)
        if not at_top and not target.startswith(LAZY_ALLOWED)
    ]
    assert bad == []


def test_top_level_api_is_declared_for_type_checkers() -> None:
    stub = (PKG / "__init__.pyi").read_text()
    import mapex_analysis

    for name in mapex_analysis.__all__:
        if name != "__version__":
            assert f"import {name} as {name}" in stub
            assert getattr(mapex_analysis, name) is not None


# ------------------------------------------------------------------------- the model contract

#: One test-size model per family.
FAMILIES = ["mapex_test", "vit_mae_test", "dofa_test", "satmae_test", "timm_vit_test",
            "scalemae_test", "ssl4eo_test", "croma_test", "copernicusfm_test", "panopticon_test"]  # fmt: skip


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from mapex_analysis.measure.cost import example_inputs

    x = example_inputs(model, batch_size=2, seed=0)
    assert isinstance(x, dict)
    return x


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_follows_one_contract(name: str) -> None:
    torch.manual_seed(0)
    needs_fill = name.startswith(("ssl4eo", "croma"))  # 13-band models: B01, B09 not in SynthEO
    model = create_model(name, fill="zeros") if needs_fill else create_model(name)
    model.eval()
    assert isinstance(model, FoundationModel)
    x = _inputs(model)
    depth = len(model.forward_intermediates(x, intermediates_only=True))
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model(x)
        # timm's semantics: forward == forward_head(forward_features); pre_logits changes
        # nothing on a headless model
        assert torch.allclose(model.forward_head(tokens), pooled, atol=1e-6)
        assert torch.allclose(model.forward_head(tokens, pre_logits=True), pooled, atol=1e-6)
        assert pooled.shape == (2, model.num_features)
        final, inter = model.forward_intermediates(x, indices=[-1, 0, -1])
    assert torch.allclose(final, tokens, atol=1e-6)
    assert len(inter) == (1 if depth == 1 else 2)  # block order, duplicates once
    assert inter[-1].shape == tokens.shape
    last = model.forward_intermediates(x, indices=1, intermediates_only=True)
    # inter ran without gradients (a MoE's fused inference dispatch), last with: same products,
    # summed in another order
    assert len(last) == 1 and torch.allclose(last[0], inter[-1], atol=1e-6)
    with pytest.raises(IndexError, match="out of range"):
        model.forward_intermediates(x, indices=depth + 1)
    with pytest.raises(IndexError, match="out of range"):
        model.forward_intermediates(x, indices=[depth])


# ------------------------------------------------------------------ adding a measurement


def test_a_new_measurement_is_one_module_and_one_registry_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mapex_analysis.study import measures
    from mapex_analysis.study.results import read_results
    from mapex_analysis.study.runner import run_study
    from mapex_analysis.study.schema import StudyError, parse_study

    doc = {
        "name": "tokens",
        "models": {"m": {"source": "mapex_test"}},
        "data": {"n_train": 10, "n_test": 10, "img_size": 16},
        "tasks": ["landcover"],
        "operators": {"prune": {"sets": [["sar"]]}},
        "protocols": ["knn"],
        "measurements": ["tokens"],
        "output_dir": str(tmp_path),
    }
    with pytest.raises(StudyError, match=r"measurements\[0\]: unknown measurement 'tokens'"):
        parse_study(doc)
    # the one registry line (docs/architecture.md), pointing at the example's module
    line = measures.Measure("cost", "fixtures.token_measure:tokens_rows", "tokens per sample")
    monkeypatch.setitem(measures.MEASUREMENTS, "tokens", line)
    run_study(parse_study(doc))
    rows = read_results(tmp_path / "tokens")
    cost = rows[rows.protocol == "cost"]
    tokens = cost[cost.metric == "tokens"].set_index(["variant", "modalities"])["value"]
    # mapex_test at 16 px, patch 8: 4 patches per modality plus CLS
    assert tokens.to_dict() == {
        ("base", "rgb+red_edge+nir+swir+sar+ele"): 1 + 6 * 4,
        ("base", "sar"): 1 + 4,
        ("prune[sar]", "sar"): 1 + 4,
    }
    # only the selected measurement ran (plus what a pruning step always reports)
    assert sorted(cost.metric.unique()) == ["experts_kept", "experts_kept_share", "tokens",
                                            "traffic_to_removed"]  # fmt: skip
