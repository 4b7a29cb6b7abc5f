"""The study YAML schema: a typed, validated description of one study.

A study names models (registry names or checkpoint directories), the data, the tasks, the
operators (modality-aware expert pruning, post-hoc width slimming and their composition), the
probe protocols, the seeds and the measurements. Everything is validated on load (pydantic,
``extra="forbid"``, closed option sets as ``Literal``); errors are collected into one
:class:`StudyError` whose lines name the YAML path (``operators.slim.widths[3]``) and the
allowed values.

Example::

    name: smoke
    models:
      mapex: {source: mapex_test, role: mapex}
      dense: {source: vit_mae_test, role: dense}
    tasks: [landcover]
    operators:
      prune: {sets: [each, [rgb, sar]]}
      slim: {widths: [0.25, 0.5, 1.0], apply_to: [base, pruned]}
    protocols: [knn, linear]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mapex_analysis.config import ConfigError, Strict, format_validation_error, load_yaml, validate
from mapex_analysis.data.tasks import TASKS
from mapex_analysis.models.registry import UnknownModelError, resolve_source
from mapex_analysis.options import (
    DEFAULT_MODALITIES,
    DEVICE_PATTERN,
    SLIM_WIDTHS,
    Operator,
    Precision,
    Protocol,
    PruneStrategy,
    Role,
    Router,
    SlimMode,
    SlimOrder,
    SlimTarget,
)
from mapex_analysis.study.measures import measurement_names, selected

__all__ = [
    "STUDY_SOURCES",
    "DataConfig",
    "ExecutionConfig",
    "JobResources",
    "LatencyConfig",
    "ModelConfig",
    "OperatorsConfig",
    "PruneConfig",
    "SlimConfig",
    "Study",
    "StudyError",
    "cluster_kind",
    "format_validation_error",
    "load_study",
    "parse_study",
]


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyError(ConfigError):
    """A study file that does not validate; one line per problem, each naming its YAML path."""


def _known_names(v: list[str], valid: Sequence[str], what: str, label: str) -> list[str]:
    """``v`` if every entry is in ``valid``; else an error at the first bad entry's index."""
    for i, name in enumerate(v):
        if name not in valid:
            raise PydanticCustomError(
                f"unknown_{what}",
                "{msg}",
                {"index": i, "msg": f"unknown {what} {name!r}; {label}: {', '.join(valid)}"},
            )
    return v


def _check_widths(v: Any) -> Any:
    if v is None or v == "paper":
        return v
    for i, s in enumerate(v):
        if not 0.0 < s <= 1.0:
            raise PydanticCustomError(
                "width_range",
                "width {s} is outside (0, 1]; use values in (0, 1] or "
                '"paper" for the 31-width grid',
                {"index": i, "s": s},
            )
    return v


