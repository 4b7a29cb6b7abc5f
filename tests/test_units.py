"""Units are enforced at every model input: MAPEX checkpoints and adapters refuse raw digital
numbers, NaN/Inf, linear SAR power and impossible elevations, naming what they saw."""

from __future__ import annotations

import pytest
import torch
from fixtures.inputs import modality_batch

from mapex_analysis.factory import create_model
from mapex_analysis.modalities import UnitError, check_units, unit_checks, units_checked

# a MAPEX checkpoint and two adapters (SatMAE-style: all six modalities; CROMA: S2 + S1)
MODELS = ["models/mapex_tiny", "satmae_test", "croma_test"]


def _model_and_batch(source: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = create_model(source).eval()
    size = int(model.img_size)
    mods = [m for m in ("rgb", "sar", "ele") if m in model.modalities]
    if source == "croma_test":  # joint CROMA takes every S2 band and S1
        mods = list(model.modalities)
    return model, modality_batch(mods, size, B=2)


@pytest.mark.parametrize("source", MODELS)
def test_valid_batch_passes_and_bad_units_are_refused(source: str) -> None:
    model, x = _model_and_batch(source)
    with torch.no_grad():
        assert model(x).shape[0] == 2  # physical units pass

        raw = dict(x, rgb=x["rgb"] * 10_000)  # Sentinel-2 digital numbers
        with pytest.raises(UnitError, match=r"band B04 of modality 'rgb' has values in \[") as e:
            model(raw)
        assert "unit 'reflectance'" in str(e.value) and "divided by 10,000" in str(e.value)
        # the model (or the model an adapter wraps) is named
        names = {type(model).__name__, type(getattr(model, "model", model)).__name__}
        assert any(f"in {n};" in str(e.value) for n in names), str(e.value)

        nan = dict(x, rgb=x["rgb"].clone())
        nan["rgb"][0, 1, 2, 3] = float("nan")
        with pytest.raises(UnitError, match="NaN values in band B03 of modality 'rgb'"):
            model(nan)
        inf = dict(x, rgb=x["rgb"].clone())
        inf["rgb"][1, 2, 0, 0] = float("inf")
        with pytest.raises(UnitError, match=r"infinite values in band B02 .* inf\]"):
            model(inf)

        linear = dict(x, sar=10 ** (x["sar"] / 10))  # sigma0 power instead of dB
        with pytest.raises(UnitError, match="band VV of modality 'sar'.*linear backscatter power"):
            model(linear)

        if "ele" in x:
            nodata = dict(x, ele=x["ele"].clone())
            nodata["ele"][0, 0, :2] = -32768.0  # a DEM no-data value left in
            with pytest.raises(
                UnitError, match=r"band elevation of modality 'ele' has values in \[-3\.277e\+04"
            ):
                model(nodata)


@pytest.mark.parametrize("source", MODELS)
def test_unit_checks_opt_out_is_explicit(source: str) -> None:
    model, x = _model_and_batch(source)
    raw = dict(x, rgb=x["rgb"] * 10_000)
    assert units_checked()
    with torch.no_grad(), unit_checks(False):
        assert not units_checked()
        assert torch.isfinite(model(raw)).all()
    assert units_checked()  # restored after the block
    with pytest.raises(UnitError):
        model(raw)


def test_check_units_messages_name_band_unit_and_range() -> None:
    with pytest.raises(UnitError) as e:
        check_units("ele", torch.full((1, 4, 4), 12_000.0), where="my.tif")
    msg = str(e.value)
    assert "band elevation of modality 'ele' has values in [1.2e+04, 1.2e+04]" in msg
    assert "valid range [-500, 9000] for unit 'm'" in msg and "in my.tif" in msg
    # dB values at or below 0 pass; a band of all-zero (a zero fill) is not linear power
    check_units("sar", torch.zeros(2, 4, 4))
    check_units("sar", torch.full((2, 4, 4), -12.0))
