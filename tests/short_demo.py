"""The short ``mmsr demo`` the suite runs once (``short_demo`` in tests/conftest.py) and compares other runs
with: its arguments, and the part of its GRPO metrics that a rerun must repeat."""

import csv
from pathlib import Path

SHORT = ["--reading-steps", "2", "--sft-steps", "3", "--grpo-steps", "2", "--eval-limit", "6"]


def learning_metrics(out: Path) -> list[dict]:
    """The GRPO metrics rows of the run in ``out`` without wall-clock measurements (timings, throughput)."""
    rows = list(csv.DictReader((out / "grpo" / "csv" / "metrics.csv").open()))
    clock = ("timing/", "tools/", "rollout/overlap")  # overlap: the share of tool time generation hid, a timing
    return [{k: v for k, v in r.items() if not k.startswith(clock) and "per_s" not in k and not k.endswith("seconds")} for r in rows]
