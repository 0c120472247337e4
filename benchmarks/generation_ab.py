"""One machine, two commits: mmsr's GRPO step on ``vs_trl.py``'s workload at a git revision and at this
checkout, alternated in one sitting.

    python benchmarks/generation_ab.py --before 7653dff [--rounds 2] [--steps 6]

A speed-up measured against a number from another sitting is partly the machines': the same code ran a
step's generation in 0.15 s on a 2-core AVX-512 EPYC and in 0.33 s on a 2-core AVX2 one. Here the revision
is checked out into a temporary git worktree and each round runs it, then this checkout, each in a fresh
process of this virtualenv, on its own ``benchmarks/vs_trl.py`` workload (7653dff is the commit that
added that benchmark, before issue #15's speed work).

Prints one JSON object: per tree the median seconds of a step, of ``timing/generate`` and of
``timing/train`` (steps after the first of each round), the median episode length (equal lengths: both
trees sampled the same amount of work) and a digest of each round's first-step mean length and mean reward
(one digest for both trees: they drew the same first step); and the before/after ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("step", "generate", "train")


def child(tree: Path, steps: int) -> dict:
    """Run ``tree``'s own ``vs_trl.run_mmsr`` (mmsr imported from ``tree``): per-step seconds and metrics."""
    sys.path[:0] = [str(tree / "benchmarks"), str(tree)]
    import torch
    import vs_trl

    import mmsr

    if not Path(mmsr.__file__).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"mmsr imported from {mmsr.__file__}, not from {tree}")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        policy, prompts, samples = vs_trl.workload(Path(tmp))
        seconds, metrics = vs_trl.run_mmsr(policy, prompts, samples, steps)
    first = repr([(round(metrics[0]["rollout/length"], 4), round(metrics[0]["reward/mean"], 6))])
    return {"step": seconds, "generate": [m["timing/generate"] for m in metrics],
            "train": [m["timing/train"] for m in metrics], "length": [m["rollout/length"] for m in metrics],
            "first_step": hashlib.sha256(first.encode()).hexdigest()[:16]}  # fmt: skip


def run_tree(tree: Path, steps: int) -> dict:
    """``child`` in a fresh process whose imports resolve to ``tree`` first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, "--child", str(tree), "--steps", str(steps)], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"the run of {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    """Medians over the rounds' steps after each round's first."""
    out = {k: statistics.median(v for run in runs for v in run[k][1:] or run[k]) for k in (*KEYS, "length")}
    out["first_step"] = sorted({run["first_step"] for run in runs})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="7653dff", help="git revision to time against this checkout")
    ap.add_argument("--rounds", type=int, default=2, help="before then after, this many times (alternated)")
    ap.add_argument("--steps", type=int, default=6, help="GRPO steps of each run")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), args.before], cwd=ROOT, check=True)
        try:
            runs = [(run_tree(before, args.steps), run_tree(ROOT, args.steps)) for _ in range(args.rounds)]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=True)
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True)
    out = {"before": rev.stdout.strip(), "rounds": args.rounds, "steps": args.steps,
           "before_s": summary([b for b, _ in runs]), "after_s": summary([a for _, a in runs])}  # fmt: skip
    out["before_over_after"] = {k: out["before_s"][k] / out["after_s"][k] for k in KEYS}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
