"""Adapters: features equal the upstream model's, strict weight loading, input errors,
wavelength units, parameter counts, slimming and MAC counting."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fixtures.inputs import modality_batch
from safetensors.torch import save_file
from torch import Tensor
from torchgeo.models.croma import get_2dalibi

from mapex_analysis.factory import create_model, model_table
from mapex_analysis.modalities import (
    BandError,
    ModalityError,
    bands_of,
    normalize,
)
from mapex_analysis.models.adapters import WeightsError
from mapex_analysis.models.adapters.croma import alibi_bias

B = 2
OPT = ["rgb", "red_edge", "nir", "swir"]


def _batch(mods: list[str], size: int, seed: int = 0) -> dict[str, Tensor]:
    """Inputs in physical units: band mean + std * N(0, 1)."""
    return modality_batch(mods, size, B=B, seed=seed)


def _std(value: float, mean: float, std: float) -> float:
    return (value - mean) / std


_CACHE: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}


def _model(name: str, **kw: Any) -> Any:
    key = (name, tuple(sorted(kw.items())))
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = create_model(name, **kw).eval()
    return _CACHE[key]


# ---------------------------------------------------------------- upstream equivalence
# Each case: registry name, kwargs, fed modalities, image size, and a function computing the
# pooled features by calling the wrapped upstream model directly on hand-built input.


def _up_dofa(m: Any, x: dict[str, Tensor]) -> Tensor:
    inp = torch.cat([normalize("rgb", x["rgb"]), normalize("nir", x["nir"])], dim=1)
    # B04, B03, B02, B08 centre wavelengths 665, 560, 490, 842 nm -> µm
    return m.model.forward_features(inp, [0.665, 0.56, 0.49, 0.842])


def _up_timm(m: Any, x: dict[str, Tensor]) -> Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet R, G, B
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    inp = (x["rgb"] - mean) / std
    return m.model.forward_head(m.model.forward_features(inp), pre_logits=True)


def _up_ssl4eo(m: Any, x: dict[str, Tensor]) -> Tensor:
    # SSL4EO-S12 S2 order B01..B08, B8A, B09, B10, B11, B12, reflectance as is;
    # B01, B09, B10 filled with the band means 0.13, 0.09, 0.01 (fill="mean").
    r, re, n, s = x["rgb"], x["red_edge"], x["nir"], x["swir"]

    def const(v: float) -> Tensor:
        return torch.full((B, 1, 32, 32), v)

    inp = torch.cat(
        [const(0.13), r[:, 2:3], r[:, 1:2], r[:, 0:1], re, n, s[:, 2:3], const(0.09)]
        + [const(0.01), s[:, 0:1], s[:, 1:2]],
        dim=1,
    )
    return m.model.forward_head(m.model.forward_features(inp), pre_logits=True)


def _croma_optical(x: dict[str, Tensor]) -> Tensor:
    # CROMA order B01..B08, B8A, B09, B11, B12; B01/B09 filled with their means -> 0 after
    # standardising with the project's statistics.
    r, re, n, s = (normalize(k, x[k]) for k in OPT)
    zero = torch.zeros(B, 1, 16, 16)
    return torch.cat(
        [zero, r[:, 2:3], r[:, 1:2], r[:, 0:1], re, n, s[:, 2:3], zero, s[:, 0:2]], dim=1
    )


def _up_croma_joint(m: Any, x: dict[str, Tensor]) -> Tensor:
    out = m.model(x_sar=normalize("sar", x["sar"]), x_optical=_croma_optical(x))
    return out["joint_GAP"]


def _up_croma_sar(m: Any, x: dict[str, Tensor]) -> Tensor:
    return m.model(x_sar=normalize("sar", x["sar"]))["sar_GAP"]


def _up_croma_optical(m: Any, x: dict[str, Tensor]) -> Tensor:
    return m.model(x_optical=_croma_optical(x))["optical_GAP"]


def _up_ssl4eo_s1(m: Any, x: dict[str, Tensor]) -> Tensor:
    # SSL4EO-S12 Sentinel-1 transform: dB standardised with torchgeo's published statistics
    from torchgeo.models.resnet import _mean_s1, _std_s1

    mean = torch.tensor(_mean_s1).view(1, 2, 1, 1)
    std = torch.tensor(_std_s1).view(1, 2, 1, 1)
    inp = (x["sar"] - mean) / std
    return m.model.forward_head(m.model.forward_features(inp), pre_logits=True)


def _up_cfm(m: Any, x: dict[str, Tensor]) -> Tensor:
    inp = torch.cat([normalize("rgb", x["rgb"]), normalize("sar", x["sar"])], dim=1)
    meta = torch.full((B, 4), float("nan"))
    return m.model(
        inp,
        meta,
        wavelengths=[665.0, 560.0, 490.0, 5e7, 5e7],
        bandwidths=[30.0, 35.0, 65.0, 1e9, 1e9],
        input_mode="spectral",
    )


def _up_pan(m: Any, x: dict[str, Tensor]) -> Tensor:
    inp = torch.cat([normalize("rgb", x["rgb"]), normalize("sar", x["sar"])], dim=1)
    ids = torch.tensor([[665.0, 560.0, 490.0, -1.0, -2.0]] * B)  # nm; VV -1, VH -2
    return m.model({"imgs": inp, "chn_ids": ids})


def _up_satmae(m: Any, x: dict[str, Tensor]) -> Tensor:
    return m.model(x)


CASES: list[tuple[str, dict[str, Any], list[str], int, Callable[[Any, dict[str, Tensor]], Tensor]]]
CASES = [
    ("dofa_test", {}, ["rgb", "nir"], 32, _up_dofa),
    ("timm_vit_test", {}, ["rgb"], 32, _up_timm),
    ("scalemae_test", {}, ["rgb"], 32, _up_timm),
    ("ssl4eo_test", {"fill": "mean"}, OPT, 32, _up_ssl4eo),
    ("croma_test", {"fill": "mean"}, [*OPT, "sar"], 16, _up_croma_joint),
    ("croma_test", {"variant": "sar"}, ["sar"], 16, _up_croma_sar),
    ("croma_test", {"variant": "optical", "fill": "mean"}, OPT, 16, _up_croma_optical),
    ("ssl4eo_test", {"sensor": "s1"}, ["sar"], 32, _up_ssl4eo_s1),
    ("copernicusfm_test", {}, ["rgb", "sar"], 32, _up_cfm),
    ("panopticon_test", {}, ["rgb", "sar"], 28, _up_pan),
    ("satmae_test", {}, ["rgb", "sar"], 32, _up_satmae),
]
IDS = [f"{c[0]}-{'-'.join(c[2])}" for c in CASES]
#: Adapters of spectral models, which take any subset of their bands (``variable_bands``).
SPECTRAL = ("dofa", "copernicusfm", "panopticon", "satmae")


@pytest.mark.parametrize(("name", "kw", "mods", "size", "upstream"), CASES, ids=IDS)
def test_features_equal_upstream(name, kw, mods, size, upstream) -> None:
    m = _model(name, **kw)
    x = _batch(mods, size)
    with torch.no_grad():
        ours = m(x)
        ref = upstream(m, x)
        tokens = m.forward_features(x)
        pooled = m.forward_head(tokens)
        inter = m.forward_intermediates(x, intermediates_only=True)
    assert ours.shape == (B, m.num_features)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # forward == forward_head(forward_features): the declared pooling of the tokens
    torch.testing.assert_close(pooled, ours, atol=1e-6, rtol=0)
    assert tokens.shape[0] == B and tokens.shape[-1] == m.num_features
    n_patches = (size // m.patch_size) ** 2
    assert tokens.shape[1] == m.num_prefix_tokens + n_patches * (
        len(mods) if name.startswith("satmae") else 1
    )
    assert len(inter) == m.depth and inter[-1].shape == tokens.shape
    # the upstream module is the only owner of its weights: no duplicated state-dict keys
    assert all(k.startswith("model.") for k in m.state_dict())


# ---------------------------------------------------------------- wavelengths passed


def _captured_call(module: torch.nn.Module, fn: Callable[[], Any]) -> tuple[tuple, dict]:
    seen: dict[str, Any] = {}

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["args"], seen["kwargs"] = args, kwargs

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            fn()
    finally:
        h.remove()
    return seen["args"], seen["kwargs"]


def test_dofa_receives_micrometres() -> None:
    m = _model("dofa_test")
    x = _batch(["swir", "rgb"], 32)
    _, kw = _captured_call(m.model, lambda: m(x))
    # adapter band order: rgb (B04, B03, B02) then swir (B11, B12, B8A), whatever the dict order
    assert kw["wavelengths"] == pytest.approx([0.665, 0.56, 0.49, 1.61, 2.19, 0.865], abs=1e-12)


def test_copernicusfm_receives_nanometres() -> None:
    m = _model("copernicusfm_test")
    x = _batch(["rgb", "red_edge", "sar"], 32)
    _, kw = _captured_call(m.model, lambda: m(x))
    assert kw["wavelengths"] == [665.0, 560.0, 490.0, 705.0, 740.0, 783.0, 5e7, 5e7]
    assert kw["bandwidths"] == [30.0, 35.0, 65.0, 15.0, 15.0, 20.0, 1e9, 1e9]
    assert kw["input_mode"] == "spectral"


def test_panopticon_receives_nanometres() -> None:
    m = _model("panopticon_test")
    x = _batch(["nir", "sar"], 28)
    args, _ = _captured_call(m.model, lambda: m(x))
    assert args[0]["chn_ids"].tolist() == [[842.0, -1.0, -2.0]] * B


def test_wavelengths_come_from_the_band_table(monkeypatch) -> None:
    # Move B08 in the project's band table from 842 nm to 850 nm: every spectral adapter must
    # pass the new value (no hand-typed wavelength lists in adapters).
    import dataclasses

    from mapex_analysis import modalities

    moved = dataclasses.replace(modalities.BANDS["B08"], wavelength_nm=850.0)
    monkeypatch.setitem(modalities.BANDS, "B08", moved)
    dofa = _model("dofa_test")
    _, kw = _captured_call(dofa.model, lambda: dofa(_batch(["nir"], 32)))
    assert kw["wavelengths"] == [0.85]  # µm
    cfm = _model("copernicusfm_test")
    _, kw = _captured_call(cfm.model, lambda: cfm(_batch(["nir"], 32)))
    assert kw["wavelengths"] == [850.0]  # nm
    pan = _model("panopticon_test")
    args, _ = _captured_call(pan.model, lambda: pan(_batch(["nir"], 28)))
    assert args[0]["chn_ids"].tolist() == [[850.0]] * B  # nm


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize(("name", "kw", "mods", "size", "upstream"), CASES, ids=IDS)
def test_bad_input_names_expected_bands(name, kw, mods, size, upstream) -> None:
    m = _model(name, **kw)
    bad = next((b for b in ("ele", "sar") if b not in m.modalities), None)
    if bad is None:  # the SatMAE-style model takes every modality: restrict it to rgb, sar
        m, bad = _model(name, **kw, modalities=("rgb", "sar")), "ele"
    x = _batch(mods, size)
    # a modality the model does not take: named, with every accepted modality's bands
    with pytest.raises(ModalityError) as err:
        m({**x, bad: _batch([bad], size)[bad]})
    msg = str(err.value)
    assert f"{type(m).__name__} does not accept modalities ['{bad}']" in msg
    assert list(m.bands_per_modality()) == list(m.modalities)
    for mod, bands in m.bands_per_modality().items():
        assert f"'{mod}': {list(bands)}" in msg
    # a band count that does not match the modality's bands: the bands are named
    first = mods[0]
    n = x[first].shape[1]
    wrong = x[first][:, : n - 1] if n > 1 else x[first].repeat(1, 2, 1, 1)
    with pytest.raises(BandError) as err:
        m({**x, first: wrong})
    assert f"(B, {n}, H, W) with bands {list(bands_of(first))}" in str(err.value)
    assert f"got shape {tuple(wrong.shape)}" in str(err.value)
    # spectral models take the fed bands only: nothing is filled in
    assert m.variable_bands == name.startswith(SPECTRAL)
    if name.startswith(SPECTRAL):
        inp, fed = m.prepare_input({first: x[first]})
        assert fed == bands_of(first) and inp.shape == (B, n, size, size)


def test_image_size_and_label_key() -> None:
    m = _model("dofa_test")
    with pytest.raises(ValueError, match=r"size \(16, 16\); DOFAAdapter expects \(32, 32\)"):
        m(_batch(["rgb"], 16))
    x = _batch(["rgb"], 32)
    with torch.no_grad():  # a dataset's "label" key is not a modality
        assert torch.equal(m({**x, "label": torch.zeros(B)}), m(x))


def test_missing_bands_are_an_error_without_fill() -> None:
    m = _model("ssl4eo_test")
    with pytest.raises(BandError, match=r"missing bands \['B01', 'B09', 'B10'\]") as err:
        m(_batch(OPT, 32))
    assert "fill='zeros' or fill='mean'" in str(err.value)
    croma = _model("croma_test")
    with pytest.raises(BandError, match=r"missing bands \['B01', 'B02', 'B03'"):
        croma(_batch(["sar"], 16))


def test_fill_policies_fill_only_the_missing_bands() -> None:
    x = _batch(OPT, 32)
    zeros, _ = _model("ssl4eo_test", fill="zeros").prepare_input(x)
    means, bands = _model("ssl4eo_test", fill="mean").prepare_input(x)
    assert bands[0] == "B01" and bands[9] == "B09" and bands[10] == "B10"
    # SSL4EO S2 normalisation is the identity on reflectance: fills appear as is
    assert zeros[:, 0].abs().max().item() == 0.0
    assert means[:, 0].unique().tolist() == pytest.approx([0.13])
    assert means[:, 10].unique().tolist() == pytest.approx([0.01])
    torch.testing.assert_close(means[:, 3], x["rgb"][:, 0], atol=0, rtol=0)  # B04
    with pytest.raises(ValueError, match=r"unknown fill policy 'nan'"):
        create_model("ssl4eo_test", fill="nan")


# ---------------------------------------------------------------- weights


def _upstream_checkpoint(m: Any) -> dict[str, Any]:
    """The adapter's weights in the upstream checkpoint format (copies of the tensors)."""
    if m.family == "croma":  # CROMA's published format: one state dict per part
        return {
            p: {k: v.clone() for k, v in getattr(m.model, p).state_dict().items()}
            for p in _CROMA_PARTS[m.variant]
        }
    return {k: v.clone() for k, v in m._upstream_state_target().state_dict().items()}


