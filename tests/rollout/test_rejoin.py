"""``tool_rejoin_steps``: when episodes whose tool call is done generate again. At once (``None``), the
batches follow the tools' timing; after a fixed number of engine steps, they are the same whatever the
tools' latencies, and so are the real engine's tokens and log-probs, bit for bit."""

import asyncio

import pytest

from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.engine import GenerationOutput, SamplingParams
from mmsr.rollout.hf_engine import HFEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.rollout.stats import RolloutStats
from mmsr.tools.base import ToolResult
from tests.rollout.test_incremental import LONG, Stepping
from tests.rollout.test_loop import ANS, TXT, FakeImageSearch


class Logged(Stepping):
    """``Stepping`` that records each submission: the steps taken before it and its (key, turn)s."""

    def __init__(self, script, tokenizer):
        super().__init__(script, tokenizer)
        self.steps, self.submissions = 0, []

    def submit(self, requests, sampling):
        self.submissions.append((self.steps, [(r.key, r.turn) for r in requests]))
        return super().submit(requests, sampling)

    def step(self):
        self.steps += 1
        return super().step()


class Delayed:
    """A text search answering sample ``id`` after ``delays[id]`` seconds."""

    def __init__(self, delays: dict[str, float]):
        self.delays = delays

    async def __call__(self, request):
        await asyncio.sleep(self.delays[request.sample_id])
        return ToolResult(f"[Text Search Results]\n1. a page about {request.query}")


def stepped(policy, samples, delays, settings):
    """The submissions and trajectories of one rollout: three searching episodes and a long one."""
    script = {s.id: [TXT, ANS] for s in samples[:3]} | {samples[3].id: [LONG]}
    engine = Logged(script, policy.tokenizer)
    loop = RolloutLoop(engine, policy, PromptBuilder(), {"image_search": FakeImageSearch(), "text_search": Delayed(delays)},
                       settings)  # fmt: skip
    trajs = loop.run(samples[:4], 1, SamplingParams(max_tokens=256))
    return engine.submissions, [(t.input_ids, t.loss_mask) for t in trajs], loop.stats


def latencies(samples, slow: set[int]) -> dict[str, float]:
    return {s.id: 0.25 if i in slow else 0.0 for i, s in enumerate(samples[:4])}


def test_at_once_the_batches_follow_the_tools_timing(tiny_policy, fvqa_samples):
    """What ``tool_rejoin_steps`` fixes: with latencies swapped, other episodes share a batch."""
    a, *_ = stepped(tiny_policy, fvqa_samples, latencies(fvqa_samples, {1}), RolloutSettings())
    b, *_ = stepped(tiny_policy, fvqa_samples, latencies(fvqa_samples, {0, 2}), RolloutSettings())
    assert a[0] == b[0] and len(a[0][1]) == 4  # the first turns: one batch
    assert [keys for _, keys in a[1:]] != [keys for _, keys in b[1:]]


@pytest.mark.parametrize("lag", [0, 3, 80])
def test_rejoining_after_fixed_steps_makes_the_same_batches_whatever_the_latency(tiny_policy, fvqa_samples, lag):
    settings = RolloutSettings(tool_rejoin_steps=lag)
    a, trajs_a, stats_a = stepped(tiny_policy, fvqa_samples, latencies(fvqa_samples, {1}), settings)
    b, trajs_b, stats_b = stepped(tiny_policy, fvqa_samples, latencies(fvqa_samples, {0, 2}), settings)
    assert a == b and trajs_a == trajs_b
    ended, (rejoined, keys) = a[0][0], a[1]
    first_turn = len(tiny_policy.tokenizer.encode(TXT, add_special_tokens=False))
    assert sorted(k for k, _ in keys) == sorted(f"{s.id}#0" for s in fvqa_samples[:3])  # all three together
    assert rejoined == ended + first_turn + lag  # the step their calls were due after
    if lag == 80:  # 80 steps of >= 5 ms outlast the 0.25 s call, and the long turn (129 tokens) still generates
        assert stats_a.tools_s < 0.05
    else:  # the loop waited for the late call (0.25 s less the few steps since it started)
        assert stats_a.tools_s > 0.1 and stats_b.tools_s > 0.1


def test_overlap_is_a_share_even_when_the_wait_outlasts_the_call():
    assert RolloutStats(tools_s=1.0001, tool_busy_s=1.0).overlap == 0.0  # the wait is timed around the call
    assert RolloutStats(tools_s=0.25, tool_busy_s=1.0).overlap == 0.75


class FirstTurnScripted(HFEngine):
    """``HFEngine`` whose first turns are a scripted text search (a random policy never searches);
    later turns are sampled by the real model."""

    def generate(self, requests, sampling):
        ids = tuple(self.policy.tokenizer.encode(TXT, add_special_tokens=False))
        later = [r for r in requests if r.turn > 0]
        sampled = iter(super().generate(later, sampling) if later else [])
        return [next(sampled) if r.turn > 0 else GenerationOutput(ids, (0.0,) * len(ids), "stop") for r in requests]


def sampled(policy, samples, delays, settings):
    engine = FirstTurnScripted(seed=7)
    engine.bind(policy)
    loop = RolloutLoop(engine, policy, PromptBuilder(), {"image_search": FakeImageSearch(), "text_search": Delayed(delays)},
                       settings)  # fmt: skip
    trajs = loop.run(samples, 2, SamplingParams(max_tokens=12))
    return [(t.input_ids, t.logprobs) for t in trajs]


def test_hf_engine_samples_the_same_tokens_and_logprobs_bit_for_bit_whatever_the_latency(tiny_policy, fvqa_samples):
    samples = [s for s in fvqa_samples if s.image is not None][:3]
    settings = RolloutSettings(tool_rejoin_steps=0)
    # at once, sample 1's episodes would share a batch with sample 0's in one run, with sample 2's in the other
    first = sampled(tiny_policy, samples, dict(zip([s.id for s in samples], [0.0, 0.15, 0.15])), settings)
    assert first == sampled(tiny_policy, samples, dict(zip([s.id for s in samples], [0.0, 0.0, 0.15])), settings)
    assert all(len(ids) > 0 for ids, _ in first) and any(lp != 0.0 for _, lps in first for lp in lps)


def test_a_negative_rejoin_is_refused():
    with pytest.raises(ValueError, match="tool_rejoin_steps"):
        RolloutSettings(tool_rejoin_steps=-1)
