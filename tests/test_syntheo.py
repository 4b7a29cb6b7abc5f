"""SynthEO: the data contract, determinism, cache, few-shot split, physics and complementarity."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mapex_analysis.data import TASKS, SynthEO, TaskError, get_task
from mapex_analysis.data import syntheo as syntheo_mod
from mapex_analysis.data.syntheo import CLOUD_SPECTRUM, S2_SPECTRA, SceneConfig, generate
from mapex_analysis.data.tasks import LANDCOVER_CLASSES
from mapex_analysis.modalities import DEFAULT_MODALITIES, ModalityError, check_units

MODS = list(DEFAULT_MODALITIES)
CHANNELS = {"rgb": 3, "red_edge": 3, "nir": 1, "swir": 3, "sar": 2, "ele": 1}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def _band_stats(arrays: dict[str, np.ndarray], mods: list[str]) -> np.ndarray:
    """Per-scene, per-band mean, std and 10/50/90 % quantiles: the 'simple probe' features."""
    out = []
    for m in mods:
        x = arrays[m].reshape(arrays[m].shape[0], arrays[m].shape[1], -1)
        out += [x.mean(-1), x.std(-1), *np.quantile(x, [0.1, 0.5, 0.9], axis=-1)]
    return np.concatenate(out, axis=1)


def _probe(train: dict[str, np.ndarray], test: dict[str, np.ndarray], mods: list[str]) -> float:
    """Test accuracy (%) of a logistic regression on band statistics of ``mods``."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(_band_stats(train, mods), train["label"])
    return 100.0 * float((clf.predict(_band_stats(test, mods)) == test["label"]).mean())


@pytest.mark.parametrize(
    ("task", "label_shape", "label_dtype"),
    [
        ("landcover", (), torch.int64),
        ("landcover_multilabel", (9,), torch.float32),
        ("flood", (), torch.int64),
        ("wildfire", (), torch.int64),
        ("segmentation", (32, 32), torch.int64),
    ],
)
def test_sample_contract(task: str, label_shape: tuple[int, ...], label_dtype: torch.dtype) -> None:
    ds = SynthEO(task, "val", n=40, cache=False)
    assert len(ds) == 40
    assert ds.modalities == DEFAULT_MODALITIES
    assert ds.task == get_task(task)
    item = ds[3]
    assert set(item) == {*MODS, "label"}
    for m in MODS:
        assert item[m].shape == (CHANNELS[m], 32, 32)
        assert item[m].dtype == torch.float32
    assert tuple(item["label"].shape) == label_shape
    assert item["label"].dtype == label_dtype
    arrays = ds.arrays()
    for m in MODS:
        assert arrays[m].shape == (40, CHANNELS[m], 32, 32)
        assert arrays[m].dtype == np.float32
        # physical units: reflectance 0-1.5, dB in [-25, 0], metres >= 0
        check_units(m, torch.from_numpy(arrays[m]), where=f"SynthEO {task}")
    assert float(arrays["sar"].min()) >= -25.0 and float(arrays["sar"].max()) <= 0.0
    assert float(arrays["ele"].min()) >= 0.0


def test_labels_match_the_land_cover_map() -> None:
    seg = SynthEO("segmentation", "val", n=64, cache=False)
    maps = seg.arrays()["label"]  # (64, 32, 32)
    counts = np.stack([np.bincount(m.ravel(), minlength=9) for m in maps])
    # the scene's dominant class is the most frequent class of its map
    np.testing.assert_array_equal(counts.argmax(1), seg.dominant_class)
    ml = SynthEO("landcover_multilabel", "val", n=64, cache=False)
    y = ml.arrays()["label"]
    assert set(np.unique(y).tolist()) <= {0.0, 1.0}
    # the dominant class covers >= 1/9 of the scene, so it is always among the labels
    assert y[np.arange(64), ml.dominant_class].tolist() == [1.0] * 64
    lc = SynthEO("landcover", "train", cache=False)
    counts = np.bincount(lc.arrays()["label"], minlength=9)
    # uniform primary class: each of 9 classes has 2000/9 = 222 +- ~50 scenes
    assert counts.min() > 150 and counts.max() < 300


def test_pretrain_is_unlabelled() -> None:
    ds = SynthEO("pretrain", "train", n=10, cache=False, modalities=["sar", "ele"])
    assert set(ds[0]) == {"sar", "ele"}
    assert set(ds.arrays()) == {"sar", "ele"}
    with pytest.raises(TaskError, match="'pretrain' is unlabelled"):
        SynthEO("pretrain", "fewshot", cache=False)


def test_modality_selection_and_order() -> None:
    full = SynthEO("landcover", "val", n=20, cache=False)
    sub = SynthEO("landcover", "val", n=20, cache=False, modalities=["sar", "rgb"])
    assert list(sub[0]) == ["sar", "rgb", "label"]
    np.testing.assert_array_equal(sub.arrays()["rgb"], full.arrays()["rgb"])
    assert sub.bands == {"sar": ("VV", "VH"), "rgb": ("B04", "B03", "B02")}
    # rgb channel 0 is B04 (red): for vegetation-dominated scenes red < green (chlorophyll)
    veg = np.isin(full.dominant_class, [1, 2, 3, 4])
    rgb = full.arrays()["rgb"][veg].mean(axis=(0, 2, 3))
    assert rgb[0] < rgb[1]


