"""Peak resident memory (RSS) of each demo stage, as the kernel counts it (Linux ``/proc``).

``mmsr demo`` records every stage's peak in ``summary.json`` (``memory``), so a run says what it
needed and where; ``benchmarks/demo_memory.py`` prints them. Before a stage starts, the previous
stage's objects are collected and glibc is asked to return its free pages (``malloc_trim``): without
that, the warm start's freed heap would be counted again as the next stage's resident memory.
"""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MB = 2**20
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` size in MB (``VmRSS``: now, ``VmHWM``: the peak); None off Linux."""
    return status_values(key)[0]


def status_values(*keys: str) -> tuple[float | None, ...]:
    """``status_mb`` of each key, all from one read of the file (so a peak is never below the RSS read
    with it, whatever another thread allocates meanwhile)."""
    try:
        lines = STATUS.read_text().splitlines()
    except OSError:
        lines = []
    return tuple(next((int(line.split()[1]) * 1024 / MB for line in lines if line.startswith(k + ":")), None)
                 for k in keys)  # fmt: skip


def reset_peak() -> bool:
    """Start ``VmHWM`` afresh at the current RSS (``5`` to ``clear_refs``, Linux >= 4.0); False where
    it cannot be reset (the peak then counts from the process start)."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect unreachable objects (a finished stage's trainer and module sit in reference cycles) and
    return glibc's free heap pages to the system (a no-op without glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StageMemory:
    """Records, per named stage, its peak RSS, its RSS at the end and its wall time.

    ``stages[name]``: ``{"peak_rss_mb", "end_rss_mb", "seconds", "peak_from_start"}``; the RSS values
    are None off Linux, and ``peak_from_start`` says the peak could not be reset before the stage.
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float | bool | None]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        release_memory()
        was_reset = reset_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            # one read: two reads let a thread's allocation in between put the end above the peak
            peak, end = status_values("VmHWM", "VmRSS")
            self.stages[name] = {"peak_rss_mb": _round(peak), "end_rss_mb": _round(end),
                                 "seconds": round(time.perf_counter() - start, 1), "peak_from_start": not was_reset}  # fmt: skip

    def peak_mb(self) -> float | None:
        """The highest stage peak."""
        peaks = [s["peak_rss_mb"] for s in self.stages.values() if s["peak_rss_mb"] is not None]
        return max(peaks) if peaks else None


def _round(mb: float | None) -> float | None:
    return None if mb is None else round(mb, 1)
