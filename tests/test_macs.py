"""MACs: attention and experts counted honestly, two counters cross-checked, nothing dropped."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mapex_analysis.cli import main
from mapex_analysis.measure.macs import MacsError, count_macs, sdpa_macs
from mapex_analysis.measure.params import count_params
from mapex_analysis.modalities import ModalityError

# ---------------------------------------------------------------------------------------------
# timm ViT-B/16 at 224 px, batch 1, hand-derived (N = 14 * 14 + 1 = 197 tokens, D = 768,
# MLP hidden 3072, 12 blocks, 1000 classes):
#   patch embedding conv: 196 patches * 768 out * (3 * 16 * 16 = 768 in)   =    115,605,504
#   linears per block: 197 * 768 * (2304 qkv + 768 proj + 3072 fc1) + 197 * 3072 * 768
#                    = 197 * 768 * 9216 = 1,394,343,936;  x 12           = 16,732,127,232
#   head: 768 * 1000                                                      =        768,000
#   attention matmuls: 12 blocks * (QK^T + AV) = 12 * 2 * 197^2 * 768     =    715,327,488
#   layer norms (fvcore: 5 per element): 25 norms * 197 * 768 * 5         =     18,912,000
#   total                                                                 = 17,582,740,224
# The analytic reference without norms is 17,564 G MACs (197 tokens x (3 x 768^2 + 768^2 + 2 x 768 x 3072) x 12 blocks + head).
VIT_B_LINEAR = 197 * 768 * 9216 * 12 + 768 * 1000
VIT_B_CONV = 196 * 768 * 768
VIT_B_ATTN = 12 * 2 * 197**2 * 768
VIT_B_NORM = 25 * 197 * 768 * 5
VIT_B_TOTAL = 17_582_740_224


@pytest.fixture(scope="module")
def vit_b() -> nn.Module:
    torch.manual_seed(0)
    # weight_init="skip": MACs do not depend on the weights, and timm's truncated-normal
    # re-initialisation of 86 M parameters is most of the construction time
    return timm.create_model("vit_base_patch16_224", pretrained=False, weight_init="skip").eval()


@pytest.fixture(scope="module")
def vit_b_report(vit_b: nn.Module):
    return count_macs(vit_b, torch.randn(1, 3, 224, 224))


@contextmanager
def _fused_attention(model: nn.Module, fused: bool) -> Iterator[None]:
    attns = [m for m in model.modules() if hasattr(m, "fused_attn")]
    old = [m.fused_attn for m in attns]
    for m in attns:
        m.fused_attn = fused
    try:
        yield
    finally:
        for m, f in zip(attns, old, strict=True):
            m.fused_attn = f


def test_vit_b16_total_matches_reference(vit_b_report) -> None:
    assert VIT_B_LINEAR + VIT_B_CONV + VIT_B_ATTN + VIT_B_NORM == VIT_B_TOTAL
    assert vit_b_report.total == VIT_B_TOTAL
    assert vit_b_report.unit == "MACs"
    assert vit_b_report.flops == 2 * VIT_B_TOTAL
    assert vit_b_report.by_op == {
        "linear": VIT_B_LINEAR,
        "conv": VIT_B_CONV,
        "scaled_dot_product_attention": VIT_B_ATTN,
        "layer_norm": VIT_B_NORM,
    }
    # per-module breakdown: one block = its linears + attention matmuls + 2 norms
    assert vit_b_report.by_module[""] == VIT_B_TOTAL
    assert vit_b_report.by_module["blocks.0"] == (
        197 * 768 * 9216 + 2 * 197**2 * 768 + 2 * 197 * 768 * 5
    )
    assert vit_b_report.by_module["patch_embed"] == VIT_B_CONV


def test_vit_b16_nothing_countable_unsupported(vit_b_report) -> None:
    # only the residual/pos-embed adds (24 + 1) and the 12 GELUs are left uncounted
    assert vit_b_report.unsupported == {"aten::add": 25, "aten::gelu": 12}


def test_vit_b16_fused_and_manual_attention_count_the_same(vit_b, vit_b_report) -> None:
    with _fused_attention(vit_b, False):
        manual = count_macs(vit_b, torch.randn(1, 3, 224, 224), cross_check=False)
    assert manual.total == vit_b_report.total == VIT_B_TOTAL
    assert manual.by_op["matmul"] == vit_b_report.by_op["scaled_dot_product_attention"]
    # the manual path's softmax and scaling multiply are reported, not dropped
    assert manual.unsupported["aten::softmax"] == 12
    assert manual.unsupported["aten::mul"] == 12


def test_vit_b16_two_counters_agree(vit_b, vit_b_report) -> None:
    check = vit_b_report.cross_check
    assert check["fvcore_macs"] == VIT_B_TOTAL
    assert check["flopcounter_macs"] == VIT_B_TOTAL
    assert check["rel_diff"] == 0.0  # the same total, so exactly 0 apart
    # without our CPU attention mapping, FlopCounterMode drops attention and norms:
    # 2 * (linear + conv) = 2 * (16,732,895,232 + 115,605,504) = 33,697,001,472 FLOPs
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        vit_b(torch.randn(1, 3, 224, 224))
    assert plain.get_total_flops() == 2 * (VIT_B_LINEAR + VIT_B_CONV) == 33_697_001_472


def test_vit_b16_linear_in_batch(vit_b, vit_b_report) -> None:
    report = count_macs(vit_b, torch.randn(2, 3, 224, 224), cross_check=False)
    assert report.total == 2 * vit_b_report.total


# ---------------------------------------------------------------------------------------------
# small models


@pytest.mark.parametrize("fused", [True, False])
def test_attention_matmuls_equal_l_2_n2_d(fused: bool) -> None:
    # 32 px / patch 8 -> 16 patches + CLS = N = 17; D = 48, L = 3 blocks, 4 heads:
    # per block QK^T = H * N * N * d_k = N^2 * D, AV likewise -> 3 * 2 * 17^2 * 48 = 83,232
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=3,
        num_heads=4,
        num_classes=0,
    ).eval()
    with _fused_attention(model, fused):
        report = count_macs(model, torch.randn(1, 3, 32, 32))
    op = "scaled_dot_product_attention" if fused else "matmul"
    assert report.by_op[op] == 3 * 2 * 17**2 * 48 == 83_232
    assert report.cross_check["rel_diff"] == 0.0


class _Attend(nn.Module):
    """SDPA with value width different from key width and grouped key/value heads."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_sdpa_handle_counts_differing_value_width_and_gqa() -> None:
    # q (2, 4, 5, 8), k (2, 2, 7, 8), v (2, 2, 7, 16): QK^T 2*4*5*7*8 = 2,240, AV 2*4*5*7*16
    # = 4,480 -> 6,720 MACs
    assert sdpa_macs((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 16)) == 6_720
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 16)
    report = count_macs(_Attend(), (q, k, v))
    assert report.total == 6_720
    assert report.cross_check["flopcounter_macs"] == 6_720
    with pytest.raises(MacsError, match="not a multiple of key/value heads 3"):
        sdpa_macs((2, 4, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8))
    with pytest.raises(MacsError, match="do not match"):
        sdpa_macs((2, 4, 5, 8), (2, 4, 7, 4), (2, 4, 7, 8))