class ModelConfig(Strict):
    """One model of the study.

    Attributes:
        source: A registry name (``mapex_tiny``) or a checkpoint directory (``models/x``).
        role: ``mapex`` (MoE, prunable), ``dense`` (the dense baseline) or ``supervised``
            (trained from scratch on the task: a registry architecture, randomly initialised
            with ``init_seed``, evaluated only by ``protocols: [finetune]``, i.e. trained end
            to end on each task's training split; reported in the seed-style tables).
        router: For router-ablation models: the router kind (passed to registry names as
            the ``router`` keyword; for checkpoints only a label).
        kwargs: Extra keyword arguments for registry entry points (``depth=2``...).
        weights: A local weights file for a registry entry (an adapter's upstream format,
            ``.pth``/``.pt`` or ``.safetensors``; or a torchgeo weight name such as
            ``DOFABase16_Weights.DOFA_MAE``, which downloads), loaded strictly: a missing,
            unexpected or mis-shaped key is an error naming it.
        init_seed: Seed of the random initialisation of registry models.
        operators: Which of the study's operators apply to this model (e.g. only ``prune``
            for router-ablation models).
        slim_widths: Widths for slimming this model (overrides ``operators.slim.widths``;
            ``paper`` for the 31-width grid).
        slim_set_widths: Widths at which this model is also slimmed while fed each prune set's
            modalities (e.g. the dense baseline fed SAR only, so a single-modality task
            compares pruning with slimming on the same inputs); ``None``: none beyond what
            ``operators.slim.modality_sets`` adds.
        protocols: This model's evaluation protocols (overrides the study's ``protocols``;
            ``[finetune]`` for a ``supervised`` model).
        compare_with: Label of another model of the study this one is paired with in the
            report's slimming comparison (e.g. a slimmable-trained twin with its normally
            trained one): each width's metric and retention are marked when their intervals
            do not overlap the partner's.
        tasks: The study tasks this model is evaluated on (default: all; e.g. a U-Net
            baseline only on ``segmentation``).
    """

    source: str
    role: Role = "mapex"
    router: Router | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    init_seed: int = 0
    operators: list[Operator] = Field(default=["prune", "slim"])
    slim_widths: Literal["paper"] | list[float] | None = None
    slim_set_widths: list[float] | None = None
    protocols: list[Protocol] | None = None
    compare_with: str | None = None
    tasks: list[str] | None = None

    @field_validator("slim_widths", "slim_set_widths")
    @classmethod
    def _slim_widths(cls, v: Any) -> Any:
        return _check_widths(v)

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        try:
            resolve_source(v)
        except UnknownModelError as err:
            raise ValueError(str(err)) from None
        return v

    @field_validator("weights")
    @classmethod
    def _weights_file(cls, v: str | None) -> str | None:
        if v is None or "_Weights." in v:  # torchgeo weight enum names
            return v
        if not Path(v).is_file():
            raise ValueError(
                f"weights file {v!r} does not exist (a local .pth/.pt/.safetensors file, or a "
                "torchgeo weight name such as DOFABase16_Weights.DOFA_MAE)"
            )
        return v

    @model_validator(mode="after")
    def _weights_for_registry(self) -> ModelConfig:
        if self.weights is not None and self.is_checkpoint:
            raise ValueError(
                f"weights: {self.source} is a checkpoint directory and carries its own weights"
            )
        if self.role == "supervised":
            if self.is_checkpoint or self.weights is not None:
                raise ValueError(
                    f"role supervised is trained from scratch: give a registry architecture, "
                    f"not the pretrained {self.weights or self.source}"
                )
            if self.protocols != ["finetune"]:
                raise ValueError(
                    "role supervised is trained on the task from random init: set "
                    f"protocols: [finetune] (got {self.protocols}); frozen probes of a random "
                    "network are not a supervised baseline"
                )
        return self

    @property
    def is_checkpoint(self) -> bool:
        """Whether :attr:`source` is a checkpoint directory."""
        return resolve_source(self.source, check=False).is_checkpoint


#: Real-data sources a study can read (``mmearth`` is for pretraining).
STUDY_SOURCES: tuple[str, ...] = (
    "eurosat", "bigearthnet_v2", "mmflood", "m-eurosat", "m-bigearthnet", "m-brick-kiln",
    "m-so2sat",
)  # fmt: skip

DataSource = Literal[
    "syntheo", "eurosat", "bigearthnet_v2", "mmflood", "m-eurosat", "m-bigearthnet",
    "m-brick-kiln", "m-so2sat",
]  # fmt: skip


StudySplit = Literal["train", "test"]


def _default_splits() -> dict[StudySplit, str]:
    return {"train": "train", "test": "test"}


