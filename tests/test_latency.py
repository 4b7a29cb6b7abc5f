"""Latency: warm-up, median of repeats, batch sizes, threads recorded (with a fake clock)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mapex_analysis.measure import latency
from mapex_analysis.measure.latency import measure_latency, resize_batch


class _Recorder(nn.Module):
    """Records the batch size and train flag of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        t = x["rgb"] if isinstance(x, dict) else x
        self.calls.append((int(t.shape[0]), self.training))
        return self.fc(t.flatten(1)[:, :2])


class _FakeClock:
    """Each timed forward lasts the next duration (seconds); start/stop read it in pairs."""

    def __init__(self, durations: list[float]) -> None:
        self._durations: Iterator[float] = iter(durations)
        self._now = 0.0
        self._running = False

    def __call__(self) -> float:
        if self._running:
            self._now += next(self._durations)
        self._running = not self._running
        return self._now


def test_median_iqr_throughput_from_repeats() -> None:
    model = _Recorder()
    # batch 4: repeats of 1, 3, 2, 5, 4 ms -> sorted 1..5: median 3, p25 2, p75 4 -> IQR 2,
    # throughput 4 / 0.003 s = 1333.33 samples/s
    # batch 8: 10, 10, 30, 20, 20 ms -> median 20, p25 10, p75 20 -> IQR 10, 8 / 0.02 = 400/s
    durations = [0.001, 0.003, 0.002, 0.005, 0.004, 0.010, 0.010, 0.030, 0.020, 0.020]
    report = measure_latency(
        model,
        torch.randn(4, 2),
        warmup=2,
        repeats=5,
        batch_sizes=[4, 8],
        clock=_FakeClock(durations),
    )
    p4, p8 = report.point(4), report.point(8)
    assert p4.median_ms == pytest.approx(3.0)
    assert p4.iqr_ms == pytest.approx(2.0)
    assert p4.min_ms == pytest.approx(1.0)
    assert p4.throughput == pytest.approx(4 / 0.003)
    assert p8.median_ms == pytest.approx(20.0)
    assert p8.iqr_ms == pytest.approx(10.0)
    assert p8.throughput == pytest.approx(400.0)
    assert p4.repeats == 5 and len(p4.times_ms) == 5
    # 2 warm-up + 5 timed calls per batch size, each at its batch size, all in eval mode
    assert model.calls == [(4, False)] * 7 + [(8, False)] * 7
    assert model.training  # restored
    assert report.device == "cpu"
    assert [r["batch_size"] for r in report.rows()] == [4, 8]
    with pytest.raises(KeyError, match=r"batch size 16 was not measured; measured: \[4, 8\]"):
        report.point(16)


def test_threads_recorded_and_restored() -> None:
    before = torch.get_num_threads()
    report = measure_latency(
        _Recorder(), {"rgb": torch.rand(3, 3, 2, 2)}, warmup=0, repeats=1, threads=1
    )
    assert report.threads == 1
    assert torch.get_num_threads() == before
    assert report.point(3).batch_size == 3  # default: the inputs' batch size
    assert report.points[0].median_ms > 0


def test_cpu_timings_first_make_the_allocator_reuse_freed_memory(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(latency, "reuse_freed_memory", lambda: calls.append(1) or True)
    measure_latency(_Recorder(), {"rgb": torch.rand(2, 3, 2, 2)}, warmup=0, repeats=2)
    assert calls == [1]  # once per measurement, before the timed passes


def test_resize_batch_slices_and_tiles() -> None:
    x = torch.arange(3.0).view(3, 1)
    assert resize_batch(x, 2).flatten().tolist() == [0.0, 1.0]
    assert resize_batch(x, 7).flatten().tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0]
    d = resize_batch({"rgb": torch.zeros(2, 3, 4, 4), "sar": torch.zeros(2, 2, 4, 4)}, 5)
    assert {k: tuple(v.shape) for k, v in d.items()} == {"rgb": (5, 3, 4, 4), "sar": (5, 2, 4, 4)}
    with pytest.raises(ValueError, match="different batch sizes \\[2, 3\\]"):
        resize_batch({"rgb": torch.zeros(2, 1), "sar": torch.zeros(3, 1)}, 4)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="repeats >= 1, got warmup=1, repeats=0"):
        measure_latency(_Recorder(), torch.randn(2, 2), warmup=1, repeats=0)
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        measure_latency(_Recorder(), torch.randn(2, 2), batch_sizes=[0])
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        measure_latency(_Recorder(), torch.randn(2, 2), threads=0)