def _patch_embedding_entry(ckpt: dict[str, Any]) -> tuple[dict[str, Tensor], str, str]:
    """(dict holding the patch-embedding weight, its key there, its key in error messages)."""
    for enc in ("s1_encoder", "s2_encoder"):  # CROMA: a linear patch embedding per encoder
        if enc in ckpt:
            return ckpt[enc], "linear_input.weight", f"{enc}.linear_input.weight"
    key = next(k for k, v in ckpt.items() if k.startswith(_PATCH_KEYS) and v.dim() >= 2)
    return ckpt, key, key


_CROMA_PARTS = {
    "sar": ["s1_encoder", "s1_GAP_FFN"],
    "optical": ["s2_encoder", "s2_GAP_FFN"],
    "joint": ["s1_encoder", "s1_GAP_FFN", "s2_encoder", "s2_GAP_FFN", "joint_encoder"],
}
_PATCH_KEYS = ("patch_embed", "tokenizer.patch_embed")


@pytest.mark.parametrize(("name", "kw", "mods", "size", "upstream"), CASES, ids=IDS)
def test_upstream_checkpoint_loads_strictly_and_reproduces_upstream(
    name, kw, mods, size, upstream, tmp_path
) -> None:
    src = _model(name, **kw)
    ckpt = _upstream_checkpoint(src)
    path = tmp_path / "upstream.pth"
    torch.save(ckpt, path)
    dst = copy.deepcopy(src)  # a copy with other random weights: only loading makes it equal
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dst.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    x = _batch(mods, size)
    with torch.no_grad():
        assert not torch.allclose(dst(x), src(x))
    rep = dst.load_weights(path)
    n_tensors = sum(len(v) for v in ckpt.values()) if name.startswith("croma") else len(ckpt)
    assert rep.missing == [] and rep.ignored == []  # no key missing, none unexpected
    assert rep.loaded == n_tensors + (1 if name.startswith("croma") else 0)  # + ALiBi buffer
    assert dst.weights_report is rep and rep.source == str(path)
    with torch.no_grad():
        assert torch.equal(upstream(dst, x), upstream(src, x))  # the upstream model's outputs
        assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize(("name", "kw", "mods", "size", "upstream"), CASES, ids=IDS)
