"""The soak's once-a-second sampler: RSS, open fds and threads of each process (``/proc``), the cache file's
size and the trainer's progress (steps in ``metrics.csv``), kept in memory and written to ``monitor.jsonl``.

Linux only (it reads ``/proc``); the soak's processes are its own children, so it can read their fd tables.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from pathlib import Path
from typing import Any


def process_stats(pid: int) -> dict[str, int] | None:
    """RSS (bytes), open fds and threads of ``pid``; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie: exited, not yet reaped
        return None
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "fds": fds, "threads": int(fields["Threads"])}


def file_sizes(path: Path) -> dict[str, int]:
    """Bytes of a SQLite database and its WAL and shared-memory files (0 when absent)."""
    out = {}
    for suffix in ("", "-wal", "-shm"):
        f = path.with_name(path.name + suffix)
        out[suffix.lstrip("-") or "db"] = f.stat().st_size if f.exists() else 0
    return out


class Monitor:
    """Samples every ``interval_s`` in a daemon thread; ``samples`` holds them in order.

    Args:
        out: the soak's directory (run directory, cache file).
        pids: the long-lived processes to watch, by name; the trainer is added per process (``watch_trainer``).
        interval_s: seconds between samples.
    """

    def __init__(self, out: Path, pids: dict[str, int], interval_s: float = 1.0) -> None:
        self.out, self.pids, self.interval_s = out, dict(pids), interval_s
        self.cache = out / "tool_cache.sqlite"
        self.samples: list[dict[str, Any]] = []
        self.segment = -1
        self._steps, self._seen = 0, (0.0, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        with (self.out / "monitor.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(s) + "\n" for s in self.samples)

    def watch_trainer(self, pid: int) -> int:
        """Watch a new trainer process; its segment number (0 for the first)."""
        with self._lock:
            self.pids["trainer"] = pid
            self.segment += 1
            return self.segment

    def steps_done(self) -> int:
        """1 + the last step in the run's ``metrics.csv`` (re-read only when the file changed)."""
        with self._lock:
            path = next(iter(sorted((self.out / "run" / "csv").glob("version_*/metrics.csv"))), None)
            try:
                stat = path.stat() if path else None
            except FileNotFoundError:
                stat = None
            if stat is None or (stat.st_mtime, stat.st_size) == self._seen:
                return self._steps
            try:
                with path.open(newline="", encoding="utf-8") as f:
                    steps = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")]
            except (OSError, ValueError, KeyError):  # caught mid-rewrite: keep the last reading
                return self._steps
            self._steps, self._seen = (max(steps) + 1 if steps else 0), (stat.st_mtime, stat.st_size)
            return self._steps

    def sample(self) -> dict[str, Any]:
        steps = self.steps_done()
        with self._lock:
            pids, segment = dict(self.pids), self.segment
        out: dict[str, Any] = {"t": time.time(), "segment": segment, "steps": steps}
        return out | {name: process_stats(pid) for name, pid in pids.items()} | {"cache": file_sizes(self.cache)}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.sample())