class _Elementwise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) * 2 + x


def test_uncounted_ops_are_reported() -> None:
    report = count_macs(_Elementwise(), torch.randn(4, 8))
    assert report.total == 0
    assert report.unsupported == {"aten::sigmoid": 1, "aten::mul": 1, "aten::add": 1}
    assert [r["op"] for r in report.op_rows()] == ["aten::add", "aten::mul", "aten::sigmoid"]


class _Products(nn.Module):
    """Matrix products fvcore's default handles miss or get wrong."""

    def forward(self, a: torch.Tensor, v: torch.Tensor, b: torch.Tensor, u: torch.Tensor):
        return (
            (a @ v).sum()  # matmul with a vector operand
            + torch.mv(a, v).sum()
            + torch.dot(v, v)
            + (a @ b).sum()  # first operand broadcast over b's batch
            + torch.outer(u, v).sum()
            + torch.mm(a, b[0]).sum()
        )


def test_matrix_products_with_vectors_broadcasts_and_outer_are_counted() -> None:
    # a (3, 4), v (4,), b (2, 4, 5), u (6,): a @ v 3 * 4 = 12; mv 12; dot 4;
    # a @ b 2 * 3 * 5 * 4 = 120; outer 6 * 4 = 24 (a matmul with K = 1); mm 3 * 5 * 4 = 60
    # -> 232 MACs
    x = (torch.randn(3, 4), torch.randn(4), torch.randn(2, 4, 5), torch.randn(6))
    report = count_macs(_Products(), x)
    assert report.total == 232
    assert report.by_op == {"matmul": 132, "mv": 12, "dot": 4, "outer": 24, "mm": 60}
    assert report.unsupported == {"aten::sum": 5, "aten::add": 5}
    # torch decomposes outer into a broadcast mul before FlopCounterMode sees it
    assert report.cross_check["flopcounter_macs"] == 232 - 24


