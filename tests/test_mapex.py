"""MAPEX and the group-channel ViT: sizes, the token-model contract, input validation."""

from __future__ import annotations

import pytest
import torch
from fixtures.inputs import modality_batch

from mapex_analysis.factory import create_model
from mapex_analysis.modalities import BANDS, BandError, ModalityError


def _batch(model: torch.nn.Module, B: int = 2, mods: tuple[str, ...] | None = None):
    """Physical-unit inputs: band mean plus 0.5 band std of noise."""
    return modality_batch(mods or model.modalities, model.img_size, B=B, seed=0, noise=0.5)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mapex_base_size_and_single_modality_reduction() -> None:
    with torch.device("meta"):
        full = create_model("mapex_base")
        one = create_model("mapex_base", modalities=("rgb",))
    # per block: attention 4*768^2 + 4*768 = 2,362,368; 7 experts of 1,181,184 (2*768^2 + 2*768);
    # 2 LayerNorms 3,072; router 6*768 + 6 + logit priors 6*6 = 4,650 -> 10,638,378;
    # x12 = 127,660,536; patch embeds 13 bands * 256 * 768 + 6 * 768 = 2,560,512; modality
    # embeddings 4,608; CLS 768; final norm 1,536 -> 130,227,960
    assert _n_params(full) == 130_227_960
    # one group + shared: per block 2,362,368 + 2 * 1,181,184 + 3,072 + 769 + 1 = 4,728,578;
    # x12 = 56,742,936; + rgb patch embed 590,592 + 768 + 768 + 1,536 = 57,336,600
    assert _n_params(one) == 57_336_600  # 56.0 % fewer parameters than the full model


def test_contract_shapes_on_a_modality_subset() -> None:
    torch.manual_seed(0)
    model = create_model("mapex_test").eval()
    x = _batch(model, mods=("sar", "rgb"))
    tokens, index = model.tokenize(x)
    # 16 px / patch 8 -> 4 patches per modality; token order follows model.modalities (rgb first)
    assert tokens.shape == (2, 8, 32)
    assert index[0].tolist() == [0] * 4 + [4] * 4
    feats, info = model.forward_features(x, return_routing=True)
    assert feats.shape == (2, 9, 32)
    assert len(info.stats) == 2
    assert info.stats[0].counts.sum(1).tolist() == [8, 0, 0, 0, 8, 0]
    assert model(x).shape == (2, model.num_features) == (2, 32)
    assert torch.equal(model.forward_head(feats), feats[:, 0])


def test_dict_order_does_not_change_the_output() -> None:
    model = create_model("mapex_test").eval()
    x = _batch(model)
    reversed_x = dict(reversed(list(x.items())))
    assert torch.equal(model(x), model(reversed_x))


def test_forward_intermediates_and_explicit_positions() -> None:
    model = create_model("mapex_test", router="pos_embed").eval()
    x = _batch(model)
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 2 and inter[-1].shape == (2, 1 + 6 * 4, 32)
    assert torch.allclose(model.norm(inter[-1]), model.forward_features(x), atol=1e-6)
    assert torch.equal(final, model.forward_features(x))
    normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
    assert len(normed) == 1 and torch.allclose(normed[0], final, atol=1e-6)
    tokens, index = model.tokenize(x)
    positions = torch.arange(4).repeat(6).expand(2, 24)
    assert torch.equal(
        model.encode(tokens, index), model.encode(tokens, index, positions=positions)
    )


def test_every_model_parameter_receives_a_gradient() -> None:
    # deterministic routing sends every modality to its own expert, so every expert has tokens
    # (a learned router at init may leave experts without tokens: see test_moe for that case)
    torch.manual_seed(0)
    model = create_model("mapex_test", router="deterministic")
    feats, info = model.forward_features(_batch(model, B=4), return_routing=True)
    (feats.pow(2).mean() + 0.01 * info.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_unknown_modality_lists_valid_ones() -> None:
    model = create_model("mapex_test", modalities=("rgb", "sar"))
    with pytest.raises(ModalityError, match="unknown modality 'nir'; valid modalities: rgb, sar"):
        model.tokenize({"nir": torch.zeros(1, 1, 16, 16)})
    with pytest.raises(ModalityError, match="no modality given"):
        model.tokenize({})


def test_wrong_band_count_names_the_bands() -> None:
    model = create_model("mapex_test")
    with pytest.raises(BandError, match=r"'sar' expects \(B, 2, H, W\) with bands \['VV', 'VH'\]"):
        model.tokenize({"sar": torch.zeros(1, 3, 16, 16)})
    with pytest.raises(ValueError, match=r"size \(8, 8\), the model expects \(16, 16\)"):
        model.tokenize({"sar": torch.zeros(1, 2, 8, 8)})


def test_inputs_are_normalised_inside_the_model() -> None:
    # a constant input equal to the band means normalises to 0, so the patch embedding gives
    # its bias: token = bias + pos + modality embedding
    model = create_model("mapex_test", modalities=("nir",))
    x = {"nir": torch.full((1, 1, 16, 16), BANDS["B08"].mean)}
    tokens, _ = model.tokenize(x)
    tk = model.tokenizer
    expected = tk.patch_embed["nir"].proj.bias + tk.pos_embed + tk.modality_embed["nir"]
    assert torch.allclose(tokens[0], expected, atol=1e-6)


def test_group_channel_vit_any_groups_and_sizes() -> None:
    model = create_model("vit_mae_test", modalities=("rgb", "ele"), img_size=24, patch_size=6)
    x = _batch(model)
    # (24 / 6)^2 = 16 patches x 2 modalities + CLS
    feats, info = model.forward_features(x, return_routing=True)
    assert feats.shape == (2, 33, 32)
    assert info.stats == [None, None]
    assert model(x).shape == (2, 32)
    with torch.device("meta"):
        tiny = create_model("vit_mae_tiny")
    assert (tiny.embed_dim, len(tiny.blocks), tiny.blocks[0].mlp.fc1.out_features) == (128, 6, 256)


def test_moe_every_and_router_option() -> None:
    model = create_model("mapex_test", depth=4, moe_every=2, router="deterministic")
    kinds = [type(b.mlp).__name__ for b in model.blocks]
    assert kinds == ["Mlp", "MoEMLP", "Mlp", "MoEMLP"]
    with pytest.raises(ValueError, match="unknown router 'x'"):
        create_model("mapex_test", router="x")
