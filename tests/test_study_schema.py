"""Study schema: valid files load, malformed ones fail with the YAML path and allowed values."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mapex_analysis.study.schema import StudyError, load_study, parse_study

GOOD = {
    "name": "t",
    "models": {
        "mapex": {"source": "mapex_test"},
        "dense": {"source": "vit_mae_test", "role": "dense"},
    },
    "tasks": ["landcover"],
    "operators": {
        "prune": {"sets": ["each", ["sar", "rgb"]]},
        "slim": {"widths": [0.5, 0.25], "apply_to": ["base", "pruned"]},
    },
}


def _bad(**patch: object) -> dict:
    doc = copy.deepcopy(GOOD)
    for dotted, value in patch.items():
        node = doc
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return doc


def test_good_study_resolves_sets_and_paper_grid() -> None:
    study = parse_study(GOOD)
    # "each" over six modalities, then [rgb, sar] in canonical modality order -> 7 sets.
    sets = study.operators.prune.expanded(("rgb", "red_edge", "nir", "swir", "sar", "ele"))
    assert len(sets) == 7
    assert sets[-1] == ("rgb", "sar")
    paper = parse_study(_bad(operators__slim__widths="paper"))
    widths = paper.operators.slim.width_list()
    assert len(widths) == 31 and widths[0] == 1.0 and widths[-1] == 0.001


@pytest.mark.parametrize(
    ("patch", "path", "allowed"),
    [
        ({"operators__slim__widht": [0.5]}, "operators.slim.widht", "allowed keys: apply_to"),
        ({"seeds": "zero"}, "seeds", "valid list"),
        ({"models__mapex__source": "mapex_nope"}, "models.mapex.source", "registered models:"),
        ({"models__mapex__source": "models/missing_ckpt"}, "models.mapex.source", "spec.json"),
        ({"operators__slim__widths": [0.5, 0.2, 0.1, 1.5]}, "operators.slim.widths[3]", "(0, 1]"),
        ({"operators__prune__sets": ["each", []]}, "operators.prune.sets[1]", "empty modality set"),
        (
            {"models__mapex__slim_set_widths": [0.5, 0.0]},
            "models.mapex.slim_set_widths[1]",
            "(0, 1]",
        ),
        ({"protocols": ["knn", "svm"]}, "protocols[1]", "'knn', 'linear' or 'finetune'"),
        ({"tasks": ["landcover", "floods"]}, "tasks[1]", "valid tasks: landcover"),
    ],
)
def test_malformed_study_names_path(patch: dict, path: str, allowed: str) -> None:
    with pytest.raises(StudyError) as info:
        parse_study(_bad(**patch))
    msg = str(info.value)
    assert f"  {path}: " in msg
    assert allowed in msg


def test_yaml_on_key_trap_and_missing_file(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare `on:` key as boolean True: reported as an unknown key.
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(GOOD).replace("apply_to:", "on:"))
    with pytest.raises(StudyError, match=r"operators\.slim\.True: unknown key True"):
        load_study(p)
    with pytest.raises(StudyError, match="not found"):
        load_study(tmp_path / "absent.yaml")


def test_shipped_studies_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "studies"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert "smoke.yaml" in names and "prune_vs_slim.yaml" in names
    for p in root.glob("*.yaml"):
        doc = yaml.safe_load(p.read_text())
        # every checkpoint a shipped study names is shipped in models/ (a study that cannot
        # load is a failure, not a skip)
        ckpts = [m["source"] for m in doc["models"].values() if m["source"].startswith("models/")]
        assert [c for c in ckpts if not (root.parent / c / "spec.json").is_file()] == []
        study = load_study(p)
        assert study.name == p.stem
    # a study naming a checkpoint that does not exist fails, naming the YAML path
    bad = {"name": "b", "tasks": ["landcover"], "models": {"m": {"source": "models/absent"}}}
    with pytest.raises(
        StudyError, match=r"models\.m\.source: checkpoint directory 'models/absent'"
    ):
        parse_study(bad)


def test_compare_with_names_a_model_of_the_study() -> None:
    ok = _bad(models__dense__compare_with="mapex")
    assert parse_study(ok).models["dense"].compare_with == "mapex"
    with pytest.raises(
        StudyError, match=r"dense\.compare_with: unknown model 'nope'; models: mapex, dense"
    ):
        parse_study(_bad(models__dense__compare_with="nope"))