def test_bad_checkpoint_fails_naming_the_key(name, kw, mods, size, upstream, tmp_path) -> None:
    m = _model(name, **kw)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    # a patch embedding of another shape (one input channel / feature more)
    ckpt = _upstream_checkpoint(m)
    holder, key, shown = _patch_embedding_entry(ckpt)
    good = tuple(holder[key].shape)
    bad = (good[0], good[1] + 1, *good[2:])
    holder[key] = torch.zeros(bad)
    torch.save(ckpt, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match="shape mismatch") as err:
        m.load_weights(tmp_path / "shape.pth")
    assert f"{shown}: checkpoint {bad} vs model {good}" in str(err.value)
    # a misspelled key: missing under its right name, unexpected under the wrong one
    ckpt = _upstream_checkpoint(m)
    holder, key, shown = _patch_embedding_entry(ckpt)
    holder[key.replace("weight", "wieght")] = holder.pop(key)
    torch.save(ckpt, tmp_path / "typo.pth")
    with pytest.raises(WeightsError) as err:
        m.load_weights(tmp_path / "typo.pth")
    msg = str(err.value)
    assert f"missing keys ['{shown}']" in msg
    assert f"unexpected keys ['{shown.replace('weight', 'wieght')}']" in msg
    assert "a misspelled key shows up in both lists" in msg
    # nothing was loaded
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_safetensors_checkpoint_and_head_dropped(tmp_path) -> None:
    src = _model("timm_vit_test")
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    state["head.weight"] = torch.zeros(10, 32)  # a classifier the adapter has no slot for
    state["head.bias"] = torch.zeros(10)
    save_file(state, str(tmp_path / "vit.safetensors"))
    dst = create_model("timm_vit_test", weights=str(tmp_path / "vit.safetensors")).eval()
    assert dst.weights_report.ignored == ["head.bias", "head.weight"]
    x = _batch(["rgb"], 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_weight_names(monkeypatch) -> None:
    with pytest.raises(WeightsError, match=r"valid weight names: DOFABase16_Weights\.DOFA_MAE"):
        create_model("dofa_test", weights="DOFABase16_Weights.DOFA_MAEE")

    def offline(*args: Any, **kwargs: Any) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    import torchvision.models._api as tv_api

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"may be offline: download the file elsewhere"):
        create_model("dofa_test", weights="DOFABase16_Weights.DOFA_MAE")


