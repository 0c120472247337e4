"""Does the trainer leak? One ``mmsr fit`` process on the smoke config, RSS sampled after every step and
Python's allocations traced, to tell a leak from an allocator that keeps what it once needed.

The soak's first trainer process grew 86 MB per 100 steps and its second stayed flat; with kills and
restarts in between that cannot be told apart. Here one process runs ``--steps`` steps in-process with
``tracemalloc`` on. ``MemoryTrace`` records, after each step, RSS and the bytes ``tracemalloc`` holds
(every Python-level allocation: lists, dicts, strings, numpy buffers; not torch's C++ tensor storage,
which is why live tensors are counted apart). At each ``--snapshot-every`` step it dumps a
``tracemalloc`` snapshot, counts live objects per type and the bytes of live CPU tensor storages, then
asks glibc to return its free pages (``malloc_trim``)
and records RSS again: RSS that falls back after the trim was free memory the allocator held, not a leak.
``--always-search`` forces an image and a text search into every episode as the soak does
(``benchmarks/soak_engine.py``), over the offline tools. Writes ``steps.jsonl`` and ``report.json``:

    PYTHONPATH=tests/cpu_shim OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_trace.py --steps 300 --out runs/memory
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.soak_monitor import process_stats

MB = 2**20


def malloc_trim() -> bool:
    """Ask glibc to return free heap pages to the system; False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def live_types() -> collections.Counter:
    """Live objects the garbage collector tracks, by type name, and the bytes of the CPU tensor storages they hold."""
    gc.collect()
    counts: collections.Counter = collections.Counter()
    storages: dict[int, int] = {}  # data pointer -> bytes: views share one storage
    for obj in gc.get_objects():
        counts[type(obj).__name__] += 1
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    counts["tensor_storage_bytes"] = sum(storages.values())
    return counts


class MemoryTrace(L.Callback):
    """Per step: RSS and traced bytes; every ``snapshot_every`` steps a snapshot (module docstring)."""

    def __init__(self, out: str, snapshot_every: int = 100) -> None:
        self.out, self.snapshot_every = Path(out), snapshot_every
        self.steps: list[dict[str, Any]] = []
        self.snapshots: dict[int, tuple[Path, collections.Counter]] = {}  # kept on disk, not counted
        self.t0 = time.time()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps done
        row = {"step": step, "t": round(time.time() - self.t0, 1), "rss": process_stats(os.getpid())["rss"],
               "traced": tracemalloc.get_traced_memory()[0]}  # fmt: skip
        if step % self.snapshot_every == 0:
            types = live_types()  # counted first: a snapshot in memory is 10^5 tuples
            tracemalloc.take_snapshot().dump(str(self.out / f"step_{step}.tracemalloc"))
            self.snapshots[step] = (self.out / f"step_{step}.tracemalloc", types)
            row["trimmed"] = malloc_trim()
            row["rss_after_trim"] = process_stats(os.getpid())["rss"]
        self.steps.append(row)
        with (self.out / "steps.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.out / "report.json").write_text(json.dumps(report(self.steps, self.snapshots), indent=1))


def growth(steps: list[dict[str, Any]], key: str, first: int, last: int) -> float:
    """Least-squares slope of ``key`` in MB per 100 steps over steps ``first``..``last``."""
    pts = [(s["step"], s[key] / MB) for s in steps if first <= s["step"] <= last]
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    var = sum((x - mx) ** 2 for x, _ in pts)
    return 100 * sum((x - mx) * (y - my) for x, y in pts) / var if var else 0.0


def report(steps: list[dict[str, Any]], snapshots: dict[int, tuple[Path, collections.Counter]]) -> dict[str, Any]:
    """Slopes after the first snapshot (warm-up), and what grew between the first and the last snapshot."""
    marks = sorted(snapshots)
    out: dict[str, Any] = {"steps": len(steps), "wall_s": steps[-1]["t"] if steps else 0,
                           "at_snapshots": [s for s in steps if "rss_after_trim" in s]}  # fmt: skip
    if len(marks) < 2:
        return out
    first, last = marks[0], marks[-1]
    # RSS is left out: each trim lets it fall and regrow, so its slope says nothing
    out["traced_mb_per_100_steps"] = round(growth(steps, "traced", first + 1, last), 2)
    own = [tracemalloc.Filter(False, f) for f in (tracemalloc.__file__, __file__, "*/soak_monitor.py")]
    snaps = {s: tracemalloc.Snapshot.load(str(path)).filter_traces(own) for s, (path, _) in snapshots.items()}
    out["traced_mb_less_tracer"] = {s: round(sum(t.size for t in snap.traces) / MB, 2) for s, snap in snaps.items()}
    diff = snaps[last].compare_to(snaps[first], "lineno")
    out["traced_growth_top"] = [{"where": str(d.traceback), "kb": round(d.size_diff / 1024, 1), "count": d.count_diff}
                                for d in diff[:15]]  # fmt: skip
    types_a, types_b = snapshots[first][1], snapshots[last][1]
    grew = {k: types_b[k] - types_a[k] for k in types_b | types_a if types_b[k] != types_a[k]}
    out["live_objects_growth"] = dict(sorted(grew.items(), key=lambda kv: -abs(kv[1]))[:20])
    return out


def config(o: argparse.Namespace) -> dict[str, Any]:
    """The smoke config: ``--steps`` steps, a checkpoint after each step (as the soak), the trace."""
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text(encoding="utf-8"))
    run = str(o.out / "run")
    cfg["trainer"].update(max_steps=o.steps, default_root_dir=run, enable_progress_bar=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = run
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(o.out / "ckpt"), "save_top_k": 0, "save_last": True, "every_n_train_steps": 1}},
        {"class_path": "mmsr.callbacks.trajectory_logger.TrajectoryLogger",
         "init_args": {"every_n_steps": 1, "max_trajectories": 8}},
        {"class_path": "benchmarks.memory_trace.MemoryTrace",
         "init_args": {"out": str(o.out), "snapshot_every": o.snapshot_every}},
    ]  # fmt: skip
    model = cfg["model"]["init_args"]
    if o.always_search:
        model["engine"] = {"class_path": "benchmarks.soak_engine.AlwaysSearch", "init_args": {"inner": model["engine"]}}
        model["rollout"].update(max_tokens_per_turn=48)  # forced queries: <= 30 tokens
    return cfg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--snapshot-every", type=int, default=100)
    p.add_argument("--always-search", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "memory")
    o = p.parse_args(argv)
    o.out = o.out.resolve()
    o.out.mkdir(parents=True, exist_ok=True)
    (o.out / "steps.jsonl").unlink(missing_ok=True)
    (o.out / "config.yaml").write_text(yaml.safe_dump(config(o), sort_keys=False), encoding="utf-8")
    tracemalloc.start()
    from mmsr.cli import lightning_cli

    os.chdir(ROOT)  # the smoke config's data paths are relative to the repository
    lightning_cli(["fit", "-c", str(o.out / "config.yaml")])
    print((o.out / "report.json").read_text())


if __name__ == "__main__":
    main()
