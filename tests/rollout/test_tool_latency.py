"""``tools/latency_s`` and the tools' busy spans time a call from when it may run, not from when its episode asked:
a wait behind ``rollout.tool_concurrency`` is the rollout's, no tool's."""

import pytest

from mmsr.rollout.engine import SamplingParams
from mmsr.rollout.loop import RolloutSettings
from tests.rollout.test_loop import ANS, TXT, FakeTextSearch, make_loop


def test_a_call_queued_behind_tool_concurrency_is_timed_from_when_it_runs(tiny_policy, fvqa_samples):
    """4 calls of 0.1 s asked at once, 1 at a time: each ran 0.1 s, one after another. Timed from the ask, the
    mean read ~0.25 s (0.1, 0.2, 0.3, 0.4) and the spans all began together."""
    settings = RolloutSettings(tool_concurrency=1, max_tokens_per_turn=64)
    loop, _ = make_loop(tiny_policy, lambda r: [TXT, ANS][r.turn], settings, text=FakeTextSearch(delay=0.1))
    loop.run(fvqa_samples[:4], 1, SamplingParams())
    latencies, spans = loop.stats.tool_latency_s, sorted(loop.stats.tool_spans)
    assert loop.stats.tool_calls["text_search"] == len(latencies) == 4 and min(latencies) >= 0.1
    assert sum(latencies) / 4 < 0.175, latencies  # CPU load slows each call a little, the queue added 0.15 s
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), spans  # one call ran at a time
    assert loop.stats.tool_busy_s == pytest.approx(sum(end - start for start, end in spans))