class _ViewOfParameter(nn.Module):
    """Feeds views of a parameter and of the input to submodules, like torchgeo Panopticon's
    expanded channel-attention query: under no_grad such views require grad but have no
    grad_fn, which FlopCounterMode's module tracker cannot hook."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, 4))
        self.proj = nn.Linear(4, 3)
        self.frozen = nn.Linear(2, 4).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(x.shape[0], -1, -1)  # (B, 1, 4), a view
        return self.proj(q + self.frozen(x[:, :, :2]))  # x[..., :2] is a view of the input


def test_cross_check_runs_on_views_of_tensors_that_require_grad() -> None:
    model = _ViewOfParameter()
    x = torch.randn(5, 1, 6, requires_grad=True)
    with torch.no_grad(), pytest.raises(AssertionError, match="gradient function"):
        with FlopCounterMode(display=False):
            model(x)  # the failure count_macs works around
    report = count_macs(model, x)
    # frozen 5 * 2 * 4 = 40, proj 5 * 4 * 3 = 60 -> 100 MACs by both counters
    assert report.total == 100
    assert report.cross_check["flopcounter_macs"] == 100
    # requires_grad flags are restored, the frozen layer stays frozen
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False, False]


@dataclass
class _Out:
    features: torch.Tensor


class _ReturnsDataclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> _Out:
        return _Out(self.fc(x))


def test_untraceable_model_error_names_the_model() -> None:
    with pytest.raises(MacsError, match="cannot trace _ReturnsDataclass"):
        count_macs(_ReturnsDataclass(), torch.randn(2, 4))


def test_bad_inputs_are_errors() -> None:
    with pytest.raises(MacsError, match="got str"):
        count_macs(nn.Linear(2, 2), "x")  # type: ignore[arg-type]
    with pytest.raises(MacsError, match="empty input dict"):
        count_macs(nn.Linear(2, 2), {})
    with pytest.raises(MacsError, match="per_modality=True needs a modality dict"):
        count_macs(nn.Linear(2, 2), torch.randn(1, 2), per_modality=True)


class _TwoModalities(nn.Module):
    """One linear embedding per modality, a shared linear on the concatenated tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.ModuleDict({"rgb": nn.Linear(3, 8), "sar": nn.Linear(2, 8)})
        self.shared = nn.Linear(8, 4)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = [self.embed[m](t.flatten(2).transpose(1, 2)) for m, t in x.items()]
        return self.shared(torch.cat(tokens, dim=1)).mean(1)


def test_modality_dict_inputs_and_per_modality_breakdown() -> None:
    model = _TwoModalities().train()
    x = {"rgb": torch.rand(2, 3, 4, 4), "sar": -25 * torch.rand(2, 2, 4, 4)}
    # rgb: 2 * 16 tokens * 3 * 8 = 768, shared on them 2 * 16 * 8 * 4 = 1,024 -> 1,792
    # sar: 2 * 16 * 2 * 8 = 512, shared 1,024 -> 1,536; both: 768 + 512 + 2,048 = 3,328
    report = count_macs(model, x, per_modality=True)
    assert report.total == 3_328
    assert report.by_modality == {"rgb": 1_792, "sar": 1_536}
    assert report.by_module == {
        "": 3_328,
        "embed": 1_280,
        "embed.rgb": 768,
        "embed.sar": 512,
        "shared": 2_048,
    }
    assert report.input_shapes == {"rgb": (2, 3, 4, 4), "sar": (2, 2, 4, 4)}
    assert report.uncalled == []
    assert model.training  # the mode is restored
    only_sar = count_macs(model, {"sar": x["sar"]})
    assert only_sar.uncalled == ["embed.rgb"]
    assert only_sar.total == 1_536


