"""Where models run: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, resolved once with a clear error.

A study's ``device:``, and ``--device`` of ``mapex-study run``, ``macs`` and ``pretrain``, go
through :func:`resolve_device`. ``auto`` takes the first CUDA device when one is visible and
the CPU otherwise; asking for CUDA on a machine without it is a :class:`DeviceError` that says
so (torch's CUDA build, visible device count), not a traceback from deep inside a forward
pass. :func:`device_name` is what results record next to every latency (``cuda:0 (NVIDIA
H200)``, ``cpu (x86_64)``), so numbers from different hardware are never compared
blindly.
"""

from __future__ import annotations

import platform
import re

import torch

from mapex_analysis.options import DEVICE_PATTERN

__all__ = ["DEVICE_RE", "DeviceError", "check_device_spec", "device_name", "resolve_device"]

#: The device strings a study or the command line accepts.
DEVICE_RE = re.compile(DEVICE_PATTERN)


class DeviceError(ValueError):
    """A device string that is malformed or names hardware this machine does not have."""


def check_device_spec(spec: str) -> str:
    """``spec`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        DeviceError: naming the value and the valid forms.
    """
    if not isinstance(spec, str) or not DEVICE_RE.fullmatch(spec):
        raise DeviceError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    return spec


def resolve_device(spec: str = "auto") -> torch.device:
    """The :class:`torch.device` of a device string, checked against this machine.

    Args:
        spec: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The device.

    Raises:
        DeviceError: for a malformed string, CUDA on a machine without it, or ``cuda:N``
            beyond the visible devices.
    """
    m = DEVICE_RE.fullmatch(check_device_spec(spec))
    assert m is not None
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(
            f"device {spec!r} requested, but this machine has no usable CUDA device "
            f"(torch {torch.__version__}, {build}, torch.cuda.is_available() is False); "
            "use device: cpu or device: auto"
        )
    index = int(m.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"device {spec!r} requested, but only {count} CUDA device(s) are visible "
            f"(cuda:0..cuda:{count - 1})"
        )
    return torch.device(f"cuda:{index}")


def device_name(device: torch.device | str) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu (x86_64)``: the hardware a number came from (thread
    counts are in ``environment.json``)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    cpu = platform.processor() or platform.machine()
    return f"{device.type} ({cpu})"
