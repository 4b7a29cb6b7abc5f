import pytest
import torch

from mapex_analysis import modalities as M


def test_default_groups_and_order():
    assert M.DEFAULT_MODALITIES == ("rgb", "red_edge", "nir", "swir", "sar", "ele")
    assert M.bands_of("rgb") == ("B04", "B03", "B02")
    assert M.bands_of("swir") == ("B11", "B12", "B8A")
    assert M.bands_of("sar") == ("VV", "VH")
    assert M.modality_of_band("B8A") == "swir"
    assert M.modality_of_band("VH") == "sar"


def test_wavelengths_units():
    assert M.wavelengths(["B02", "B8A", "B12"], "nm") == [490.0, 865.0, 2190.0]
    assert M.wavelengths(["B04"], "um") == pytest.approx([0.665])
    with pytest.raises(M.BandError, match="'VV'.*no centre wavelength"):
        M.wavelengths(["VV"])
    with pytest.raises(ValueError, match="unknown wavelength unit 'mm'"):
        M.wavelengths(["B02"], "mm")  # type: ignore[arg-type]


def test_unknown_names_list_valid_ones():
    with pytest.raises(M.ModalityError, match=r"unknown modality 'sat'.*valid modalities: rgb"):
        M.get_modality("sat")
    with pytest.raises(M.BandError, match=r"unknown band 'B8a'.*B8A"):
        M.get_band("B8a")
    with pytest.raises(M.ModalityError, match="empty modality selection"):
        M.validate_modalities([])
    with pytest.raises(M.ModalityError, match="'ele'.*valid modalities: rgb, sar"):
        M.validate_modalities(["rgb", "ele"], allowed=["rgb", "sar"])
    with pytest.raises(M.ModalityError, match="'rgb' given twice"):
        M.validate_modalities(["rgb", "rgb"])


def test_check_units_catches_raw_dn_and_band_count():
    ok = torch.full((3, 4, 4), 0.1)
    M.check_units("rgb", ok)
    with pytest.raises(M.UnitError, match=r"band B04 .*divided by 10,000"):
        M.check_units("rgb", ok * 10000)
    with pytest.raises(M.BandError, match=r"expects 2 bands \['VV', 'VH'\], got 3"):
        M.check_units("sar", ok)
    with pytest.raises(M.UnitError, match="band VV"):
        M.check_units("sar", torch.full((2, 4, 4), 3.0))


def test_normalize_roundtrip():
    x = torch.rand(2, 2, 5, 5) * -25
    z = M.normalize("sar", x)
    assert torch.allclose(z[:, 0], (x[:, 0] + 12.0) / 5.0)
    assert torch.allclose(M.denormalize("sar", z), x, atol=1e-5)


def test_register_modality_checks_sensor():
    with pytest.raises(M.BandError, match="band 'VV' belongs to sensor 'sentinel1'"):
        M.register_modality("mixed", "sentinel2", ["B02", "VV"])
    assert "mixed" not in M.MODALITIES