# ---------------------------------------------------------------------------------------------
# parameters


class _ToyMoE(nn.Module):
    """The MoEMLP structure count_params reads: experts, expert_groups, shared experts, router."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # 20 params each
        self.expert_groups = ["rgb", "sar"]
        self.shared_experts = nn.ModuleList([nn.Linear(4, 4)])  # 20
        self.router = nn.Linear(4, 2)  # 10


class _ToyModalityModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.modalities = ("rgb", "sar")
        self.embed = nn.ModuleDict({"rgb": nn.Linear(3, 4), "sar": nn.Linear(2, 4)})  # 16, 12
        self.moe = _ToyMoE()
        self.norm = nn.LayerNorm(4)  # 8


def test_count_params_active_per_modality() -> None:
    # total 16 + 12 + 20 + 20 + 20 + 10 + 8 = 106; shared = shared expert 20 + router 10 +
    # norm 8 = 38; rgb = 38 + embed 16 + expert 20 = 74; sar = 38 + 12 + 20 = 70
    report = count_params(_ToyModalityModel())
    assert report.total == 106
    assert report.shared == 38
    assert report.owned == {"rgb": 36, "sar": 32}
    assert report.by_modality == {"rgb": 74, "sar": 70}
    assert report.active == 106
    assert count_params(_ToyModalityModel(), ["sar"]).active == 70
    assert count_params(_ToyModalityModel(), ["sar", "sar"]).active == 70


def test_count_params_errors_name_the_valid_modalities() -> None:
    with pytest.raises(ModalityError, match=r"has no modality \['nir'\]; valid: rgb, sar"):
        count_params(_ToyModalityModel(), ["nir"])
    with pytest.raises(ModalityError, match="Linear declares no modalities"):
        count_params(nn.Linear(2, 2), ["rgb"])
    model = _ToyModalityModel()
    model.moe.expert_groups = ["rgb"]
    with pytest.raises(ValueError, match=r"moe: 2 experts but 1 expert_groups \['rgb'\]"):
        count_params(model)


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_macs_prints_macs_flops_ops_cross_check_and_params() -> None:
    # timm ViT-Ti/16 at 224 px behind the adapter contract (headless encoder, RGB; D = 192,
    # 3 heads, 12 blocks, MLP 768, N = 197):
    #   linears 12 * 197 * 192 * (576 + 192 + 768 + 768) = 1,045,757,952 (no classifier)
    #   conv 196 * 192 * 768 = 28,901,376;  attention 12 * 2 * 197^2 * 192 = 178,831,872
    #   norms 25 * 197 * 192 * 5 = 4,728,000;  total 1,258,219,200 MACs, 2,516,438,400 FLOPs
    #   parameters: timm's 5,717,416 less the 1000-class head (192,000 + 1,000) = 5,524,416
    result = CliRunner().invoke(main, ["macs", "timm/vit_tiny_patch16_224"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "total: 1,258,219,200 MACs = 1.258 G MACs" in out
    assert "FLOPs = 2 x MACs = 2.516 G FLOPs" in out
    assert "linear │ 1,045,757,952" in out
    assert "scaled_dot_product_attention │ 178,831,872" in out
    assert "aten::gelu x12" in out
    # the input normalisation ((x - mean) / std) is elementwise: listed, not counted
    assert "aten::sub x1" in out and "aten::div x1" in out
    assert "relative difference 0.0000%" in out
    assert "parameters: 5,524,416 total" in out


def test_cli_macs_unknown_modality_is_an_error() -> None:
    result = CliRunner().invoke(main, ["macs", "timm/vit_tiny_patch16_224", "--modalities", "sar"])
    assert result.exit_code == 2
    assert "TimmModelAdapter has no modality ['sar']; valid: rgb" in result.output


def test_timm_source_means_the_same_in_a_study_and_on_the_command_line() -> None:
    from mapex_analysis.factory import create_model
    from mapex_analysis.models.registry import UnknownModelError, resolve_source
    from mapex_analysis.study.schema import StudyError, parse_study

    assert resolve_source("timm/vit_tiny_patch16_224").kind == "timm"
    study = parse_study({"name": "t", "tasks": ["landcover"], "models": {
        "v": {"source": "timm/vit_tiny_patch16_224", "role": "dense",
              "kwargs": {"img_size": 32, "patch_size": 8}}}})  # fmt: skip
    assert not study.models["v"].is_checkpoint
    model = create_model("timm/vit_tiny_patch16_224", img_size=32, patch_size=8)
    assert model.modalities == ("rgb",) and model.num_features == 192
    with pytest.raises(UnknownModelError, match="Unknown model"):
        create_model("timm/no_such_architecture")
    with pytest.raises(StudyError, match="models.v.source: checkpoint directory 'models/none'"):
        parse_study(
            {"name": "t", "tasks": ["landcover"], "models": {"v": {"source": "models/none"}}}
        )


# ---------------------------------------------------------------------------------------------
# slimmed ViTs: relative MACs follow the analytic formula


def _slim_vit_macs(
    s: float, *, n: int, d: int, heads: int, hidden: int, depth: int, patch_in: int
) -> int:
    """Hand formula for a slimmed timm ViT without head (fvcore norms: 5 per element).

    Per block, with d_k' = max(1, floor(s * d_k)) per head and h' = max(1, floor(s * hidden)):
    qkv N*D*3*H*d_k' + QK^T and AV 2*H*N^2*d_k' + proj N*H*d_k'*D + MLP 2*N*D*h' + 2 norms
    2*N*D*5; plus the unslimmed patch embedding (N - 1)*D*patch_in and the final norm N*D*5.
    """
    dk = max(1, int(s * (d // heads) + 1e-9))
    h = max(1, int(s * hidden + 1e-9))
    block = (
        n * d * 3 * heads * dk
        + 2 * heads * n * n * dk
        + n * heads * dk * d
        + 2 * n * d * h
        + 2 * n * d * 5
    )
    return depth * block + (n - 1) * d * patch_in + n * d * 5


def test_slimmed_vit_relative_macs_follow_formula_over_the_grid() -> None:
    from mapex_analysis.ops import SLIM_WIDTHS, slim_width

    # 32 px, patch 8, 12 bands: N = 17, D = 64, 4 heads (d_k = 16), MLP 256, 2 blocks,
    # patch_in = 12 * 8 * 8 = 768
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        in_chans=12,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=0,
    ).eval()
    shape = dict(n=17, d=64, heads=4, hidden=256, depth=2, patch_in=768)
    x = torch.randn(1, 12, 32, 32)
    full = count_macs(model, x, cross_check=False).total
    assert full == _slim_vit_macs(1.0, **shape)
    assert len(SLIM_WIDTHS) == 31
    macs = {s: count_macs(slim_width(model, s), x, cross_check=False).total for s in SLIM_WIDTHS}
    for s in SLIM_WIDTHS:
        assert macs[s] == _slim_vit_macs(s, **shape), s
    # smallest width: d_k' = 1, h' = 1 per block: 17*64*12 + 2*4*289 + 17*4*64 + 2*17*64
    # + 10*17*64 = 13,056 + 2,312 + 4,352 + 2,176 + 10,880 = 32,776; x 2 + patch 16*64*768
    # (786,432) + norm 5,440 = 857,424
    assert macs[0.001] == 857_424


def test_slimmed_vit_b16_12_bands_smallest_width_reference() -> None:
    from mapex_analysis.ops import slim_width

    # The slimmability paper: ViT-B/16, 224 px, 12 bands, smallest width -> about 3.2-3.3 % compute.
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, in_chans=12, num_classes=0, weight_init="skip"
    ).eval()
    x = torch.randn(1, 12, 224, 224)
    full = count_macs(model, x, cross_check=False).total
    small = count_macs(slim_width(model, 0.001, inplace=True), x, cross_check=False).total
    shape = dict(n=197, d=768, heads=12, hidden=3072, depth=12, patch_in=12 * 256)
    assert full == _slim_vit_macs(1.0, **shape)
    assert small == _slim_vit_macs(0.001, **shape)
    assert 0.032 <= small / full <= 0.033


# ---------------------------------------------------------------------------------------------
# mixture of experts: active cost


class _MoEOnly(nn.Module):
    """Traceable wrapper: MoEMLP returns an MoEOutput dataclass, we count its ``out``."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(
        self, x: torch.Tensor, modality_index: torch.Tensor, pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.moe(x, modality_index, pos=pos).out