def test_same_seed_bit_identical_across_processes() -> None:
    a = SynthEO("flood", "train", n=300, seed=7, cache=False).arrays()
    b = SynthEO("flood", "train", n=300, seed=7, cache=False).arrays()
    assert _digest(a) == _digest(b)
    code = (
        "import hashlib, numpy as np\n"
        "from mapex_analysis.data import SynthEO\n"
        "a = SynthEO('flood', 'train', n=300, seed=7, cache=False).arrays()\n"
        "h = hashlib.sha256()\n"
        "for k in sorted(a):\n"
        "    h.update(k.encode()); h.update(np.ascontiguousarray(a[k]).tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(a)
    c = SynthEO("flood", "train", n=300, seed=8, cache=False).arrays()
    for m in MODS:
        assert not np.array_equal(a[m], c[m])
    # splits are different streams too
    v = SynthEO("flood", "val", n=300, seed=7, cache=False).arrays()
    assert not np.array_equal(a["rgb"], v["rgb"])


def test_thread_count_does_not_change_the_data() -> None:
    cfg = SceneConfig("landcover", "train", 3, 3 * 256 + 10, 32, 0.3)  # 4 chunks, last partial
    one = generate(cfg, workers=1)
    two = generate(cfg, workers=2)
    assert one["rgb"].shape == (778, 3, 32, 32)
    assert _digest(one) == _digest(two)


def test_larger_n_extends_a_split() -> None:
    small = SynthEO("wildfire", "test", n=100, cache=False).arrays()
    big = SynthEO("wildfire", "test", n=600, cache=False).arrays()
    for k in small:
        np.testing.assert_array_equal(big[k][:100], small[k])


def test_cache_round_trip(tmp_path, monkeypatch) -> None:
    ds = SynthEO("landcover", "val", n=50, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    key = SceneConfig("landcover", "val", 0, 50, 32, 0.0).key()
    assert files == [f"landcover-val-{key}.npz"]

    def _fail(cfg: SceneConfig) -> dict[str, np.ndarray]:
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr(syntheo_mod, "generate", _fail)
    again = SynthEO("landcover", "val", n=50, cache_dir=tmp_path)
    assert _digest(again.arrays()) == _digest(ds.arrays())
    # a different config is a different key, never a stale hit
    assert SceneConfig("landcover", "val", 0, 50, 32, 0.5).key() != key
    monkeypatch.setenv("MAPEX_CACHE", str(tmp_path / "env"))
    assert syntheo_mod.default_cache_dir() == tmp_path / "env" / "syntheo"


def test_fewshot_split() -> None:
    train = SynthEO("landcover", "train", n=500, cache=False)
    few = SynthEO("landcover", "fewshot", n=500, shots=3, cache=False)
    # 3 shots x 9 classes = 27 scenes, drawn from the train split
    assert len(few) == 27
    assert np.bincount(few.arrays()["label"], minlength=9).tolist() == [3] * 9
    assert few.indices is not None
    np.testing.assert_array_equal(few.arrays()["rgb"], train.arrays()["rgb"][few.indices])
    again = SynthEO("landcover", "fewshot", n=500, shots=3, cache=False)
    np.testing.assert_array_equal(again.indices, few.indices)
    flood = SynthEO("flood", "fewshot", n=300, shots=4, cache=False)
    assert np.bincount(flood.arrays()["label"]).tolist() == [4, 4]


def test_clouds_hide_optical_but_not_sar() -> None:
    clear = generate(SceneConfig("segmentation", "val", 0, 128, 32, 0.0))
    cloudy = generate(SceneConfig("segmentation", "val", 0, 128, 32, 1.0))
    for m in ("sar", "ele", "label"):
        np.testing.assert_array_equal(clear[m], cloudy[m])
    assert not np.array_equal(clear["rgb"], cloudy["rgb"])
    # Pixels turned bright by cloud have B11 (swir channel 0) near the cloud's 0.48 ...
    changed = np.abs(cloudy["rgb"][:, 0] - clear["rgb"][:, 0]) > 0.3  # (N, H, W)
    assert changed.mean() > 0.2
    b11 = cloudy["swir"][:, 0][changed]
    assert abs(float(np.median(b11)) - float(CLOUD_SPECTRUM[8])) < 0.08
    # ... while snow pixels are as bright in the visible (B04 table value 0.85) but dark in
    # SWIR (B11 table value 0.08): SWIR tells snow from cloud.
    snow = clear["label"] == LANDCOVER_CLASSES.index("snow_ice")  # (N, H, W)
    assert float(np.median(clear["rgb"][:, 0][snow])) > 0.6
    assert float(np.median(clear["swir"][:, 0][snow])) < 0.2


def test_spectra_tables_encode_the_class_physics() -> None:
    idx = {c: i for i, c in enumerate(LANDCOVER_CLASSES)}
    s = S2_SPECTRA
    # lowland and alpine grassland are identical in every optical band (elevation-only pair)
    np.testing.assert_array_equal(s[idx["lowland_grassland"]], s[idx["alpine_grassland"]])
    # broadleaf vs conifer: same visible (B02-B04), NIR B08 differs by 0.42 - 0.26 = 0.16
    np.testing.assert_array_equal(s[idx["broadleaf_forest"], :3], s[idx["conifer_forest"], :3])
    assert s[idx["broadleaf_forest"], 6] - s[idx["conifer_forest"], 6] == pytest.approx(0.16)
    # snow: B03 0.88 vs B11 0.08, NDSI = (0.88 - 0.08) / (0.88 + 0.08) = 0.833
    b03, b11 = s[idx["snow_ice"], 1], s[idx["snow_ice"], 8]
    assert (b03 - b11) / (b03 + b11) == pytest.approx(0.8333, abs=1e-3)


@pytest.fixture(scope="module")
def landcover_probe_data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    train = SynthEO("landcover", "train", n=2000, cache=False).arrays()
    test = SynthEO("landcover", "test", n=1000, cache=False).arrays()
    return train, test


def test_modality_complementarity(landcover_probe_data) -> None:
    train, test = landcover_probe_data
    acc = {m: _probe(train, test, [m]) for m in MODS}
    acc_all = _probe(train, test, MODS)
    chance = 100.0 / len(LANDCOVER_CLASSES)  # 11.1 %
    # measured (seed 0): rgb 41.6, red_edge 54.0, nir 42.2, swir 63.8, sar 56.4, ele 35.3,
    # all six 87.1 (chance 11.1)
    for m, a in acc.items():
        assert a > chance + 20.0, (m, a)
    assert max(acc.values()) - min(acc.values()) >= 10.0, acc
    assert acc_all - max(acc.values()) >= 3.0, (acc, acc_all)
    assert acc_all < 99.0  # informative, not saturated


def test_elevation_only_pair(landcover_probe_data) -> None:
    train, test = landcover_probe_data
    pair = [
        LANDCOVER_CLASSES.index("lowland_grassland"),
        LANDCOVER_CLASSES.index("alpine_grassland"),
    ]
    tr = {k: v[np.isin(train["label"], pair)] for k, v in train.items()}
    te = {k: v[np.isin(test["label"], pair)] for k, v in test.items()}
    assert len(te["label"]) > 150  # ~2/9 of 1000 scenes
    # measured (seed 0, 224 test scenes): ele 91.1 %, rgb 51.3 % (chance 50 %)
    assert _probe(tr, te, ["ele"]) >= 80.0
    assert _probe(tr, te, ["rgb"]) <= 65.0


@pytest.mark.parametrize(
    ("task", "strong", "margin"), [("flood", "sar", 5.0), ("wildfire", "swir", 8.0)]
)
def test_event_tasks_need_the_right_modality(task: str, strong: str, margin: float) -> None:
    train = SynthEO(task, "train", n=2000, cache=False).arrays()
    test = SynthEO(task, "test", n=1000, cache=False).arrays()
    # measured (seed 0): flood sar 87.8 vs rgb 75.5; wildfire swir 82.2 vs rgb 67.2 (chance 50)
    acc_strong = _probe(train, test, [strong])
    acc_rgb = _probe(train, test, ["rgb"])
    assert acc_strong - acc_rgb >= margin, (acc_strong, acc_rgb)


def test_bad_input_names_the_bad_value() -> None:
    with pytest.raises(TaskError, match=r"unknown task 'lancover'; valid tasks: landcover,"):
        SynthEO("lancover")
    with pytest.raises(TaskError, match=r"unknown split 'training'; valid splits: train, val"):
        SynthEO("landcover", "training")
    with pytest.raises(ModalityError, match=r"unknown modality 'lidar'; valid modalities: rgb"):
        SynthEO("landcover", modalities=["rgb", "lidar"], cache=False)
    with pytest.raises(ModalityError, match="empty modality selection"):
        SynthEO("landcover", modalities=[], cache=False)
    with pytest.raises(ValueError, match=r"clouds must be a probability in \[0, 1\], got 1.5"):
        SynthEO("landcover", clouds=1.5, cache=False)
    with pytest.raises(IndexError, match="index 10 out of range for a split of 10 scenes"):
        SynthEO("landcover", "val", n=10, cache=False)[10]
    assert sorted(TASKS) == sorted(
        ["landcover", "landcover_multilabel", "flood", "wildfire", "segmentation", "pretrain"]
    )


def test_cli_lists_tasks() -> None:
    from click.testing import CliRunner

    from mapex_analysis.cli import main
    from mapex_analysis.data.tasks import task_table

    rows = {r["task"]: r for r in task_table()}
    assert rows["flood"]["clouds"] == "1" and rows["landcover"]["classes"] == 9
    assert rows["pretrain"]["kind"] == "unlabelled"
    result = CliRunner().invoke(main, ["list", "tasks"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in TASKS:
        assert name in result.output
