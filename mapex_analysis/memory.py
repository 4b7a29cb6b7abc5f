"""Process memory settings for steady-state CPU runs.

PyTorch's CPU allocator hands every freed tensor back to ``malloc``; what glibc then does with
it decides whether the next forward pass reuses warm pages or page-faults fresh ones.
:func:`reuse_freed_memory` makes it keep and reuse them.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["reuse_freed_memory"]

#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`reuse_freed_memory` sets: blocks
#: up to 32 MiB (glibc's largest mmap threshold) come from the heap, and up to 1 GiB of free
#: memory at its top stays mapped.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 * 1024 * 1024, 1 << 30


@functools.cache
def reuse_freed_memory() -> bool:
    """Make this process's allocator keep and reuse freed memory (glibc only; once per process).

    A worker whose environment sets ``MALLOC_TRIM_THRESHOLD_`` (Dask's nanny does, see
    :func:`mapex_analysis.study.execution.local_worker_environ`; on SLURM / PBS the node's
    configuration decides) has glibc's dynamic thresholds switched off: every activation of more than 128 KiB is mapped and
    page-faulted afresh. Setting both thresholds explicitly restores reuse (measured: 1.76 M
    page faults of a six-modality feature pass -> 3). Even with the dynamic thresholds, glibc
    trims the freed top of its heap and maps large blocks afresh often enough to fault a few
    thousand pages per forward pass of a small model (one MoE layer's tensors change size with
    the routing). Called by each study worker before its first cell and by
    :func:`mapex_analysis.measure.latency.measure_latency` before it times CPU models, so
    latencies measure the model, not the kernel's page faulting.

    Returns:
        Whether the thresholds were set (``False`` without glibc: nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):  # not glibc (macOS, musl): keep the allocator's own
        return False