@pytest.mark.parametrize(
    ("experts_per_modality", "top_k", "router", "expected"),
    [
        # E = 2 * per_modality routed experts; T = 10 tokens (2 CLS), 8 routed, D = 8, H = 16:
        # router T*D*E = 80 E; experts 8 routed tokens * k * (D*H + H*D = 256) = 2,048 k;
        # shared 10 tokens * 256 = 2,560
        (1, 1, "modality", 80 * 2 + 2_048 + 2_560),  # 4,768
        (3, 1, "modality", 80 * 6 + 2_048 + 2_560),  # 5,088: more experts, same expert cost
        (3, 2, "modality", 80 * 6 + 2 * 2_048 + 2_560),  # 7,136
        (3, 1, "pos_embed", 80 * 6 + 2_048 + 2_560),
        (3, 2, "deterministic", 80 * 6 + 2 * 2_048 + 2_560),
    ],
)
def test_moe_layer_counts_router_plus_k_active_experts_plus_shared(
    experts_per_modality: int, top_k: int, router: str, expected: int
) -> None:
    from mapex_analysis.models.moe import MoEMLP

    torch.manual_seed(0)
    moe = MoEMLP(
        8,
        16,
        ("rgb", "sar"),
        experts_per_modality=experts_per_modality,
        shared_experts=1,
        top_k=top_k,
        router=router,
    )
    x = torch.randn(2, 5, 8)
    index = torch.tensor([[-1, 0, 0, 1, 1], [-1, 1, 1, 1, 0]])  # CLS takes shared experts only
    # the pos_embed router scores the position embedding of each token (same T * D * E MACs)
    inputs = (x, index, torch.randn(2, 5, 8)) if router == "pos_embed" else (x, index)
    report = count_macs(_MoEOnly(moe), inputs)
    E = 2 * experts_per_modality
    assert report.total == expected
    assert report.by_module["moe.router"] == 10 * 8 * E
    assert report.by_module["moe.shared_experts"] == 2_560
    assert report.by_module["moe.experts"] == top_k * 2_048
    # per expert: (tokens routed to it) * 256; the trace sees the routed token counts
    with torch.no_grad():
        counts = moe(*inputs[:2], pos=inputs[2] if len(inputs) > 2 else None).stats.counts.sum(0)
    for e in range(E):
        assert report.by_module.get(f"moe.experts.{e}", 0) == int(counts[e]) * 256
    # the routing statistics are a bincount and the load-balance loss has no matmul either, so
    # both counters agree exactly: the layer executes no multiply-add its output does not use
    assert report.cross_check["flopcounter_macs"] == report.total == expected


