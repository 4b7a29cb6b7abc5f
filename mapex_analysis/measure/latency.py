"""Latency and throughput, measured: warm-up, median of repeats, several batch sizes.

MACs say what a variant should cost; latency says what it does cost on a given machine, so a
"pruned but not faster" variant is visible. Each batch size is timed ``repeats`` times after
``warmup`` untimed calls, under ``torch.inference_mode`` with the model in eval mode; on CUDA
the device is synchronised before reading the clock; on CPU the process's allocator is first set
to reuse freed memory (:func:`mapex_analysis.memory.reuse_freed_memory`), as a long-running
inference process's would be, so a timing is not inflated by page faults. The report records the
number of torch threads and the device, because CPU timings mean nothing without them.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mapex_analysis.memory import reuse_freed_memory
from mapex_analysis.modalities import check_inputs, unit_checks

__all__ = ["LatencyPoint", "LatencyReport", "measure_latency", "resize_batch"]

logger = logging.getLogger(__name__)

Inputs = Tensor | Mapping[str, Tensor]


@dataclass(frozen=True)
class LatencyPoint:
    """Timing of one batch size.

    Attributes:
        batch_size: Samples per forward pass.
        median_ms: Median wall-clock time of one forward pass, milliseconds.
        iqr_ms: Interquartile range (75th - 25th percentile) of the repeats, milliseconds.
        min_ms: Fastest repeat, milliseconds.
        throughput: Samples per second at the median (``batch_size / median_ms * 1000``).
        repeats: Number of timed repeats.
        times_ms: Every timed repeat, milliseconds.
    """

    batch_size: int
    median_ms: float
    iqr_ms: float
    min_ms: float
    throughput: float
    repeats: int
    times_ms: tuple[float, ...] = ()


@dataclass(frozen=True)
class LatencyReport:
    """Latency of a model at several batch sizes.

    Attributes:
        points: One :class:`LatencyPoint` per batch size, in the order measured.
        device: Device the model ran on (``"cpu"``, ``"cuda:0"``...).
        threads: ``torch.get_num_threads()`` during the measurement.
        warmup: Untimed calls before each batch size.
        model: Class name of the model.
        environment: torch version, CPU/GPU name.
    """

    points: list[LatencyPoint]
    device: str
    threads: int
    warmup: int
    model: str = ""
    environment: dict[str, str] = field(default_factory=dict)

    def point(self, batch_size: int) -> LatencyPoint:
        """The measurement at ``batch_size``.

        Raises:
            KeyError: if that batch size was not measured (lists the measured ones).
        """
        for p in self.points:
            if p.batch_size == batch_size:
                return p
        raise KeyError(
            f"batch size {batch_size} was not measured; measured: "
            f"{[p.batch_size for p in self.points]}"
        )

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per batch size (for tables and the results file)."""
        return [
            {
                k: v
                for k, v in {**asdict(p), "device": self.device, "threads": self.threads}.items()
                if k != "times_ms"
            }
            for p in self.points
        ]


def _batch_size(inputs: Inputs) -> int:
    tensors = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    sizes = {int(t.shape[0]) for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"inputs have different batch sizes {sorted(sizes)}")
    return sizes.pop()


def resize_batch(inputs: Inputs, batch_size: int) -> Inputs:
    """Inputs with ``batch_size`` samples: the first ones, or the batch tiled.

    Args:
        inputs: A tensor or a modality dict of tensors ``(B, ...)``.
        batch_size: Wanted batch size (>= 1).

    Returns:
        Same structure with leading dimension ``batch_size``.

    Raises:
        ValueError: for a batch size below 1 or inputs with mixed batch sizes.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    have = _batch_size(inputs)

    def one(t: Tensor) -> Tensor:
        if batch_size <= have:
            return t[:batch_size].contiguous()
        reps = -(-batch_size // have)
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size].contiguous()

    if isinstance(inputs, Mapping):
        return {k: one(v) for k, v in inputs.items()}
    return one(inputs)


def _to(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _environment(device: torch.device) -> dict[str, str]:
    env = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def measure_latency(
    model: nn.Module,
    inputs: Inputs,
    *,
    warmup: int = 3,
    repeats: int = 10,
    batch_sizes: Sequence[int] | None = None,
    threads: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyReport:
    """Time forward passes of ``model`` at several batch sizes.

    Args:
        model: The model; it runs on the device of its parameters, in eval mode (its
            train/eval flags are restored afterwards).
        inputs: A tensor or modality dict; it is moved to the model's device and sliced or
            tiled to each batch size (see :func:`resize_batch`).
        warmup: Untimed forward passes before timing each batch size (>= 0).
        repeats: Timed forward passes per batch size (>= 1); the median is reported.
        batch_sizes: Batch sizes to time; default the batch size of ``inputs``.
        threads: If given, ``torch.set_num_threads(threads)`` during the measurement (restored
            afterwards).
        clock: Clock in seconds (injectable for tests).

    Returns:
        The :class:`LatencyReport`.

    Raises:
        ValueError: for ``warmup < 0``, ``repeats < 1``, ``threads < 1`` or a batch size
            below 1.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(
            f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}"
        )
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    sizes = list(batch_sizes) if batch_sizes else [_batch_size(inputs)]
    device = _model_device(model)
    sync: Callable[[], None] = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )
    if device.type == "cpu":
        reuse_freed_memory()  # time the model, not the page faults of freshly mapped memory
    old_threads = torch.get_num_threads()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    points = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        n_threads = torch.get_num_threads()
        if isinstance(inputs, Mapping):
            check_inputs(inputs, where=type(model).__name__)  # once; not inside the timing
        with torch.inference_mode(), unit_checks(False):
            for b in sizes:
                x = _to(resize_batch(inputs, b), device)
                for _ in range(warmup):
                    model(x)
                sync()
                times = []
                for _ in range(repeats):
                    start = clock()
                    model(x)
                    sync()
                    times.append((clock() - start) * 1e3)
                ordered = sorted(times)
                median = statistics.median(ordered)
                points.append(
                    LatencyPoint(
                        batch_size=b,
                        median_ms=median,
                        iqr_ms=float(np.subtract(*np.percentile(ordered, [75, 25]))),
                        min_ms=ordered[0],
                        throughput=b / (median / 1e3) if median > 0 else float("inf"),
                        repeats=repeats,
                        times_ms=tuple(times),
                    )
                )
                logger.info(
                    "%s batch %d: median %.3f ms (%d threads, %s)",
                    type(model).__name__,
                    b,
                    median,
                    n_threads,
                    device,
                )
    finally:
        torch.set_num_threads(old_threads)
        for module, training in modes.items():
            module.training = training
    return LatencyReport(
        points=points,
        device=str(device),
        threads=n_threads,
        warmup=warmup,
        model=type(model).__name__,
        environment=_environment(device),
    )