# ---------------------------------------------------------------- sizes


def test_full_size_parameter_counts() -> None:
    rows = {r["name"]: r for r in model_table()}
    # ScaleMAE-L = ViT-L/16 without classifier: patch embed 3*16*16*1024 + 1024 = 787,456;
    # CLS 1,024; position 197*1024 = 201,728; per block 2 LN 4,096 + qkv 3,148,800 +
    # proj 1,049,600 + fc1 4,198,400 + fc2 4,195,328 = 12,596,224, x 24 = 302,309,376;
    # final norm 2,048 -> 303,301,632 (published ~304 M).
    assert rows["scalemae_large"]["params"] == 303_301_632
    # DOFA-B: ViT-B/16 encoder + wavelength weight generator (fc_weight 128 -> 16*16*768)
    # (published ~111 M).
    assert rows["dofa_base"]["params"] == 111_312_128
    assert rows["dofa_large"]["params"] == 337_105_408
    assert rows["croma_base"]["params"] == 194_365_440
    assert rows["croma_base_optical"]["params"] == 90_342_912
    assert rows["croma_base_sar"]["params"] == 47_337_984
    assert rows["copernicusfm_base"]["params"] == 139_452_544
    assert rows["panopticon_base"]["params"] == 98_120_448
    # panopticon_test keeps 2 of the 12 DINOv2 blocks (width fixed at 768 upstream): 2 blocks
    # * 7,089,408 + CLS 768 + position 5 * 768 + final norm 1,536 + patch embedding at
    # attn_dim 48 (conv3d 9,456, query 48, SAR embeddings 96, k/v 2 * 2,304, proj 37,632)
    assert rows["panopticon_test"]["params"] == 14_236_800
    assert rows["ssl4eo_vit_small"]["params"] == 22_648_704
    assert rows["timm_vit_base"]["params"] == 85_798_656  # timm ViT-B/16 without head
    assert rows["satmae_base"]["params"] == 87_621_888
    assert rows["croma_base"]["modalities"] == "coastal, rgb, red_edge, nir, swir, atmospheric, sar"
    assert "DOFABase16_Weights.DOFA_MAE" in rows["dofa_base"]["weights"]