# mapex_test fed SAR alone, batch 2: 16 px / patch 8 -> 4 patches + CLS = 5 tokens, T = 10,
# D = 32, 2 heads, expert hidden 32, E = 6 routed experts + 1 shared, 2 blocks:
#   patch embedding: 2 * 4 * 32 * (2 bands * 64 = 128)                = 32,768
#   per block: norms 2 * 10 * 32 * 5 = 3,200; qkv 10 * 32 * 96 = 30,720; attention
#   2 * 2 * 5^2 * 32 = 3,200; proj 10 * 32 * 32 = 10,240; router 10 * 32 * 6 = 1,920;
#   routed experts 8 tokens * 2 * 32 * 32 = 16,384; shared 10 * 2,048 = 20,480 -> 86,144
#   final norm 10 * 32 * 5 = 1,600;  total 32,768 + 2 * 86,144 + 1,600 = 206,656
MAPEX_TEST_SAR_B2 = 206_656


@pytest.mark.parametrize("router", ["modality", "deterministic"])
def test_mapex_pruned_to_one_modality_counts_the_same_on_it(router: str) -> None:
    from mapex_analysis.factory import create_model
    from mapex_analysis.measure.cost import example_inputs
    from mapex_analysis.ops import prune_experts

    torch.manual_seed(0)
    model = create_model("mapex_test", router=router).eval()
    x = example_inputs(model, batch_size=2, modalities=["sar"])
    full = count_macs(model, x)
    assert full.total == MAPEX_TEST_SAR_B2
    pruned = count_macs(prune_experts(model, ["sar"]), x)
    # everything but the router is identical; the pruned router scores 1 expert instead of 6:
    # 2 blocks * 10 tokens * 32 * (6 - 1) = 3,200 MACs fewer
    assert full.total - pruned.total == 2 * 10 * 32 * 5 == 3_200
    for i in range(2):
        for part in ("attn", "norm1", "norm2", "mlp.shared_experts", "mlp.experts"):
            name = f"blocks.{i}.{part}"
            assert pruned.by_module[name] == full.by_module[name], name
        assert pruned.by_module[f"blocks.{i}.mlp.router"] == 10 * 32
    embed = "tokenizer.patch_embed.sar"
    assert pruned.by_module[embed] == full.by_module[embed] == 32_768


