"""Masked-autoencoding pretraining: objective, Lightning run, CLI, DDP, committed checkpoints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from fixtures.net import free_port

from mapex_analysis.checkpoint import load_model
from mapex_analysis.cli import main
from mapex_analysis.data import SynthEO
from mapex_analysis.factory import create_model
from mapex_analysis.models.mae import MaskedAutoencoder, patchify
from mapex_analysis.train.evaluation import (
    KnnMonitor,
    LandcoverKnnProbe,
    evaluate_pretraining,
    top_expert_share,
)
from mapex_analysis.train.pretrain import (
    PretrainConfig,
    PretrainConfigError,
    load_config,
    parse_pretrain_config,
    pretrain,
)

REPO = Path(__file__).resolve().parents[1]


def _scenes(tmp_path: Path, n: int = 8, modalities: tuple[str, ...] | None = None):
    ds = SynthEO("pretrain", n=n, img_size=16, modalities=modalities, cache_dir=tmp_path)
    return {m: torch.from_numpy(a) for m, a in ds.arrays().items()}


def _config(tmp_path: Path, **over: object) -> dict:
    cfg = {
        "name": "t",
        "model": "mapex_test",
        "data": {"n": 32, "img_size": 16, "cache_dir": str(tmp_path / "cache")},
        "batch_size": 8,
        "max_steps": 2,
        "warmup_steps": 1,
        "output_dir": str(tmp_path / "out"),
        "run_dir": str(tmp_path / "runs"),
        "accelerator": "cpu",
        "devices": 1,
    }
    cfg.update(over)
    return cfg


def test_patchify_layout() -> None:
    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    p = patchify(x, 2)
    # 2x2 grid of 2x2 patches, channel-first: patch 0 = ch0 [0, 1, 4, 5] + ch1 [16, 17, 20, 21]
    assert p.shape == (1, 4, 8)
    assert p[0, 0].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]
    assert p[0, 3].tolist() == [10, 11, 14, 15, 26, 27, 30, 31]
    with pytest.raises(ValueError, match=r"patch size 3 does not divide image size \(4, 4\)"):
        patchify(x, 3)


def test_mae_masks_three_quarters_of_all_tokens(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mae = MaskedAutoencoder(create_model("mapex_test"), mask_ratio=0.75)
    out = mae(_scenes(tmp_path))
    # 6 modalities x (16/8)^2 = 24 tokens; keep int(24 * 0.25) = 6, mask 18 per scene
    assert out.mask.shape == (8, 24)
    assert out.mask.sum(1).tolist() == [18.0] * 8
    assert set(out.per_modality) == {"rgb", "red_edge", "nir", "swir", "sar", "ele"}
    expected = torch.stack(list(out.per_modality.values())).mean()
    assert torch.allclose(out.recon_loss.detach(), expected)
    assert torch.allclose(out.loss, out.recon_loss + 0.01 * out.aux_loss)


def test_position_masking_removes_whole_positions_in_every_modality(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = create_model("mapex_test")
    mae = MaskedAutoencoder(enc, mask_ratio=0.75, mask_mode="positions")
    x = _scenes(tmp_path)
    out = mae(x)
    # 6 modalities x 4 positions: keep int(24 * 0.25) = 6 tokens = one whole position
    assert out.mask.sum(1).tolist() == [18.0] * 8
    tok = enc.tokenizer(x)
    for row in range(8):
        kept = tok.positions[row][out.mask[row] == 0]
        assert kept.tolist() == [int(kept[0])] * 6, kept  # the same position, 6 modalities
    # the kept position varies over scenes (not a fixed pattern)
    first = {int(tok.positions[r][out.mask[r] == 0][0]) for r in range(8)}
    assert len(first) > 1
    with pytest.raises(
        ValueError, match="unknown mask_mode 'blocks'; valid modes: tokens, positions"
    ):
        MaskedAutoencoder(enc, mask_mode="blocks")
    with pytest.raises(ValueError, match="mask_mode='positions' needs the tokens' patch positions"):
        mae.random_masking(24, 2, torch.device("cpu"))


def test_mae_on_a_modality_subset_with_the_dense_vit(tmp_path: Path) -> None:
    mae = MaskedAutoencoder(create_model("vit_mae_test"), mask_ratio=0.5)
    out = mae(_scenes(tmp_path, modalities=("rgb", "sar")))
    # 2 modalities x 4 patches = 8 tokens, half masked; a dense encoder has no aux loss
    assert out.mask.sum(1).tolist() == [4.0] * 8
    assert set(out.per_modality) == {"rgb", "sar"}
    assert out.aux_loss.item() == 0.0


def test_mae_loss_falls_when_fitting_a_fixed_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mae = MaskedAutoencoder(create_model("mapex_test"))
    x = _scenes(tmp_path)
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = mae(x).recon_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    # the same style as study files: one line per problem, naming its YAML path
    with pytest.raises(
        PretrainConfigError, match="  model: unknown model 'mapex_huge'; registered"
    ):
        parse_pretrain_config(_config(tmp_path, model="mapex_huge"))
    with pytest.raises(PretrainConfigError, match="  max_step: unknown key 'max_step'; allowed"):
        parse_pretrain_config(_config(tmp_path, max_step=3))
    doc = _config(tmp_path)
    doc["data"] = {**doc.get("data", {}), "clouds": 1.5}
    with pytest.raises(
        PretrainConfigError, match=r"  data\.clouds: Input should be less than or equal to 1 "
    ):
        parse_pretrain_config(doc)
    doc["data"]["clouds"] = 0.0
    assert parse_pretrain_config(doc).data.clouds == 0.0
    with pytest.raises(
        PretrainConfigError, match="pretraining config file '.*absent.yaml' not found"
    ):
        load_config(tmp_path / "absent.yaml")


def test_cli_pretrain_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path, max_steps=50)))
    out = tmp_path / "ckpt"
    res = CliRunner().invoke(
        main, ["pretrain", str(cfg_path), "--max-steps", "2", "--output-dir", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "t: 2 steps, final loss" in res.output
    card = (out / "README.md").read_text()
    assert "- steps: 2" in card
    assert f"mapex-study pretrain {cfg_path} --max-steps 2 --output-dir {out}" in card
    model = load_model(out)
    assert model.model_spec == {"name": "mapex_test", "kwargs": {}}


def test_knn_monitor_scores_the_initialisation_and_every_n_steps(tmp_path: Path) -> None:
    cfg = PretrainConfig.model_validate(_config(tmp_path, max_steps=3))
    monitor = KnnMonitor(2, LandcoverKnnProbe(n_train=60, n_test=30, cache_dir=tmp_path / "cache"))
    res = pretrain(cfg, callbacks=[monitor], progress_bar=False)
    assert [s for s, _ in monitor.history] == [0, 2]
    # step 0 is the random initialisation: the random-init twin of evaluate_pretraining
    ev = evaluate_pretraining(
        res.checkpoint_dir, n_train=60, n_test=30, cache_dir=tmp_path / "cache"
    )
    assert monitor.history[0][1] == ev.knn_random
    assert 0.0 <= monitor.history[1][1] <= 1.0
    # the last score is of the weights being trained; after step 3 the saved encoder is scored
    assert monitor.probe.score(load_model(res.checkpoint_dir)) == ev.knn_pretrained
    metrics = (tmp_path / "runs" / "t").glob("version_*/metrics.csv")
    assert any("knn/accuracy" in m.read_text().splitlines()[0] for m in metrics)
    with pytest.raises(
        ValueError, match="every must be >= 1 \\(steps between k-NN scores\\), got 0"
    ):
        KnnMonitor(0)


def test_cli_pretrain_knn_every_prints_the_scores(tmp_path: Path) -> None:
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path, max_steps=1)))
    res = CliRunner().invoke(main, ["pretrain", str(cfg_path), "--knn-every", "1"])
    assert res.exit_code == 0, res.output
    assert re.search(r"land-cover k-NN \(k=5\): step 0: 0\.\d{3}, step 1: 0\.\d{3}", res.output)
    res = CliRunner().invoke(main, ["pretrain", str(cfg_path), "--knn-every", "0"])
    assert res.exit_code == 2 and "0 is not in the range x>=1" in res.output


@pytest.mark.slow
def test_two_process_gloo_ddp_ranks_hold_identical_weights(tmp_path: Path) -> None:
    cfg = _config(tmp_path, max_steps=3, devices=2)
    script = tmp_path / "ddp_run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import lightning as L, torch
            from mapex_analysis.train.pretrain import PretrainConfig, pretrain

            class Dump(L.Callback):
                def _save(self, trainer, module, tag):
                    sd = {{k: v.detach().clone() for k, v in module.objective.state_dict().items()}}
                    torch.save(sd, f"{tmp_path}/{{tag}}_rank{{trainer.global_rank}}.pt")
                def on_train_start(self, trainer, module):
                    self._save(trainer, module, "start")
                def on_train_end(self, trainer, module):
                    self._save(trainer, module, "end")

            if __name__ == "__main__":
                cfg = PretrainConfig.model_validate({cfg!r})
                res = pretrain(cfg, callbacks=[Dump()], progress_bar=False)
                backend = (torch.distributed.get_backend()
                           if torch.distributed.is_initialized() else "none")
                # one file per rank: two ranks printing to one pipe interleave their lines
                rank = torch.distributed.get_rank() if backend != "none" else 0
                with open(f"{tmp_path}/result_rank{{rank}}.txt", "w") as f:
                    f.write(f"steps {{res.steps}} backend {{backend}}")
            """
        )
    )
    # generate the scenes once so the two ranks only read the cache
    SynthEO("pretrain", n=32, img_size=16, cache_dir=tmp_path / "cache")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        assert (tmp_path / f"result_rank{r}.txt").read_text() == "steps 3 backend gloo", r
    ends = [torch.load(tmp_path / f"end_rank{r}.pt") for r in (0, 1)]
    start = torch.load(tmp_path / "start_rank0.pt")
    assert set(ends[0]) == set(ends[1])
    for k in ends[0]:
        assert torch.equal(ends[0][k], ends[1][k]), k
    # and training moved the weights
    assert not torch.equal(start["encoder.cls_token"], ends[0]["encoder.cls_token"])