def test_panopticon_depth_keeps_the_first_blocks() -> None:
    m = _model("panopticon_test")
    vit = m.model.model
    assert len(m.blocks) == 2 and m.depth == 2 and vit.global_pool == "token"
    with pytest.raises(ValueError, match=r"Panopticon depth must be in \[1, 12\], got 13"):
        create_model("panopticon_test", depth=13)


def test_croma_alibi_equals_upstream() -> None:
    for heads, patches in [(16, 4), (16, 36), (8, 16)]:
        assert torch.equal(alibi_bias(heads, patches), get_2dalibi(heads, patches))
    assert torch.equal(_model("croma_test", fill="mean").model.attn_bias, get_2dalibi(16, 4))


# ---------------------------------------------------------------- slimming and MACs

TIMM_BLOCK = [c for c in CASES if not c[0].startswith("croma")]
TIMM_IDS = [i for i, c in zip(IDS, CASES, strict=True) if not c[0].startswith("croma")]

#: Ops that multiply and accumulate: none of them may be left uncounted.
_PRODUCT_OP = re.compile(
    r"aten::(\w*mm|matmul|einsum|linear|\w*conv\w*|\w*attention\w*|outer|ger|dot|vdot|mv|"
    r"addmv|bilinear|tensordot)_?$"
)