class DataConfig(Strict):
    """The data: SynthEO (the built-in seeded generator) or a real dataset on disk.

    Attributes:
        source: ``syntheo`` (default), a torchgeo dataset (``eurosat``, ``bigearthnet_v2``,
            ``mmflood``) or a GEO-Bench classification task (``m-eurosat``, ``m-bigearthnet``,
            ``m-brick-kiln``, ``m-so2sat``). A real source gives the study its one task (kind
            and classes from the source).
        root: Directory of a real source (in torchgeo's layout, or a GEO-Bench task folder).
        splits: Study split -> the source's split (``{train: train, test: val}``); the study
            uses ``train`` (probe fitting, calibration) and ``test`` (scoring).
        seed: Base seed of the generator or of the sample draw (the study seed is added).
        img_size: Scene size in pixels (real sources: every sample is brought to it; chip
            size for MMFlood).
        resize: How real samples reach ``img_size``: ``bilinear`` resampling (label maps:
            nearest) or a centre ``crop`` (samples smaller than ``img_size`` are errors).
        n_train: Training scenes per task, or ``all`` (real sources).
        n_test: Test scenes per task, or ``all`` (real sources).
        clouds: SynthEO cloud probability override (``None``: the task's default).
        batch_size: Samples per forward pass during feature extraction, pruning calibration
            and routing collection. Features do not depend on it (equal at 32, 64 and 250);
            time does: at 250 scenes of six modalities an activation is ~50 MB, beyond the
            allocator's reuse limit, so every tensor is freshly mapped and page-faulted
            (a third of a two-worker run's CPU time went to the kernel); 64 keeps them reused.
        options: Extra keyword arguments of a real source (``sar_scale: db`` for MMFlood...).
        check_units: Refuse model inputs whose values cannot be in their physical unit (raw
            digital numbers, linear SAR power, NaN); ``false`` opts out explicitly.
    """

    source: DataSource = "syntheo"
    root: str | None = None
    splits: dict[StudySplit, str] = Field(default_factory=_default_splits)
    seed: int = 0
    img_size: int = Field(default=32, ge=8)
    resize: Literal["bilinear", "crop"] = "bilinear"
    n_train: int | Literal["all"] = 256
    n_test: int | Literal["all"] = 256
    clouds: float | None = Field(default=None, ge=0.0, le=1.0)
    batch_size: int = Field(default=64, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    check_units: bool = True

    @field_validator("n_train", "n_test")
    @classmethod
    def _n(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 10:
            raise ValueError(f"{v} scenes are too few; use at least 10 (or all)")
        return v

    @model_validator(mode="after")
    def _source_fields(self) -> DataConfig:
        if self.source == "syntheo":
            bad = [k for k in ("n_train", "n_test") if getattr(self, k) == "all"]
            if bad:
                raise ValueError(f"{bad[0]}: all needs a real source; SynthEO takes a number")
            if self.root is not None or self.options:
                raise ValueError("root and options are for real sources; SynthEO takes neither")
        else:
            if self.root is None:
                raise ValueError(f"source {self.source!r} needs root: the dataset directory")
            if self.clouds is not None:
                raise ValueError("clouds is a SynthEO setting; a real source has its own clouds")
            missing = [k for k in ("train", "test") if k not in self.splits]
            if missing:
                raise ValueError(f"splits needs a source split for {', '.join(missing)}")
        return self

    @property
    def is_real(self) -> bool:
        """Whether the data is a real source (not SynthEO)."""
        return self.source != "syntheo"

    def n(self, split: str) -> int | None:
        """Samples of a study split (``None``: all)."""
        v = self.n_train if split == "train" else self.n_test
        return None if v == "all" else int(v)


ModalitySet = list[str]


def _check_modality_set(v: Any) -> list[str]:
    if not isinstance(v, list):
        raise ValueError(f"a modality set is a list of modalities from {list(DEFAULT_MODALITIES)}")
    if not v:
        raise ValueError(f"empty modality set; choose from {list(DEFAULT_MODALITIES)}")
    for m in v:
        if m not in DEFAULT_MODALITIES:
            raise ValueError(f"unknown modality {m!r}; valid: {', '.join(DEFAULT_MODALITIES)}")
    if len(set(v)) != len(v):
        raise ValueError(f"modality set {v} repeats a modality")
    return [m for m in DEFAULT_MODALITIES if m in v]


class PruneConfig(Strict):
    """Modality-aware expert pruning.

    Attributes:
        sets: Modality sets to prune to: ``each`` (every single modality) and/or explicit
            lists (``[rgb, sar]``).
        strategy: ``static`` (keep the task modalities' groups) or ``routing`` (calibrated).
        coverage: Routed-token share kept by the ``routing`` strategy.
        coverages: Also prune every set with the ``routing`` strategy at each of these
            coverages (a sweep: accuracy vs kept experts), in addition to ``strategy``.
        calibration_samples: Scenes of the first task's ``train`` split used as calibration
            data (``routing`` plans and the ``traffic_to_removed`` of every pruned model).
    """

    sets: list[Literal["each"] | list[str]] = Field(default=["each"])
    strategy: PruneStrategy = "static"
    coverage: float = Field(default=0.99, gt=0.0, le=1.0)
    coverages: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default_factory=list)
    calibration_samples: int = Field(default=256, ge=1)

    def plans(self) -> list[tuple[str, float | None]]:
        """``(strategy, coverage)`` of every pruned variant: ``strategy`` first (coverage
        ``None`` for ``static``), then ``routing`` at each of :attr:`coverages`."""
        first: tuple[str, float | None] = (
            (self.strategy, self.coverage) if self.strategy == "routing" else ("static", None)
        )
        out = [first]
        for c in self.coverages:
            if ("routing", c) not in out:
                out.append(("routing", c))
        return out

    @field_validator("sets", mode="before")
    @classmethod
    def _sets(cls, v: Any) -> Any:
        if not isinstance(v, list):
            raise ValueError(
                'sets is a list of "each" and/or modality lists, e.g. [each, [rgb, sar]]'
            )
        if not v:
            raise ValueError("sets is empty; use [each] or explicit modality lists")
        return v

    @field_validator("sets")
    @classmethod
    def _check_sets(cls, v: list[Any]) -> list[Any]:
        errors = []
        out: list[Any] = []
        for i, s in enumerate(v):
            if s == "each":
                out.append(s)
                continue
            try:
                out.append(_check_modality_set(s))
            except ValueError as err:
                errors.append((i, str(err)))
        if errors:
            i, msg = errors[0]
            raise PydanticCustomError("modality_set", "{msg}", {"index": i, "msg": msg})
        return out

    def expanded(self, available: Sequence[str]) -> list[tuple[str, ...]]:
        """Concrete modality sets, in order, duplicates removed.

        Args:
            available: Modalities the model has (``each`` expands over these).

        Returns:
            Modality tuples in canonical modality order.
        """
        out: list[tuple[str, ...]] = []
        for s in self.sets:
            cand = [(m,) for m in available] if s == "each" else [tuple(s)]
            for c in cand:
                if all(m in available for m in c) and c not in out:
                    out.append(c)
        return out


class SlimConfig(Strict):
    """Post-hoc uniform width slimming.

    Attributes:
        widths: Width factors in (0, 1], or ``paper`` for the 31-width grid.
        modes: Sub-layers slimmed: ``attn+mlp``, ``attn``, ``mlp``.
        orders: Which dims are kept: ``first`` (paper), ``last``, ``random``, ``magnitude``.
        apply_to: What is slimmed: ``base`` (the full model, all its modalities) and/or ``pruned``
            (every pruned variant: prune-then-slim).
        modality_sets: Also slim the full model fed each of the prune sets (so a task with
            only those modalities can compare both operators on the same input).
        pruned_widths: Widths used for prune-then-slim (default: :attr:`widths`), so the
            composition can use a coarser grid than slimming alone.
        seed: Seed of the ``random`` order.
    """

    widths: Literal["paper"] | list[float] = "paper"
    pruned_widths: Literal["paper"] | list[float] | None = None
    modes: list[SlimMode] = Field(default=["attn+mlp"], min_length=1)
    orders: list[SlimOrder] = Field(default=["first"], min_length=1)
    apply_to: list[SlimTarget] = Field(default=["base"], min_length=1)
    modality_sets: bool = False
    seed: int = 0

    @field_validator("widths", "pruned_widths", mode="before")
    @classmethod
    def _widths_type(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError('widths is empty; give widths in (0, 1] or "paper"')
        return v

    @field_validator("widths", "pruned_widths")
    @classmethod
    def _widths(cls, v: Any) -> Any:
        return _check_widths(v)

    def width_list(self, pruned: bool = False, override: Any = None) -> list[float]:
        """Concrete widths, descending (``paper`` expanded to the 31-width grid).

        Args:
            pruned: The widths of prune-then-slim (:attr:`pruned_widths`, else :attr:`widths`).
            override: A model's own ``slim_widths`` (used for ``pruned=False`` when given).

        Returns:
            The widths.
        """
        widths = self.pruned_widths if pruned and self.pruned_widths is not None else self.widths
        if not pruned and override is not None:
            widths = override
        if widths == "paper":
            vals = list(SLIM_WIDTHS)
        else:
            vals = list(widths)
        return sorted(set(vals), reverse=True)


class OperatorsConfig(Strict):
    """The operators applied to each model.

    Attributes:
        prune: Pruning (MAPEX models only), or ``None``.
        slim: Slimming, or ``None``.
    """

    prune: PruneConfig | None = None
    slim: SlimConfig | None = None


class LatencyConfig(Strict):
    """Latency measurement settings.

    Attributes:
        batch_sizes: Batch sizes timed.
        warmup: Untimed calls per batch size.
        repeats: Timed calls per batch size (median reported).
        threads: Torch threads during timing (``None``: the current setting).
        widths: Slimming widths whose variants are timed (``None``: all); every variant
            without slimming is always timed.
    """

    batch_sizes: list[int] = Field(default=[1, 32], min_length=1)
    warmup: int = Field(default=2, ge=0)
    repeats: int = Field(default=5, ge=1)
    threads: int | None = Field(default=None, ge=1)
    widths: list[float] | None = None


#: Variant kinds fine-tuning can run on (``prune``: static pruning; ``prune_routing``: the
#: routing strategy at a coverage).
FinetuneVariant = Literal["base", "prune", "prune_routing", "slim", "prune+slim"]


class FinetuneConfig(Strict):
    """Short fine-tuning settings (protocol ``finetune``).

    Attributes:
        epochs: Passes over the training split.
        lr: AdamW learning rate.
        batch_size: Samples per step.
        variants: The variant kinds a model with the ``finetune`` protocol is fine-tuned as
            (default: the unmodified model and its statically pruned variants, the rows of the
            seed-style tables; slimming is post hoc and evaluated frozen). The other variants
            get the frozen protocols only.
    """

    epochs: int = Field(default=3, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    batch_size: int = Field(default=64, ge=1)
    variants: list[FinetuneVariant] = Field(default=["base", "prune"], min_length=1)


def cluster_kind(spec: str) -> tuple[str, int]:
    """``(kind, workers)`` of a cluster string (``execution.cluster``, ``--cluster``).

    Args:
        spec: ``serial``, ``local``, ``local:N``, ``slurm``, ``pbs`` or ``tcp://host:port``.

    Returns:
        ``("serial", 1)``, ``("local", N)`` (N = 2 for plain ``local``), ``("slurm", 0)``,
        ``("pbs", 0)`` or ``("address", 0)``.

    Raises:
        ValueError: for anything else (naming the value and the valid forms).
    """
    if spec == "serial":
        return "serial", 1
    m = re.fullmatch(r"local(?::([1-9][0-9]*))?", spec)
    if m:
        return "local", int(m.group(1) or 2)
    if spec in ("slurm", "pbs"):
        return spec, 0
    if re.fullmatch(r"tcp://[^\s:]+:[0-9]+", spec):
        return "address", 0
    raise ValueError(
        f"cluster {spec!r} is not one of serial, local, local:N, slurm, pbs, tcp://host:port"
    )


class JobResources(Strict):
    """Resources of one batch job (one Dask worker) on SLURM or PBS (``dask-jobqueue``).

    Attributes:
        jobs: Jobs (workers) to request.
        cores: CPU cores per job.
        memory: Memory per job (``"32GB"``).
        gpus: GPUs per job (each becomes the worker resource ``GPU``: a cell that needs a GPU
            takes one).
        walltime: Job wall-clock limit (``"02:00:00"``).
        queue: Partition / queue.
        account: Account / project to charge.
        job_extra: Extra scheduler directives (``["--constraint=a100"]``).
        prologue: Shell lines run before the worker starts (``["module load cuda"]``).
    """

    jobs: int = Field(default=1, ge=1)
    cores: int = Field(default=4, ge=1)
    memory: str = "16GB"
    gpus: int = Field(default=0, ge=0)
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    job_extra: list[str] = Field(default_factory=list)
    prologue: list[str] = Field(default_factory=list)


class ExecutionConfig(Strict):
    """Where the cells run.

    Attributes:
        cluster: ``serial`` (one process, the default), ``local`` / ``local:N`` (a Dask
            ``LocalCluster`` of N worker processes on this machine, default 2), ``slurm`` /
            ``pbs`` (``dask-jobqueue`` with :attr:`resources`), or the address of a running
            Dask scheduler (``tcp://host:8786``).
        threads_per_worker: Torch threads of each worker (cells run one at a time per worker).
        gpus: ``local`` only: GPUs of this machine given one per worker (``CUDA_VISIBLE_DEVICES``
            per worker, resource ``GPU=1``); 0 for none.
        resources: Batch-job resources for ``slurm`` / ``pbs``.
    """

    cluster: str = "serial"
    threads_per_worker: int = Field(default=1, ge=1)
    gpus: int = Field(default=0, ge=0)
    resources: JobResources = JobResources()

    @field_validator("cluster")
    @classmethod
    def _check_cluster(cls, v: str) -> str:
        cluster_kind(v)
        return v


class Study(Strict):
    """A whole study.

    Attributes:
        name: Study name; results go to ``<output_dir>/<name>/``.
        description: Free text shown in the report.
        models: Label -> :class:`ModelConfig` (labels appear in tables and variant keys).
        data: :class:`DataConfig`.
        tasks: SynthEO task names.
        operators: :class:`OperatorsConfig`.
        protocols: ``knn``, ``linear``, ``finetune``; ``[]`` for a cost-only study (no eval
            cells: MACs, parameters, latency on synthetic inputs in physical units, fed every
            modality a model takes).
        knn_k: Neighbours of the k-NN probe.
        seeds: Seeds (data draw and probe initialisation).
        measurements: What is measured besides the probes (``specialization`` on the first
            task only: routing depends on the scenes, not on the label).
        latency: :class:`LatencyConfig`.
        finetune: :class:`FinetuneConfig`.
        attribution_samples: Test samples explained per cell by modality attribution.
        retention_target: Retention the report's per-modality sentences look for.
        output_dir: Parent folder of the study's results.
        execution: :class:`ExecutionConfig` (where the cells run; ``--cluster`` overrides it).
        device: Where models run: ``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda``,
            ``cuda:N`` (``--device`` overrides it). Feature extraction, fine-tuning, MAC
            counting and latency run there; every row records the device's name.
        precision: Feature extraction precision: ``fp32``, or ``bf16`` / ``fp16`` autocast
            (recorded in every eval row).
    """

    name: str
    description: str = ""
    models: dict[str, ModelConfig] = Field(min_length=1)
    data: DataConfig = DataConfig()
    protocols: list[Protocol] = Field(default=["knn", "linear"])
    tasks: list[str] = Field(default_factory=list, validate_default=True)
    operators: OperatorsConfig = OperatorsConfig()
    knn_k: int = Field(default=5, ge=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    measurements: list[str] = Field(default=["macs", "params"])
    latency: LatencyConfig = LatencyConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    attribution_samples: int = Field(default=64, ge=2)
    retention_target: float = Field(default=0.95, gt=0.0, le=1.0)
    output_dir: str = "reports"
    execution: ExecutionConfig = ExecutionConfig()
    device: str = "auto"
    precision: Precision = "fp32"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, v):
            raise ValueError(f"device {v!r} is not one of auto, cpu, cuda, cuda:N")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must be letters, digits, '_', '-', '.' (it names a folder)")
        return v

    @field_validator("models")
    @classmethod
    def _labels(cls, v: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for label, cfg in v.items():
            if not _NAME_RE.match(label):
                raise ValueError(f"model label {label!r} must be letters, digits, '_', '-', '.'")
            if cfg.compare_with is not None and cfg.compare_with not in v:
                raise ValueError(
                    f"{label}.compare_with: unknown model {cfg.compare_with!r}; models: "
                    + ", ".join(v)
                )
        return v

    @model_validator(mode="after")
    def _model_tasks(self) -> Study:
        for label, cfg in self.models.items():
            unknown = [t for t in cfg.tasks or [] if t not in self.tasks]
            if unknown or cfg.tasks == []:
                raise ValueError(
                    f"models.{label}.tasks: {', '.join(unknown) or '[]'} is not among the "
                    f"study's tasks ({', '.join(self.tasks) or 'none'})"
                )
        return self

    @field_validator("measurements")
    @classmethod
    def _measurements(cls, v: list[str], info: ValidationInfo) -> list[str]:
        _known_names(v, measurement_names(), "measurement", "valid")
        if info.data.get("protocols") == []:
            evals = selected(v, "eval")
            if evals:
                raise ValueError(
                    f"{', '.join(evals)} run on eval cells, which a study with protocols: [] "
                    "(cost only) has none of; give a protocol or drop them"
                )
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str], info: ValidationInfo) -> list[str]:
        data = info.data.get("data")
        source = data.source if isinstance(data, DataConfig) else "syntheo"
        if source != "syntheo":
            if v not in ([], [source]):
                raise ValueError(
                    f"data.source {source} gives the study its one task {source!r} (kind and "
                    f"classes from the files); write tasks: [{source}] or omit tasks"
                )
            return [source]
        if not v and info.data.get("protocols") == []:
            return v  # cost only: no task is evaluated
        if not v:
            raise ValueError(
                "give at least one SynthEO task ("
                + ", ".join(t for t, sp in TASKS.items() if sp.kind != "unlabelled")
                + ")"
            )
        valid = [t for t, spec in TASKS.items() if spec.kind != "unlabelled"]
        return _known_names(v, valid, "task", "valid tasks")

    @property
    def study_dir(self) -> Path:
        """``<output_dir>/<name>``."""
        return Path(self.output_dir) / self.name


def parse_study(data: Any, *, source: str = "study") -> Study:
    """Validate a parsed YAML document.

    Args:
        data: The document (a mapping).
        source: Name shown in error messages.

    Returns:
        The validated :class:`Study`.

    Raises:
        StudyError: listing every problem with its YAML path and the allowed values.
    """
    if not isinstance(data, dict):
        raise StudyError(f"{source}: a study is a YAML mapping, got {type(data).__name__}")
    return validate(Study, data, source=source, error=StudyError)


def load_study(path: str | Path) -> Study:
    """Read and validate a study YAML file.

    Args:
        path: The YAML file.

    Returns:
        The validated :class:`Study`.

    Raises:
        StudyError: if the file is missing, is not YAML, or does not validate (every problem
            with its YAML path).
    """
    data = load_yaml(path, what="study", error=StudyError)
    return parse_study(data, source=str(path))