def test_mapex_per_modality_breakdown_and_active_params() -> None:
    from mapex_analysis.factory import create_model
    from mapex_analysis.measure.cost import example_inputs

    torch.manual_seed(0)
    model = create_model("mapex_test").eval()
    x = example_inputs(model, batch_size=2)
    report = count_macs(model, x, per_modality=True)
    assert report.by_modality["sar"] == MAPEX_TEST_SAR_B2
    # a 1-band modality (nir) has a patch embedding of 64 instead of 128 inputs:
    # 206,656 - 2 * 4 * 32 * 64 = 190,272
    assert report.by_modality["nir"] == MAPEX_TEST_SAR_B2 - 2 * 4 * 32 * 64 == 190_272
    assert set(report.by_modality) == set(model.modalities)
    # the MoE dispatch (sort by expert, gather, gate, scatter back) is listed, not counted
    dispatch = {"aten::argsort", "aten::index_select", "aten::sigmoid", "aten::index_add_"}
    assert dispatch <= set(report.unsupported)
    params = count_params(model)
    # per modality owned: patch embedding (C * 64 + 1) * 32, modality embedding 32, router
    # logit prior 2 * 6 (one entry per routed expert, per block), 2 experts (one per block,
    # 32 * 32 + 32 + 32 * 32 + 32 = 2,112 each)
    # sar: (128 + 1) * 32 + 32 + 12 + 2 * 2,112 = 4,128 + 44 + 4,224 = 8,396
    assert params.owned["sar"] == 8_396
    assert params.by_modality["sar"] == params.shared + 8_396
    assert params.total == params.shared + sum(params.owned.values())
    assert count_params(model, ["sar", "rgb"]).active == (
        params.shared + params.owned["sar"] + params.owned["rgb"]
    )