def test_top_expert_share() -> None:
    counts = torch.tensor([[8, 2, 0], [3, 3, 3], [0, 0, 0]])
    share = top_expert_share(counts, top=1)
    # 8 / 10, 3 / 9, no tokens
    assert share[0] == pytest.approx(0.8) and share[1] == pytest.approx(1 / 3)
    assert torch.isnan(torch.tensor(share[2]))
    assert top_expert_share(counts, top=2)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"top must be in \[1, 3\], got 4"):
        top_expert_share(counts, top=4)


@pytest.fixture(scope="module")
def committed_eval():
    """k-NN (k=5) and routing of the committed models/mapex_tiny (2000 train, 1000 test scenes)."""
    return evaluate_pretraining(REPO / "models" / "mapex_tiny", n_train=2000, n_test=1000)


@pytest.mark.slow
def test_committed_mapex_tiny_router_specialised(committed_eval) -> None:
    # 12 routed experts (2 per modality): a uniform router puts 2/12 on the top-2 experts;
    # the modality router keeps every modality on its own pair of experts
    assert committed_eval.num_experts == 12
    assert set(committed_eval.top2_share) == {"rgb", "red_edge", "nir", "swir", "sar", "ele"}
    for m, share in committed_eval.top2_share.items():
        assert share >= 0.9, (m, committed_eval.top2_share)