def _uncounted_products(unsupported: dict[str, int]) -> list[str]:
    return [op for op in unsupported if _PRODUCT_OP.match(op)]


@pytest.mark.parametrize(("name", "kw", "mods", "size", "upstream"), TIMM_BLOCK, ids=TIMM_IDS)
def test_slim_width_on_timm_block_adapters(name, kw, mods, size, upstream) -> None:
    from mapex_analysis.measure.macs import count_macs
    from mapex_analysis.ops.slim import slim_width

    m = _model(name, **kw)
    x = _batch(mods, size)
    head_dims = [b.attn.head_dim for b in m.blocks]
    hidden = [b.mlp.fc1.out_features for b in m.blocks]
    with torch.no_grad():
        full = m(x)
        assert torch.equal(slim_width(m, 1.0)(x), full)  # s = 1.0: bit-identical
        half = slim_width(m, 0.5)
        out = half(x)
    assert out.shape == full.shape and bool(torch.isfinite(out).all())
    assert [b.attn.head_dim for b in half.blocks] == [d // 2 for d in head_dims]
    assert [b.attn.scale for b in half.blocks] == [(d // 2) ** -0.5 for d in head_dims]
    assert [b.mlp.fc1.out_features for b in half.blocks] == [h // 2 for h in hidden]
    # physically smaller: fewer MACs, and nothing the slimmed model multiplies goes uncounted
    rep_full = count_macs(m, x, cross_check=False)
    rep_half = count_macs(half, x, cross_check=False)
    assert rep_half.total < rep_full.total
    assert _uncounted_products(rep_half.unsupported) == []


def test_slim_width_slims_croma_attention_cross_attention_and_ffn() -> None:
    from torchgeo.models.croma import Attention as CromaAttention

    from mapex_analysis.measure.macs import count_macs
    from mapex_analysis.ops.slim import slim_width

    croma = _model("croma_test", fill="mean").eval()
    x = modality_batch([*OPT, "sar"], 16, B=2)
    with torch.no_grad():
        full = croma(x)
        assert torch.equal(slim_width(croma, 1.0)(x), full)  # s = 1.0: bit-identical
        half = slim_width(croma, 0.5)
        out = half(x)
    assert out.shape == full.shape and bool(torch.isfinite(out).all())
    kinds = {type(m).__name__: m for m in half.modules()}
    attn, cross, ffn = kinds["Attention"], kinds["CrossAttention"], kinds["FFN"]
    d = croma.model.s1_encoder.transformer.layers[0][0].to_out.in_features
    assert attn.to_out.in_features == cross.to_q.out_features == d // 2
    assert attn.to_qkv.out_features == 3 * (d // 2) and ffn.net[0].out_features == 2 * d
    heads = attn.num_heads
    assert attn.scale == (d // 2 // heads) ** -0.5
    rep_full = count_macs(croma, x, cross_check=False)
    rep_half = count_macs(half, x, cross_check=False)
    assert rep_half.total < rep_full.total
    assert _uncounted_products(rep_half.unsupported) == []

    # one attention layer against a hand computation: the first k dims of every head of
    # q, k, v (full projections), scale 1/sqrt(k), and the matching columns of to_out
    torch.manual_seed(0)
    layer = CromaAttention(dim=8, num_heads=2).eval()
    tokens, bias = torch.randn(1, 5, 8), torch.randn(1, 2, 5, 5)
    k_dims = 2  # floor(0.5 * 4)
    small = slim_width(layer, 0.5, mode="attn")
    with torch.no_grad():
        q, k, v = layer.to_qkv(layer.input_norm(tokens)).chunk(3, dim=-1)
        split = [t.reshape(1, 5, 2, 4)[..., :k_dims].transpose(1, 2) for t in (q, k, v)]
        att = (split[0] @ split[1].transpose(-1, -2) * k_dims**-0.5 + bias).softmax(-1)
        mixed = (att @ split[2]).transpose(1, 2).reshape(1, 5, 2, k_dims)
        cols = layer.to_out.weight.reshape(8, 2, 4)[..., :k_dims].reshape(8, -1)
        expected = mixed.reshape(1, 5, -1) @ cols.T + layer.to_out.bias
        torch.testing.assert_close(small(tokens, bias), expected, rtol=1e-5, atol=1e-6)


# timm_vit_test, batch 2 (B = 2, N = 16 patches + CLS = 17, D = 32, MLP 128, 2 blocks,
# patch input 3 * 8 * 8 = 192):
#   patch conv 2 * 16 * 32 * 192 = 196,608; per block: linears 2 * 17 * 32 * (96 + 32 + 128)
#   + 2 * 17 * 128 * 32 = 417,792, attention 2 * 2 * 17^2 * 32 = 36,992, norms
#   2 * 2 * 17 * 32 * 5 = 10,880 -> 465,664; final norm 2 * 17 * 32 * 5 = 5,440
#   total 196,608 + 2 * 465,664 + 5,440 = 1,133,376
TIMM_VIT_TEST_MACS = 1_133_376


@pytest.mark.parametrize(("name", "kw", "mods", "size", "upstream"), CASES, ids=IDS)
def test_count_macs_counts_every_matmul(name, kw, mods, size, upstream) -> None:
    from mapex_analysis.measure.macs import CROSS_CHECK_TOLERANCE, count_macs

    m = _model(name, **kw)
    rep = count_macs(m, _batch(mods, size))  # both counters, Panopticon included
    assert rep.unit == "MACs" and rep.total > 0
    assert _uncounted_products(rep.unsupported) == []
    check = rep.cross_check
    assert check["fvcore_macs"] == rep.total
    croma_joint = name.startswith("croma") and kw.get("variant", "joint") == "joint"
    exact = name.startswith(("timm", "ssl4eo", "satmae", "croma")) and not croma_joint
    if exact:
        assert check["rel_diff"] == 0.0
    if name == "timm_vit_test":
        assert rep.total == TIMM_VIT_TEST_MACS
        assert rep.by_op["scaled_dot_product_attention"] == 2 * 2 * 2 * 17**2 * 32  # 73,984
    if name.startswith("panopticon"):
        # channel sin-cos embedding of the optical ids: outer(B * 3 rgb ids = 6, omega of
        # attn_dim / 2 = 24) = 144 MACs (SAR ids index learned embeddings); torch decomposes
        # outer into a mul before FlopCounterMode sees it
        assert rep.by_op["outer"] == 144
        assert check["fvcore_macs"] - check["flopcounter_macs"] == 144
        # channel cross-attention: QK^T and AV per patch (B * L = 8), 16 heads of 3, 5 keys
        assert rep.by_op["matmul"] == 2 * 8 * 16 * 1 * 5 * 3  # 3,840
    if croma_joint:
        # the joint variant also runs CROMA's per-sensor GAP heads (LayerNorm + 32 -> 128 ->
        # 32 MLP on the mean token), which the joint output does not use: FlopCounterMode
        # counts them, the trace does not: 2 heads * B * (5 * 32 + 2 * 32 * 128) = 33,408
        assert check["flopcounter_macs"] - check["fvcore_macs"] == 2 * B * (5 * 32 + 2 * 32 * 128)
    elif not exact:  # DOFA, ScaleMAE, Copernicus-FM, Panopticon: 80 to 288 MACs apart
        assert check["rel_diff"] < CROSS_CHECK_TOLERANCE


def test_a_product_op_count_macs_has_no_handle_for_is_listed_and_flagged(monkeypatch) -> None:
    # _uncounted_products (which the MAC tests above rely on) on what count_macs reports: with
    # the project's attention handle, timm_vit_test leaves only elementwise ops uncounted;
    # without it, its 2 attention calls (2 * 2 * 2 * 17^2 * 32 = 73,984 MACs) are listed as
    # uncounted, and flagged
    from mapex_analysis.measure import macs

    m = _model("timm_vit_test")
    x = _batch(["rgb"], 32)
    counted = macs.count_macs(m, x, cross_check=False)
    elementwise = {"aten::sub": 1, "aten::div": 1, "aten::add": 5, "aten::gelu": 2}
    assert counted.unsupported == elementwise
    assert _uncounted_products(counted.unsupported) == []
    monkeypatch.delitem(macs.FVCORE_EXTRA_HANDLES, "aten::scaled_dot_product_attention")
    dropped = macs.count_macs(m, x, cross_check=False)
    assert dropped.total == TIMM_VIT_TEST_MACS - 73_984
    assert dropped.unsupported == {**elementwise, "aten::scaled_dot_product_attention": 2}
    assert _uncounted_products(dropped.unsupported) == ["aten::scaled_dot_product_attention"]


def test_cli_list_models_shows_adapters() -> None:
    from click.testing import CliRunner

    from mapex_analysis.cli import main

    res = CliRunner().invoke(main, ["list", "models"])
    assert res.exit_code == 0, res.output
    for name in ("scalemae_large", "dofa_base", "croma_base_sar", "ssl4eo_vit_small_s1"):
        assert name in res.output
    assert "303,301,632" in res.output and "111,312,128" in res.output
    assert "DOFABase16_Weights.DOFA_MAE" in res.output


def test_slimmed_adapter_saves_and_reloads(tmp_path) -> None:
    from mapex_analysis.checkpoint import load_model, save_model
    from mapex_analysis.ops.slim import slim_width

    torch.manual_seed(0)
    half = slim_width(create_model("copernicusfm_test").eval(), 0.5)
    back = load_model(save_model(half, tmp_path / "cfm_half"))
    x = _batch(["rgb", "sar"], 32)
    with torch.no_grad():
        assert torch.equal(back(x), half(x))
    assert back.applied_ops[0]["s"] == 0.5 and back.blocks[0].attn.head_dim == 8  # 16 -> 8
