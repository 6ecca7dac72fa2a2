"""Timing helpers shared by the benchmarks: median wall time of repeated calls, peak memory, a plain-text table."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["median_seconds", "device_median_ms", "peak_memory_gb", "format_table"]


def median_seconds(
    fn: Callable[[], object], repeat: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None
) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` runs (``sync`` waits for a device)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_median_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median ms of ``fn()`` after one warm-up; on CUDA each run starts and ends with a synchronize."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return median_seconds(fn, repeat=repeat, warmup=1, sync=sync) * 1e3


def peak_memory_gb(device: torch.device) -> float:
    """torch.cuda.max_memory_allocated on CUDA (since the last reset), else the process' peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def format_table(rows: Sequence[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])