@pytest.fixture(scope="module")
def committed_pruning():
    """Static pruning of the committed modality-router checkpoint to each modality, on the
    held-out land-cover test split (the routing recipe was chosen on val): 1000 / 1000."""
    from mapex_analysis.train.evaluation import evaluate_static_pruning

    return evaluate_static_pruning(REPO / "models" / "mapex_tiny", n_train=1000, n_test=1000)


@pytest.mark.slow
def test_committed_static_pruning_removes_no_traffic_and_keeps_knn(committed_pruning) -> None:
    ev = committed_pruning
    assert ev.split == "test" and ev.n_train == 1000 and ev.n_test == 1000
    assert set(ev.traffic_to_removed) == {"rgb", "red_edge", "nir", "swir", "sar", "ele"}
    for m, t in ev.traffic_to_removed.items():
        assert t <= 0.02, (m, ev.traffic_to_removed)  # the target (the bar is 5 %)
        # paired: same scenes, same probe, pruned vs unpruned model fed m
        assert abs(ev.knn_drop(m)) <= 0.015, (m, ev.knn_full[m], ev.knn_pruned[m])


@pytest.mark.slow
def test_committed_routers_specialise_per_layer(committed_pruning) -> None:
    from mapex_analysis.train.evaluation import evaluate_static_pruning

    ev = committed_pruning
    assert ev.own_group_share.shape == (6, 6)  # 6 MoE layers x 6 modalities
    assert float(ev.own_group_share.min()) >= 0.9, ev.own_group_share
    pos = evaluate_static_pruning(REPO / "models" / "mapex_tiny_pos_embed", n_train=10,
                                  n_test=1000, knn=False)  # fmt: skip
    assert len(pos.mutual_information_bits) == 6
    for layer, (a, b) in enumerate(zip(ev.mutual_information_bits, pos.mutual_information_bits,
                                       strict=True)):  # fmt: skip
        assert a > b, (layer, ev.mutual_information_bits, pos.mutual_information_bits)
    # the position-only router cannot see the modality: its MI is a small share of H(M)
    assert max(pos.mutual_information_bits) < 0.25 * pos.modality_entropy_bits


@pytest.mark.slow
def test_committed_mapex_tiny_beats_random_init_on_knn(committed_eval) -> None:
    # scored on the val split (never the study's test split)
    assert committed_eval.n_train == 2000 and committed_eval.n_test == 1000
    assert committed_eval.knn_pretrained - committed_eval.knn_random >= 0.05, (
        committed_eval.knn_pretrained,
        committed_eval.knn_random,
    )


def test_pretrain_on_mmearth_tiles(tmp_path: Path) -> None:
    from fixtures.data_sources import write_mmearth

    write_mmearth(tmp_path / "mmearth", size=16, num_tiles=4)
    data = {"source": "mmearth", "root": str(tmp_path / "mmearth"), "n": None, "img_size": 16}
    cfg = PretrainConfig.model_validate(_config(tmp_path, data=data, batch_size=2))
    res = pretrain(cfg, progress_bar=False)
    assert res.steps == 2 and np.isfinite(res.final_loss)
    card = (res.checkpoint_dir / "README.md").read_text()
    assert "on MMEarth tiles." in card and "4 tiles (n=all, seed=0)" in card
    with pytest.raises(PretrainConfigError, match="source 'mmearth' needs root"):
        parse_pretrain_config(_config(tmp_path, data={"source": "mmearth"}))
