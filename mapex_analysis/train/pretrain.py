"""Pretraining with Lightning (masked autoencoding or contrastive, optionally slimmable), from
CPU to multi-node DDP unchanged.

One YAML config (validated by :class:`PretrainConfig`) names a registered encoder, the SynthEO
pretraining scenes, the objective (``objective: mae`` or ``contrastive``; see
:mod:`mapex_analysis.models.mae` and :mod:`mapex_analysis.models.contrastive`), optional
slimmable training (``slimmable:``: the sandwich rule over a width grid, sub-networks built by
the width-slimming operator, :mod:`mapex_analysis.ops.slimmable`) and the optimisation;
:func:`pretrain` builds the :class:`PretrainDataModule` and :class:`PretrainModule`, runs a
``lightning.Trainer``
(``devices`` / ``num_nodes`` / ``accelerator`` from the config or the caller; DDP whenever more
than one process), and on global rank 0 writes the encoder as a checkpoint directory
(:func:`mapex_analysis.checkpoint.save_model`) whose model card records the exact
command, steps and final loss. Launch multi-node runs with ``torchrun`` or SLURM as Lightning
documents; nothing here changes.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mapex_analysis.checkpoint import save_model
from mapex_analysis.config import ConfigError, Strict, load_yaml, validate
from mapex_analysis.data import SynthEO
from mapex_analysis.data.materialize import load_split
from mapex_analysis.data.tasks import get_task
from mapex_analysis.factory import create_model
from mapex_analysis.models.contrastive import ContrastiveObjective, modality_views
from mapex_analysis.models.mae import MaskedAutoencoder, MaskMode
from mapex_analysis.models.registry import UnknownModelError, get_entry
from mapex_analysis.models.token_model import TokenEncoder
from mapex_analysis.ops.slim import SlimMode
from mapex_analysis.ops.slimmable import SlimmableNetwork, sandwich_step, sandwich_widths

__all__ = [
    "ContrastiveConfig",
    "PretrainConfig",
    "PretrainDataModule",
    "PretrainResult",
    "PretrainConfigError",
    "PretrainDataConfig",
    "PretrainModule",
    "SlimmableConfig",
    "load_config",
    "parse_pretrain_config",
    "pretrain",
]

logger = logging.getLogger(__name__)


class PretrainConfigError(ConfigError):
    """A pretraining config that does not validate; one line per problem, naming its path."""


class PretrainDataConfig(Strict):
    """Pretraining scenes: SynthEO's, or MMEarth tiles on disk.

    Attributes:
        source: ``syntheo`` (default) or ``mmearth`` (torchgeo's MMEarth layout under
            ``root``: Sentinel-2, Sentinel-1 and ASTER elevation, de-normalised to physical
            units; ``options`` go to the source, e.g. ``subset``, ``orbit``).
        root: The MMEarth directory (``source: mmearth`` only).
        options: Keyword arguments of the MMEarth source.
        n: Number of scenes (MMEarth: a seeded draw of that many tiles; ``None`` there: all).
        seed: SynthEO seed.
        img_size: Scene side in pixels (must match the model).
        modalities: Modalities to load; ``None`` = the model's.
        cache_dir: SynthEO cache directory (``None``: the default).
        clouds: Probability that a scene is cloudy, in [0, 1]; ``None``: the ``pretrain``
            task's default (0.2).
    """

    source: Literal["syntheo", "mmearth"] = "syntheo"
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    n: int | None = Field(default=4000, ge=1)
    seed: int = 0
    img_size: int = Field(default=32, ge=1)
    modalities: list[str] | None = None
    cache_dir: str | None = None
    clouds: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _source(self) -> PretrainDataConfig:
        if self.source == "mmearth" and self.root is None:
            raise ValueError("source 'mmearth' needs root: the MMEarth directory")
        if self.source == "syntheo" and (self.root is not None or self.options):
            raise ValueError("root and options are for source: mmearth; SynthEO takes neither")
        if self.source == "syntheo" and self.n is None:
            raise ValueError("n: SynthEO needs a number of scenes")
        return self


class SlimmableConfig(Strict):
    """Slimmable training (the sandwich rule; :mod:`mapex_analysis.ops.slimmable`).

    Attributes:
        widths: The width grid trained for (values in (0, 1); the smallest is trained every
            step, ``n_random`` of the others are drawn per step; 1.0 always).
        n_random: Random widths per step (the slimmability paper: 3).
        mode: Which modules are slimmed, as ``slim_width`` (``attn+mlp`` by default).
        distill_weight: Weight of each smaller width's distillation loss.
    """

    widths: list[float] = Field(default_factory=lambda: [0.75, 0.5, 0.25, 0.1], min_length=1)
    n_random: int = Field(default=2, ge=0)
    mode: SlimMode = "attn+mlp"
    distill_weight: float = Field(default=1.0, gt=0.0)

    @field_validator("widths")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        bad = [w for w in v if not 0.0 < w < 1.0]
        if bad:
            raise ValueError(f"widths must be in (0, 1) (1.0 is always trained), got {bad}")
        return v


class ContrastiveConfig(Strict):
    """The contrastive objective (:mod:`mapex_analysis.models.contrastive`).

    Attributes:
        proj_dim: Projection-head width.
        temperature: NT-Xent temperature.
    """

    proj_dim: int = Field(default=64, ge=2)
    temperature: float = Field(default=0.2, gt=0.0)


class PretrainConfig(Strict):
    """A pretraining run (the YAML file under ``studies/pretrain/``).

    Attributes:
        name: Run name (the checkpoint's title).
        model: Registry name of the encoder.
        model_kwargs: Constructor overrides, saved in the checkpoint spec.
        objective: ``mae`` (masked autoencoding) or ``contrastive`` (NT-Xent between two
            modality subsets of each scene).
        contrastive: Settings of the contrastive objective.
        slimmable: Slimmable training settings; ``None`` (default): ordinary training.
        data: The scenes.
        mask_ratio: Share of tokens masked.
        mask_mode: ``tokens`` (independently) or ``positions`` (a patch position in every
            modality at once); see :class:`~mapex_analysis.models.mae.MaskedAutoencoder`.
        decoder_dim: MAE decoder width.
        decoder_depth: MAE decoder blocks.
        decoder_heads: MAE decoder heads.
        norm_pix_loss: Standardise target patches.
        aux_weight: Weight of the MoE load-balance loss.
        mi_weight: Weight of the MoE mutual-information loss ``-I(M; G)`` (modality vs expert group) (Mod-Squad).
        batch_size: Per-process batch size.
        max_steps: Optimiser steps.
        lr: Peak AdamW learning rate (per the global batch; not rescaled).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the cosine decay.
        seed: Seed for initialisation and masking.
        output_dir: Where the encoder checkpoint directory is written.
        run_dir: Lightning logs and training checkpoints.
        devices: Devices per node (``"auto"`` or a count).
        num_nodes: Nodes.
        accelerator: ``auto``, ``cpu``, ``gpu``...
        precision: Lightning precision string.
        num_workers: DataLoader workers.
        log_every_n_steps: Logging interval.
    """

    name: str
    model: str
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    objective: Literal["mae", "contrastive"] = "mae"
    contrastive: ContrastiveConfig = ContrastiveConfig()
    slimmable: SlimmableConfig | None = None
    data: PretrainDataConfig = PretrainDataConfig()
    mask_ratio: float = Field(default=0.75, ge=0.0, lt=1.0)
    mask_mode: MaskMode = "tokens"
    decoder_dim: int = Field(default=64, ge=4)
    decoder_depth: int = Field(default=2, ge=1)
    decoder_heads: int = Field(default=2, ge=1)
    norm_pix_loss: bool = False
    aux_weight: float = Field(default=0.01, ge=0.0)
    mi_weight: float = Field(default=0.0, ge=0.0)
    batch_size: int = Field(default=64, ge=1)
    max_steps: int = Field(default=1000, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.05, ge=0.0)
    warmup_steps: int = Field(default=50, ge=0)
    seed: int = 0
    output_dir: str = "models/unnamed"
    run_dir: str = "reports/pretrain"
    devices: int | str = "auto"
    num_nodes: int = Field(default=1, ge=1)
    accelerator: str = "auto"
    precision: str = "32-true"
    num_workers: int = Field(default=0, ge=0)
    log_every_n_steps: int = Field(default=10, ge=1)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        try:
            get_entry(v)
        except UnknownModelError as err:  # lists the registered names
            raise PydanticCustomError("unknown_model", "{msg}", {"msg": str(err)}) from None
        return v


def load_config(path: str | Path) -> PretrainConfig:
    """Read and validate a pretraining YAML file.

    Args:
        path: The YAML file.

    Returns:
        The validated config.

    Raises:
        PretrainConfigError: if the file is missing, is not YAML or does not validate (every
            problem with its YAML path).
    """
    return parse_pretrain_config(
        load_yaml(path, what="pretraining config", error=PretrainConfigError), source=str(path)
    )


def parse_pretrain_config(data: Any, *, source: str = "pretraining config") -> PretrainConfig:
    """Validate a parsed pretraining YAML document.

    Raises:
        PretrainConfigError: listing every problem with its YAML path.
    """
    return validate(PretrainConfig, data, source=source, error=PretrainConfigError)


class _ArrayScenes(Dataset[dict[str, torch.Tensor]]):
    """Scenes held as ``(N, C, H, W)`` tensors; items are modality dicts."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.tensors = {m: torch.from_numpy(np.ascontiguousarray(a)) for m, a in arrays.items()}
        self.n = len(next(iter(self.tensors.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {m: t[i] for m, t in self.tensors.items()}


class PretrainDataModule(L.LightningDataModule):
    """SynthEO ``pretrain`` scenes (unlabelled, physical units) for masked autoencoding.

    Lightning adds a ``DistributedSampler`` under DDP, so each process sees its shard.

    Args:
        data: Scene config.
        modalities: Modalities to load (the model's when ``data.modalities`` is ``None``).
        batch_size: Per-process batch size.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        data: PretrainDataConfig,
        modalities: Sequence[str],
        batch_size: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.data_config = data
        self.modalities = tuple(data.modalities or modalities)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: _ArrayScenes | None = None

    def setup(self, stage: str | None = None) -> None:
        """Generate (or load from the SynthEO cache) the scenes."""
        if self.train_set is not None:
            return
        cfg = self.data_config
        if cfg.source == "mmearth":
            assert cfg.root is not None  # validated
            split = load_split("mmearth", cfg.root, "train", n=cfg.n, seed=cfg.seed,
                               img_size=cfg.img_size, modalities=self.modalities,
                               options=dict(cfg.options, labels=False))  # fmt: skip
            self.train_set = _ArrayScenes({m: a for m, a in split.arrays().items()
                                           if m != "label"})  # fmt: skip
            logger.info("pretraining on %s", split)
            return
        assert cfg.n is not None  # validated
        ds = SynthEO(
            "pretrain",
            "train",
            seed=self.data_config.seed,
            n=self.data_config.n,
            modalities=self.modalities,
            img_size=self.data_config.img_size,
            cache_dir=self.data_config.cache_dir,
            clouds=self.data_config.clouds,
        )
        arrays = {m: a for m, a in ds.arrays().items() if m != "label"}
        self.train_set = _ArrayScenes(arrays)
        logger.info("pretraining on %s", ds)

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """Shuffled, drop-last batches of modality dicts."""
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_set) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class _ReplayRandom:
    """Captures the random state once and restores it before each width's pass, so every
    width of a sandwich step draws the same MAE mask."""

    def __init__(self) -> None:
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def __call__(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class PretrainModule(L.LightningModule):
    """Lightning wrapper of a pretraining objective (:class:`MaskedAutoencoder` or
    :class:`ContrastiveObjective`) with AdamW and warm-up + cosine, optionally slimmable.

    With ``config.slimmable`` every step runs the sandwich rule
    (:func:`~mapex_analysis.ops.slimmable.sandwich_step`): the full width with the objective's
    loss, the grid's smallest width and ``n_random`` drawn widths with a distillation loss
    toward the full width's detached output (MAE: the masked-patch predictions, under the
    same mask; contrastive: the normalised projections of both views). Only the encoder is
    slimmed; the decoder or projection head stays full.

    Args:
        encoder: The token encoder being pretrained.
        config: The run config (objective, decoder, loss and optimiser settings).
    """

    def __init__(self, encoder: TokenEncoder, config: PretrainConfig) -> None:
        super().__init__()
        self.config = config
        objective: nn.Module
        if config.objective == "mae":
            objective = MaskedAutoencoder(
                encoder,
                decoder_dim=config.decoder_dim,
                decoder_depth=config.decoder_depth,
                decoder_heads=config.decoder_heads,
                mask_ratio=config.mask_ratio,
                mask_mode=config.mask_mode,
                norm_pix_loss=config.norm_pix_loss,
                aux_weight=config.aux_weight,
                mi_weight=config.mi_weight,
            )
        else:
            objective = ContrastiveObjective(encoder, proj_dim=config.contrastive.proj_dim,
                                             temperature=config.contrastive.temperature)  # fmt: skip
        slim = config.slimmable
        self.net = SlimmableNetwork(objective, mode=slim.mode if slim else "attn+mlp",
                                    part="encoder")  # fmt: skip
        self.widths_rng = np.random.default_rng(config.seed)
        self.recent_losses: list[float] = []

    @property
    def objective(self) -> nn.Module:
        """The objective module (full width)."""
        return self.net.model

    @property
    def encoder(self) -> TokenEncoder:
        """The encoder being pretrained (what is saved)."""
        return cast(TokenEncoder, self.net.model.encoder)

    def _inputs(self, batch: dict[str, torch.Tensor]) -> Any:
        if self.config.objective == "mae":
            return batch
        a, b = modality_views(list(batch), self.widths_rng)
        return ({m: batch[m] for m in a}, {m: batch[m] for m in b})

    def _distill(self, sub: Any, full: Any) -> torch.Tensor:
        w = self.config.slimmable.distill_weight if self.config.slimmable else 1.0
        if self.config.objective == "mae":
            terms = []
            for m, target in full.predictions.items():  # masked-patch MSE to the full width
                mask = full.prediction_masks[m]
                err = (sub.predictions[m] - target).pow(2).mean(-1)
                terms.append((err * mask).sum() / mask.sum().clamp(min=1.0))
            return w * torch.stack(terms).mean()
        # squared distance of the normalised projections (2 - 2 cos), both views
        pairs = ((sub.z_a, full.z_a), (sub.z_b, full.z_b))
        dist = [(F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(-1).mean()
                for s, t in pairs]  # fmt: skip
        return w * 0.5 * (dist[0] + dist[1])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One step (a sandwich of widths when slimmable); logs the losses."""
        cfg = self.config
        inputs = self._inputs(batch)
        widths = [1.0]
        if cfg.slimmable is not None:
            widths = sandwich_widths(cfg.slimmable.widths, cfg.slimmable.n_random,
                                     self.widths_rng)  # fmt: skip
        replay = _ReplayRandom()
        outputs: dict[float, Any] = {}

        def forward(s: float) -> Any:
            replay()
            outputs[s] = self.net(inputs, width=s)
            return outputs[s]

        res = sandwich_step(forward, widths, task_loss=lambda out: out.loss,
                            distill_loss=self._distill, backward=False)  # fmt: skip
        out = outputs[1.0]
        self.log("train/loss", out.loss, prog_bar=True)
        if cfg.objective == "mae":
            self.log("train/recon", out.recon_loss)
            self.log("train/aux", out.aux_loss)
            self.log("train/mi", out.mi_loss)
            for m, v in out.per_modality.items():
                self.log(f"train/recon_{m}", v)
        if len(widths) > 1:
            self.log("train/distill_smallest", res.losses[widths[-1]])
            self.log("train/total", res.total.detach() if res.total is not None else 0.0)
        recorded = out.recon_loss if cfg.objective == "mae" else out.loss
        self.recent_losses.append(float(recorded.detach()))
        del self.recent_losses[:-50]
        assert res.total is not None
        return res.total

    def configure_optimizers(self) -> Any:
        """AdamW (no decay on biases, norms and embeddings) with warm-up + cosine schedule."""
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "embed" in name or "token" in name else decay).append(p)
        cfg = self.config
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.95),
        )

        def factor(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns.

    Attributes:
        config: The resolved config.
        steps: Optimiser steps taken.
        final_loss: Mean reconstruction loss over the last (up to) 50 steps of rank 0.
        checkpoint_dir: The saved encoder (``None`` on ranks other than 0).
        seconds: Wall time of ``fit``.
        encoder: The trained encoder (this process's copy).
    """

    config: PretrainConfig
    steps: int
    final_loss: float
    checkpoint_dir: Path | None
    seconds: float
    encoder: TokenEncoder


def pretrain(
    config: PretrainConfig | str | Path,
    *,
    devices: int | str | None = None,
    num_nodes: int | None = None,
    accelerator: str | None = None,
    strategy: str | None = None,
    output_dir: str | Path | None = None,
    max_steps: int | None = None,
    callbacks: Sequence[L.Callback] = (),
    progress_bar: bool = True,
    command: str | None = None,
) -> PretrainResult:
    """Pretrain an encoder with masked autoencoding and save it as a checkpoint directory.

    Args:
        config: A :class:`PretrainConfig` or the path of its YAML file.
        devices: Overrides ``config.devices``.
        num_nodes: Overrides ``config.num_nodes``.
        accelerator: Overrides ``config.accelerator``.
        strategy: Lightning strategy; default ``auto`` for one process, DDP (with unused
            parameters allowed: an expert may get no token in a step) for more.
        output_dir: Overrides ``config.output_dir``.
        max_steps: Overrides ``config.max_steps``.
        callbacks: Extra Lightning callbacks.
        progress_bar: Show Lightning's progress bar.
        command: The command line recorded in the model card (default: ``sys.argv``).

    Returns:
        :class:`PretrainResult`.

    Raises:
        PretrainConfigError: for a bad config path or content.
        TypeError: if the registered model is not a token encoder.
    """
    cfg = config if isinstance(config, PretrainConfig) else load_config(config)
    updates: dict[str, Any] = {}
    if devices is not None:
        updates["devices"] = devices
    if num_nodes is not None:
        updates["num_nodes"] = num_nodes
    if accelerator is not None:
        updates["accelerator"] = accelerator
    if output_dir is not None:
        updates["output_dir"] = str(output_dir)
    if max_steps is not None:
        updates["max_steps"] = max_steps
    cfg = cfg.model_copy(update=updates)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    encoder = create_model(cfg.model, **cfg.model_kwargs)
    if not isinstance(encoder, TokenEncoder):
        raise TypeError(
            f"model {cfg.model!r} is a {type(encoder).__name__}, not a token encoder "
            "(MAPEX or GroupChannelViT); masked pretraining needs tokenize/encode"
        )
    module = PretrainModule(encoder, cfg)
    datamodule = PretrainDataModule(
        cfg.data, encoder.modalities, cfg.batch_size, num_workers=cfg.num_workers
    )
    multi = (isinstance(cfg.devices, int) and cfg.devices > 1) or cfg.num_nodes > 1
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        accelerator=cfg.accelerator,
        strategy=strategy or ("ddp_find_unused_parameters_true" if multi else "auto"),
        precision=cfg.precision,  # type: ignore[arg-type]
        default_root_dir=cfg.run_dir,
        log_every_n_steps=cfg.log_every_n_steps,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        callbacks=list(callbacks),
        logger=L.pytorch.loggers.CSVLogger(cfg.run_dir, name=cfg.name),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - t0
    losses = module.recent_losses
    final = float(np.mean(losses)) if losses else float("nan")
    out_dir: Path | None = None
    if trainer.is_global_zero:
        cmd = command or " ".join(shlex.quote(a) for a in sys.argv)
        card = {
            "title": cfg.name,
            "description": (
                (
                    f"`{cfg.model}` encoder pretrained by masked autoencoding (mask ratio "
                    f"{cfg.mask_ratio}, masked by {cfg.mask_mode}, per-modality reconstruction "
                    "of normalised patches) on "
                    if cfg.objective == "mae"
                    else f"`{cfg.model}` encoder pretrained contrastively (NT-Xent, temperature "
                    f"{cfg.contrastive.temperature}, projection {cfg.contrastive.proj_dim}, "
                    "views = two disjoint modality subsets of each scene) on "
                )
                + ("MMEarth tiles." if cfg.data.source == "mmearth" else "SynthEO scenes.")
                + (
                    f" Slimmable training (sandwich rule): widths {cfg.slimmable.widths} "
                    f"(smallest every step, {cfg.slimmable.n_random} random), mode "
                    f"{cfg.slimmable.mode}, distillation weight {cfg.slimmable.distill_weight}."
                    if cfg.slimmable is not None
                    else ""
                )
            ),
            "data": (
                f"MMEarth at {cfg.data.root}, {len(datamodule.train_set or [])} tiles "
                f"(n={cfg.data.n or 'all'}, seed={cfg.data.seed}), img_size="
                f"{cfg.data.img_size}, modalities={list(datamodule.modalities)}, options "
                f"{cfg.data.options}"
                if cfg.data.source == "mmearth"
                else f"SynthEO `pretrain` train split, n={cfg.data.n}, seed={cfg.data.seed}, "
                f"img_size={cfg.data.img_size}, modalities={list(datamodule.modalities)}, "
                "cloudy-scene probability "
                + (
                    f"{get_task('pretrain').clouds} (task default)"
                    if cfg.data.clouds is None
                    else f"{cfg.data.clouds}"
                )
            ),
            "command": f"`{cmd}`",
            "steps": trainer.global_step,
            "batch_size": f"{cfg.batch_size} per process x {trainer.world_size} process(es)",
            "global_batch": cfg.batch_size * trainer.world_size,
            "world_size": (
                f"{trainer.world_size} ({trainer.num_nodes} node(s) x "
                f"{trainer.num_devices} device(s), strategy {type(trainer.strategy).__name__}, "
                "cluster environment "
                f"{type(getattr(trainer.strategy, 'cluster_environment', None)).__name__})".replace(
                    "NoneType", "none"
                )
            ),
            "final_loss": (
                f"{final:.4f} (mean masked-patch MSE over the last {len(losses)} steps, "
                "normalised units, full width)"
                if cfg.objective == "mae"
                else f"{final:.4f} (mean NT-Xent over the last {len(losses)} steps, full width)"
            ),
            "wall_time": f"{seconds:.0f} s ({cfg.accelerator}, {trainer.world_size} process(es))",
            "torch": torch.__version__,
        }
        out_dir = save_model(encoder, cfg.output_dir, card=card)
        logger.info("saved %s (%d steps, final loss %.4f)", out_dir, trainer.global_step, final)
    return PretrainResult(cfg, trainer.global_step, final, out_dir, seconds, encoder)
