"""The loop over an engine that hands each turn back as it ends (``IncrementalEngine``): a turn that
ends early starts its tool call while a longer turn still generates, and engines that only batch
(``WholeBatches``) roll out exactly as before. vLLM's own stepping: ``test_vllm_engine.py``."""

import asyncio
import time

import pytest

from mmsr.reward.answer import episode_answer
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.engine import GenerationRequest, SamplingParams, ScriptedEngine, WholeBatches, incremental
from mmsr.rollout.loop import RolloutLoop
from mmsr.tools.base import FatalToolError, ToolResult
from tests.rollout.test_loop import ANS, TXT, FakeImageSearch

LONG = f"<reason>{'think ' * 40}</reason><answer>Paris</answer>"


class Stepping(ScriptedEngine):
    """A scripted engine that steps like vLLM: a request finishes after one step per sampled token, and a
    step takes ``step_s``; ``finished`` records when each request (by key and turn) came back."""

    def __init__(self, script, tokenizer, step_s: float = 0.005):
        super().__init__(script, tokenizer)
        self.step_s, self.running, self.count = step_s, {}, 0
        self.finished: dict[tuple[str, int], float] = {}
        self.cancelled: list[str] = []

    def submit(self, requests, sampling):
        tickets = []
        for request in requests:
            output = self._one(request, sampling)
            tickets.append(f"t{self.count}")
            self.count += 1
            self.running[tickets[-1]] = [request, output, len(output.token_ids)]
        self.requests.extend(requests)
        return tickets

    def step(self):
        time.sleep(self.step_s)
        for entry in self.running.values():
            entry[2] -= 1
        done = [t for t, (_, _, left) in self.running.items() if left <= 0]
        for ticket in done:
            request = self.running[ticket][0]
            self.finished[(request.key.split("#")[0], request.turn)] = time.perf_counter()
        return [(t, self.running.pop(t)[1]) for t in done]

    def cancel(self, tickets):
        for ticket in tickets:
            self.cancelled.append(ticket)
            self.running.pop(ticket, None)


class Recording:
    """A text search that records when each call started (by sample id) and answers after ``delay_s``."""

    def __init__(self, delay_s: float = 0.01, fatal: bool = False):
        self.delay_s, self.fatal, self.started = delay_s, fatal, {}

    async def __call__(self, request):
        self.started.setdefault(request.sample_id, time.perf_counter())
        await asyncio.sleep(self.delay_s)
        if self.fatal:
            raise FatalToolError("replay-only cache has no entry")
        return ToolResult("[Text Search Results]\n1. a page")


def rollout(engine, policy, samples, text):
    loop = RolloutLoop(engine, policy, PromptBuilder(), {"image_search": FakeImageSearch(), "text_search": text})
    return loop, loop.run(samples, 1, SamplingParams(max_tokens=256))


def test_a_turn_that_ends_early_starts_its_tool_call_while_a_long_turn_generates(tiny_policy, fvqa_samples):
    fast, slow = fvqa_samples[:2]
    engine, text = Stepping({fast.id: [TXT, ANS], slow.id: [LONG]}, tiny_policy.tokenizer), Recording()
    assert incremental(engine) is engine
    loop, trajs = rollout(engine, tiny_policy, [fast, slow], text)
    assert [episode_answer(t.assistant_texts) for t in trajs] == ["Paris", "Paris"] and [len(t.turns) for t in trajs] == [2, 1]
    assert text.started[fast.id] < engine.finished[(slow.id, 0)]  # the call ran while the long turn generated
    assert engine.finished[(fast.id, 1)] < engine.finished[(slow.id, 0)]  # and the next turn joined the batch
    assert loop.stats.tools_s == 0.0 and loop.stats.overlap == 1.0  # the rollout never waited for the tool


def test_a_failed_rollout_cancels_the_turns_still_generating(tiny_policy, fvqa_samples):
    fast, slow = fvqa_samples[:2]
    engine = Stepping({fast.id: [TXT, ANS], slow.id: [LONG]}, tiny_policy.tokenizer)
    with pytest.raises(FatalToolError, match="replay-only"):
        rollout(engine, tiny_policy, [fast, slow], Recording(fatal=True))
    assert engine.cancelled and not engine.running


def test_whole_batches_generate_each_submission_as_one_batch(tiny_policy, fvqa_samples):
    """What the loop does with HFEngine or ScriptedEngine: a step is one ``generate`` call per submission."""
    engine = ScriptedEngine({s.id: [ANS] for s in fvqa_samples[:3]}, tiny_policy.tokenizer)
    batches = WholeBatches(engine)
    assert incremental(engine) is not engine and isinstance(incremental(engine), WholeBatches)
    requests = [GenerationRequest((1, 2), key=f"{s.id}#0") for s in fvqa_samples[:3]]
    first, second = batches.submit(requests[:2], SamplingParams()), batches.submit(requests[2:], SamplingParams())
    batches.cancel(first[1:])
    out = batches.step()
    assert [t for t, _ in out] == [first[0], second[0]] and batches.step() == []
    assert [r.key for r in engine.requests] == [requests[0].key, requests[2].key]
    assert out[0][1].token_ids == tiny_policy.tokenizer.encode(ANS, add_special_tokens=False)
