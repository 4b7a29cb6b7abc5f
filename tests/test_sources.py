"""Real-data adapters: tiny fixtures in each dataset's on-disk format, loaded through torchgeo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures.data_sources import (
    BEN_S1_DB,
    MMEARTH_ELEVATION,
    MMEARTH_S1,
    MMFLOOD_DEM,
    ben_dn,
    eurosat_dn,
    mmearth_dn,
    write_bigearthnet_v2,
    write_eurosat,
    write_mmearth,
    write_mmflood,
)
from torchgeo.datasets import DatasetNotFoundError

from mapex_analysis.data.sources import (
    SOURCES,
    BigEarthNetV2Source,
    EuroSATSource,
    MMEarthSource,
    MMFloodSource,
    linear_to_db,
    open_source,
    select_modalities,
)
from mapex_analysis.data.tasks import TaskError
from mapex_analysis.modalities import BandError, ModalityError, check_units


def _const(x: torch.Tensor) -> list[float]:
    """The per-channel value of a spatially constant (C, H, W) tensor."""
    return x.reshape(x.shape[0], -1)[:, 0].tolist()


@pytest.fixture()
def eurosat_root(tmp_path: Path) -> Path:
    write_eurosat(tmp_path)
    return tmp_path


def test_eurosat_bands_in_modality_order(eurosat_root: Path) -> None:
    ds = EuroSATSource(eurosat_root, "train")
    assert ds.modalities == ("rgb", "red_edge", "nir", "swir")
    assert len(ds) == 2 and ds.task.class_names == ("AnnualCrop", "Forest")
    s = ds[0]
    # file order B01..B12, B8A: DN = 100 * (position + 1) + row; reflectance = DN / 10,000
    # rgb = (B04, B03, B02) = (400, 300, 200) + row -> 0.04, 0.03, 0.02 on row 0
    assert _const(s["rgb"]) == pytest.approx([0.04, 0.03, 0.02])
    assert _const(s["red_edge"]) == pytest.approx([0.05, 0.06, 0.07])
    assert _const(s["nir"]) == pytest.approx([0.08])
    # swir = (B11, B12, B8A): B8A is stored last (position 12) -> 1,300 DN -> 0.13
    assert _const(s["swir"]) == pytest.approx([0.11, 0.12, 0.13])
    # rows keep their orientation: row 5 of B04 is (400 + 5) / 10,000
    expected_b04 = torch.from_numpy(eurosat_dn("B04").astype("float32")) / 10_000
    torch.testing.assert_close(s["rgb"][0], expected_b04)
    assert s["label"].dtype == torch.int64 and s["label"].item() == 0
    assert ds[1]["label"].item() == 1
    for m in ds.modalities:
        check_units(m, s[m])


def test_eurosat_subset_of_modalities_and_missing_bands(eurosat_root: Path) -> None:
    ds = EuroSATSource(eurosat_root, "val", modalities=["swir", "rgb"])
    s = ds[0]
    assert list(s) == ["swir", "rgb", "label"]
    # the val file is the class's second file: every DN is 1 higher
    assert _const(s["rgb"]) == pytest.approx([0.0401, 0.0301, 0.0201])
    # the 60 m bands are modalities too: coastal = B01, atmospheric = (B09, B10)
    extra = EuroSATSource(eurosat_root, "train", modalities=["coastal", "atmospheric"])[0]
    assert _const(extra["coastal"]) == pytest.approx([0.01])
    assert _const(extra["atmospheric"]) == pytest.approx([0.09, 0.10])
    assert EuroSATSource.covered_modalities() == (
        "rgb",
        "red_edge",
        "nir",
        "swir",
        "coastal",
        "atmospheric",
    )
    with pytest.raises(BandError, match=r"EuroSAT lacks band\(s\) VV, VH of modality 'sar'"):
        EuroSATSource(eurosat_root, modalities=["rgb", "sar"])
    with pytest.raises(BandError, match=r"lacks band\(s\) elevation of modality 'ele'"):
        EuroSATSource(eurosat_root, modalities=["ele"])


def test_bigearthnet_v2_s1_s2_and_multilabel(tmp_path: Path) -> None:
    write_bigearthnet_v2(tmp_path)
    ds = BigEarthNetV2Source(tmp_path, "val")
    assert len(ds) == 1
    assert ds.modalities == ("rgb", "red_edge", "nir", "swir", "sar")
    s = ds[0]
    # S2 files sorted B01..B08, B8A, B09, B11, B12; DN = 1000 + 10 * position
    assert _const(s["rgb"]) == pytest.approx([0.103, 0.102, 0.101])  # B04, B03, B02
    assert _const(s["swir"]) == pytest.approx([ben_dn("B11") / 1e4, ben_dn("B12") / 1e4, 0.108])
    # S1 files are stacked VH, VV by torchgeo; the adapter returns (VV, VH) in dB
    assert _const(s["sar"]) == [BEN_S1_DB["VV"], BEN_S1_DB["VH"]] == [-8.0, -15.0]
    assert s["sar"].shape == (2, 120, 120)
    label = s["label"]
    assert label.dtype == torch.float32 and label.shape == (19,)
    names = ds.task.class_names
    hot = {names[i] for i in torch.nonzero(label).flatten().tolist()}
    assert hot == {"Broad-leaved forest", "Inland waters"}
    only_sar = BigEarthNetV2Source(tmp_path, "test", modalities=["sar"])
    assert list(only_sar[0]) == ["sar", "label"]
    assert _const(only_sar[0]["sar"]) == [-8.0, -15.0]


def test_mmearth_denormalised_to_physical_units(tmp_path: Path) -> None:
    write_mmearth(tmp_path)
    ds = MMEarthSource(tmp_path)
    assert len(ds) == 3
    for i in (0, 1):  # tile 0 is L2A, tile 1 L1C: each is de-normalised with its own stats
        s = ds[i]
        # MMEarth stores B1..B7, B8A, B8, B9..B12 with DN = 500 + 100 * position
        assert _const(s["rgb"]) == pytest.approx([0.08, 0.07, 0.06], abs=1e-5)
        assert _const(s["nir"]) == pytest.approx([mmearth_dn("B8") / 1e4], abs=1e-5)
        assert _const(s["swir"]) == pytest.approx([0.16, 0.17, 0.12], abs=1e-5)
        assert _const(s["sar"]) == pytest.approx([-9.5, -16.25], abs=1e-3)
        assert _const(s["ele"]) == pytest.approx([MMEARTH_ELEVATION], abs=1e-2)
    # WorldCover 10 (tree cover) -> 0, 80 (water) -> 7; left half water
    label = ds[0]["label"]
    assert label.shape == (8, 8)
    assert label[:, :4].unique().tolist() == [7] and label[:, 4:].unique().tolist() == [0]
    desc = MMEarthSource(tmp_path, modalities=["sar"], orbit="desc", labels=False)
    assert list(desc[2]) == ["sar"]
    assert _const(desc[2]["sar"]) == pytest.approx(
        [MMEARTH_S1["desc"]["VV"], MMEARTH_S1["desc"]["VH"]], abs=1e-3
    )
    with pytest.raises(TaskError, match=r"MMEarth has no split 'val'; valid splits: train"):
        MMEarthSource(tmp_path, "val")
    with pytest.raises(ValueError, match=r"unknown MMEarth subset 'MMEarth1k'; valid: MMEarth,"):
        MMEarthSource(tmp_path, subset="MMEarth1k")


def test_mmflood_linear_sar_to_db_chips(tmp_path: Path) -> None:
    write_mmflood(tmp_path)
    ds = MMFloodSource(tmp_path, "train", img_size=32)
    # one 64 x 64 tile -> a 2 x 2 grid of 32 px chips
    assert len(ds) == 4
    flooded = 0
    for i in range(len(ds)):
        s = ds[i]
        assert list(s) == ["sar", "ele", "label"]
        # linear 0.1 -> -10 dB (VV), 0.01 -> -20 dB (VH)
        assert _const(s["sar"]) == pytest.approx([-10.0, -20.0], abs=1e-4)
        assert _const(s["ele"]) == pytest.approx([MMFLOOD_DEM])
        assert s["label"].shape == (32, 32)
        flooded += int(s["label"].sum())
    # the southern half of the tile is flooded: 64 * 32 = 2,048 pixels
    assert flooded == 2048
    with pytest.raises(BandError, match=r"MMFlood lacks band\(s\) B04, B03, B02 of modality 'rgb'"):
        MMFloodSource(tmp_path, modalities=["rgb"])


def test_linear_to_db_and_select() -> None:
    x = torch.tensor([1.0, 0.1, 1e-3, 0.0])
    # 10 log10: 0, -10, -30 -> clipped -25, 0 -> -25
    assert linear_to_db(x).tolist() == pytest.approx([0.0, -10.0, -25.0, -25.0])
    img = torch.arange(3.0).view(3, 1, 1)
    out = select_modalities(img, ["VH", "elevation", "VV"], ["sar"], where="X")
    assert out["sar"].flatten().tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="image has 3 channels but 2 band names"):
        select_modalities(img, ["VV", "VH"], ["sar"], where="X")


def test_missing_root_and_bad_names(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for name in SOURCES:
        with pytest.raises(DatasetNotFoundError, match=f"Dataset not found in `root='{missing}'"):
            open_source(name, missing)
    with pytest.raises(KeyError, match="unknown data source 'sen12ms'; valid sources: eurosat"):
        open_source("sen12ms", tmp_path)
    with pytest.raises(TaskError, match=r"EuroSAT has no split 'fewshot'; valid splits: train"):
        EuroSATSource(tmp_path, "fewshot")
    with pytest.raises(ModalityError, match="empty modality selection"):
        EuroSATSource(tmp_path, modalities=[])
    with pytest.raises(ModalityError, match="unknown modality 'thermal'"):
        EuroSATSource(tmp_path, modalities=["thermal"])


def test_geobench_tasks_read_hdf5_without_the_geobench_package(tmp_path: Path) -> None:
    from fixtures.data_sources import geobench_dn, write_geobench

    from mapex_analysis.data.sources import SOURCES

    bands = SOURCES["m-eurosat"].available_bands
    write_geobench(tmp_path / "m-eurosat", bands, n_classes=10, per_split=4)
    ds = open_source("m-eurosat", tmp_path / "m-eurosat", "valid")
    assert len(ds) == 4 and ds.task.kind == "multiclass" and ds.task.num_classes == 10
    assert ds.task.class_names[:2] == ("lc_0", "lc_1")  # from task_specs.pkl
    s = ds[1]
    # rgb = (B04, B03, B02): DN 100 * (position + 1) + 50 for odd samples, / 10,000
    assert _const(s["rgb"]) == pytest.approx([0.045, 0.035, 0.025])
    assert _const(s["swir"]) == pytest.approx(
        [geobench_dn("B11", 1) / 1e4, geobench_dn("B12", 1) / 1e4, geobench_dn("B8A", 1) / 1e4]
    )
    assert s["label"].item() == 1 and ds[0]["label"].item() == 0
    full = open_source("m-eurosat", tmp_path / "m-eurosat", "train",
                       modalities=["coastal", "atmospheric"])  # fmt: skip
    assert _const(full[0]["atmospheric"]) == pytest.approx([0.10, 0.11])  # B09, B10
    for m in ("rgb", "swir"):
        check_units(m, s[m])
    # m-bigearthnet is multi-label over 43 classes and has no B10
    write_geobench(tmp_path / "m-bigearthnet", SOURCES["m-bigearthnet"].available_bands,
                   n_classes=43, multilabel=True, per_split=2)  # fmt: skip
    ben = open_source("m-bigearthnet", tmp_path / "m-bigearthnet", "test")
    assert ben.task.kind == "multilabel" and ben[0]["label"].shape == (43,)
    assert torch.nonzero(ben[0]["label"]).flatten().tolist() == [0, 2]
    with pytest.raises(BandError, match=r"lacks band\(s\) B10 of modality 'atmospheric'"):
        open_source("m-bigearthnet", tmp_path / "m-bigearthnet", modalities=["atmospheric"])
    with pytest.raises(TaskError, match=r"has no split 'val'; valid splits: train, valid, test"):
        open_source("m-eurosat", tmp_path / "m-eurosat", "val")