def test_cli_macs_mapex_slimmed_one_modality() -> None:
    # mapex_test fed SAR, batch 2, slimmed to s = 0.5 (d_k 16 -> 8 per head, hidden 32 -> 16):
    # per block norms 3,200; qkv 10 * 32 * 48 = 15,360; attention 2 * 2 * 5^2 * (8 + 8) =
    # 1,600; proj 10 * 16 * 32 = 5,120; router 1,920; routed experts 8 * 2 * 32 * 16 = 8,192;
    # shared 10 * 1,024 = 10,240 -> 45,632; total 2 * 45,632 + patch 32,768 + norm 1,600
    # = 125,632 MACs
    args = ["macs", "mapex_test", "--modalities", "sar", "--batch-size", "2", "--width", "0.5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "mapex_test at width 0.5, batch 2" in out
    assert "total: 125,632 MACs = 0.126 M MACs" in out
    assert "active for sar" in out


class _DeadBranch(nn.Module):
    """Computes a linear whose result it throws away."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)
        return self.used(x)


def test_cross_check_flags_executed_but_unused_work(caplog: pytest.LogCaptureFixture) -> None:
    # batch 2: used 2 * 4 * 3 = 24 MACs (the output depends on it); unused 2 * 4 * 5 = 40
    # MACs run eagerly (FlopCounterMode sees them) but the trace drops them
    with caplog.at_level("WARNING", logger="mapex_analysis.measure.macs"):
        report = count_macs(_DeadBranch(), torch.randn(2, 4))
    assert report.total == 24
    assert report.cross_check["flopcounter_macs"] == 64
    assert report.cross_check["rel_diff"] == pytest.approx(40 / 24)
    assert "_DeadBranch: fvcore counts 24 MACs, FlopCounterMode 64" in caplog.text


def test_routed_active_params_follow_the_measured_routing() -> None:
    import numpy as np

    from mapex_analysis import create_model
    from mapex_analysis.measure.params import routed_active_params
    from mapex_analysis.measure.specialization import RoutingCounts

    torch.manual_seed(0)
    model = create_model("mapex_test").eval()  # 2 MoE blocks, 6 groups x 1 expert + 1 shared
    mods = tuple(model.modalities)
    groups = tuple(model.blocks[0].mlp.expert_groups)
    expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
    static = count_params(model, ["sar"]).active
    own = np.zeros((6, 6), dtype=np.int64)
    own[mods.index("sar"), groups.index("sar")] = 10
    on_group = [RoutingCounts(own, mods, groups)] * 2
    assert routed_active_params(model, on_group, "sar") == static
    # sar tokens that also reached the rgb expert in block 1: one more expert is active
    cross = own.copy()
    cross[mods.index("sar"), groups.index("rgb")] = 1
    routing = [RoutingCounts(own, mods, groups), RoutingCounts(cross, mods, groups)]
    assert routed_active_params(model, routing, "sar") == static + expert
    with pytest.raises(ValueError, match=r"routing has entries for blocks \[0\]"):
        routed_active_params(model, [on_group[0], None], "sar")


def test_cli_macs_fill_names_the_bands_it_filled() -> None:
    # ssl4eo_test is a 13-band model: fed the six default modalities it lacks B01, B09, B10
    s2_default = "rgb,red_edge,nir,swir"
    missing = CliRunner().invoke(main, ["macs", "ssl4eo_test", "--modalities", s2_default])
    assert missing.exit_code == 2
    out = " ".join(missing.output.split())
    assert "missing bands ['B01', 'B09', 'B10']" in out and "--fill zeros or --fill mean" in out
    filled = CliRunner().invoke(
        main, ["macs", "ssl4eo_test", "--modalities", s2_default, "--fill", "zeros"]
    )
    assert filled.exit_code == 0, filled.output
    assert "filled bands B01, B09, B10 with zeros" in " ".join(filled.output.split())
    croma = CliRunner().invoke(
        main, ["macs", "croma_test", "--modalities", f"{s2_default},sar", "--fill", "mean"]
    )
    assert "filled bands B01, B09 with mean" in " ".join(croma.output.split())
    # a fill policy is refused where no band can be missing, naming the model
    refused = CliRunner().invoke(main, ["macs", "mapex_test", "--fill", "zeros"])
    assert refused.exit_code == 2
    assert "mapex_test takes no fill policy" in " ".join(refused.output.split())


@pytest.mark.parametrize(
    ("model", "macs"),
    [("ssl4eo_vit_small", "4,800,630,144"), ("croma_base_optical", "20,202,450,432")],
)
def test_cli_macs_full_size_13_band_models_take_all_s2_bands(model: str, macs: str) -> None:
    # coastal (B01) and atmospheric (B09, B10) make every Sentinel-2 band representable, so
    # the 13-band models count without a fill and say nothing was filled
    res = CliRunner().invoke(main, ["macs", model])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "filled" not in out
    assert "'coastal': (1, 1," in out and "'atmospheric': (1, 2," in out
    assert f"total: {macs} MACs" in out
