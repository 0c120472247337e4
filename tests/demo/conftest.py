"""The short demo's arguments, a small world's sizes, and one short run measured from outside (``benchmarks/demo_memory.py``) that
the memory test reads and the determinism test compares with another run of the same seed."""

from pathlib import Path

import pytest

SHORT = ["--reading-steps", "2", "--sft-steps", "3", "--grpo-steps", "2", "--eval-limit", "6"]
# a world for tests that need its files, not the demo's size (1,200 + 40 landmarks)
SMALL = {"train_landmarks": 300, "eval_landmarks": 20, "reading_pages": 200}


@pytest.fixture(scope="session")
def measured_short_demo(tmp_path_factory) -> tuple[Path, dict]:
    """A short ``mmsr demo`` (seed 0) in a subprocess whose RSS is sampled: its run directory and the
    benchmark's result (each run costs ~30-50 s)."""
    from benchmarks.demo_memory import main

    out = tmp_path_factory.mktemp("measured") / "demo"
    return out, main(["--out", str(out), "--", *SHORT])
