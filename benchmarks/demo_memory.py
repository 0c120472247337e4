"""Peak resident memory of ``mmsr demo``, per stage: the demo runs in a subprocess (so only its own
memory is counted), records each stage's peak RSS in ``summary.json`` (``mmsr.demo.memory``), and this
prints them with the process's overall peak (``VmRSS`` sampled every 50 ms from outside, which also
covers the final plots and report page) as one JSON object.

    PYTHONPATH=tests/cpu_shim .venv/bin/python benchmarks/demo_memory.py --out runs/demo_memory
    PYTHONPATH=tests/cpu_shim .venv/bin/python benchmarks/demo_memory.py --out /tmp/demo_short -- \\
        --reading-steps 40 --sft-steps 120 --grpo-steps 6 --eval-limit 12

Arguments after ``--`` go to ``mmsr demo`` unchanged (the defaults run the full demo, seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


def sample_peak(pid: int, peak: list[float], every_s: float = 0.05) -> None:
    """Keep ``peak[0]`` at the highest ``VmRSS`` (MB) of process ``pid`` until it ends. Sampled from
    outside: the demo resets its own ``VmHWM`` per stage, and with it the kernel's ``ru_maxrss``."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:  # the process is gone
            return
        rss = next((int(line.split()[1]) / 1024 for line in text.splitlines() if line.startswith("VmRSS:")), None)
        if rss is None:  # a zombie has no VmRSS
            return
        peak[0] = max(peak[0], rss)
        time.sleep(every_s)


class DemoRun(NamedTuple):
    """One ``mmsr demo`` child: its exit status, sampled peak RSS (MB), wall seconds and output."""

    status: int
    peak_mb: float
    wall_s: float
    stdout: str
    stderr: str


def run_demo(out: Path, seed: int, demo_args: list[str]) -> DemoRun:
    """Run ``mmsr demo`` in a child process, its RSS sampled from outside."""
    cmd = [sys.executable, "-m", "mmsr", "demo", "--out", str(out), "--seed", str(seed), *demo_args]
    start, peak = time.perf_counter(), [0.0]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=stderr, text=True)
        sampler = threading.Thread(target=sample_peak, args=(child.pid, peak), daemon=True)
        sampler.start()
        child.wait()
        sampler.join()
        wall = time.perf_counter() - start
        stdout.seek(0)
        stderr.seek(0)
        return DemoRun(child.returncode, peak[0], wall, stdout.read(), stderr.read())


def report(out: Path, seed: int, demo_args: list[str], run: DemoRun) -> dict:
    """The JSON object this prints: the sampled peak and each stage's, from the run's ``summary.json``."""
    # a demo from before per-stage accounting has no "memory": only the sampled peak is known
    memory = json.loads((out / "summary.json").read_text()).get("memory", {"peak_rss_mb": None, "stages": {}})
    return {"demo_args": demo_args, "seed": seed, "sampled_peak_rss_mb": round(run.peak_mb, 1),
            "stage_peak_rss_mb": memory["peak_rss_mb"], "stages": memory["stages"], "wall_s": round(run.wall_s, 1),
            "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, demo_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo_memory", help="the demo's run directory")
    p.add_argument("--seed", type=int, default=0)
    o = p.parse_args(ours)
    out = o.out.resolve()
    run = run_demo(out, o.seed, demo_args)
    if run.status:
        sys.stderr.write(run.stderr[-4000:])
        raise SystemExit(f"mmsr demo exited with status {run.status}")
    result = report(out, o.seed, demo_args, run)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
