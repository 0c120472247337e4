"""Scripted multi-turn rollouts: the loss mask is 1 exactly on the tokens the policy produced."""

import asyncio
import time

import pytest
import torch
from PIL import Image

from mmsr.reward.answer import episode_answer
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.actions import Answer, ImageSearch, TextSearch
from mmsr.rollout.engine import GenerationOutput, SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.tools.base import IMAGE_MARKER, ToolRequest, ToolResult

R = "<reason>look</reason>"
IMG = f"{R}<search><img></search>"
TXT = f"{R}<text_search>capital of France</text_search>"
ANS = f"{R}<answer>Paris</answer>"


class FakeImageSearch:
    """Two thumbnails with titles, like a reverse image search."""

    def __init__(self):
        self.requests: list[ToolRequest] = []

    async def __call__(self, request: ToolRequest) -> ToolResult:
        self.requests.append(request)
        thumbs = (Image.new("RGB", (56, 56), "red"), Image.new("RGB", (84, 56), "blue"))
        text = f"[Image Search Results]\n1. image: {IMAGE_MARKER}\ntitle: Eiffel\n2. image: {IMAGE_MARKER}\ntitle: Louvre\n"
        return ToolResult(text, thumbs, titles=("Eiffel", "Louvre"))


class FakeTextSearch:
    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay, self.fail, self.requests = delay, fail, []

    async def __call__(self, request: ToolRequest) -> ToolResult:
        self.requests.append(request)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("backend down")
        return ToolResult("[Text Search Results]\n1. Paris is the capital of France.")


def make_loop(policy, script, settings=RolloutSettings(), image=None, text=None):
    engine = ScriptedEngine(script, policy.tokenizer)
    tools = {"image_search": image or FakeImageSearch(), "text_search": text or FakeTextSearch()}
    return RolloutLoop(engine, policy, PromptBuilder(), tools, settings), engine


def spans(mask):
    """Maximal runs of 1s as (start, end)."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_three_turn_episode_masks_exactly_the_sampled_tokens(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    loop, engine = make_loop(tiny_policy, {f"{sample.id}#0": [IMG, TXT, ANS]})
    (traj,) = loop.run([sample], 1, SamplingParams())
    tok = tiny_policy.tokenizer
    assert [type(t.action) for t in traj.turns] == [ImageSearch, TextSearch, Answer]
    assert traj.finish_reason == "answer" and episode_answer(traj.assistant_texts) == "Paris"
    # The 1-runs of the mask are exactly the three turns' token spans, and hold the scripted texts.
    assert spans(traj.loss_mask) == [t.span for t in traj.turns]
    for turn, text in zip(traj.turns, [IMG, TXT, ANS]):
        assert traj.input_ids[turn.span[0] : turn.span[1]] == tok.encode(text, add_special_tokens=False)
    # Everything else (prompt, <|im_end|> scaffolding, observations, image tokens) is mask 0.
    image_id = tiny_policy.model.config.image_token_id
    assert all(m == 0 for t, m in zip(traj.input_ids, traj.loss_mask) if t == image_id)
    assert traj.logprobs == [(-1.0 if m else 0.0) for m in traj.loss_mask]
    # Question image + two thumbnails, each expanded to its own number of pad tokens.
    assert len(traj.vision) == 3
    assert traj.input_ids.count(image_id) == sum(v.num_tokens for v in traj.vision)
    # The context is the chat template rendered over the same messages.
    text = tok.decode(traj.input_ids)
    assert text.count("<|im_start|>assistant\n") == 3
    assert "</search><|im_end|>\n<|im_start|>user\nSearched results: <information>[Image Search Results]" in text
    assert list(engine.requests[1].input_ids) == traj.input_ids[: traj.turns[1].span[0]]


def test_image_search_gets_the_question_image_and_text_search_the_query(tiny_policy, fvqa_samples):
    sample = fvqa_samples[1]
    image, text = FakeImageSearch(), FakeTextSearch()
    loop, _ = make_loop(tiny_policy, {f"{sample.id}#0": [IMG, TXT, ANS]}, image=image, text=text)
    loop.run([sample], 1, SamplingParams())
    assert image.requests[0].image is sample.image and image.requests[0].sample_id == sample.id
    assert text.requests[0].query == "capital of France" and text.requests[0].image is None
    assert text.requests[0].budget_s == image.requests[0].budget_s == RolloutSettings().tool_timeout_s  # the cap


@pytest.mark.parametrize(
    ("turns", "settings", "reason", "n_turns"),
    [
        ([IMG, IMG, ANS], RolloutSettings(), "search_limit", 2),  # image search limit 1
        ([TXT, TXT, TXT], RolloutSettings(max_rounds=4, text_search_limit=2), "search_limit", 3),
        ([TXT, TXT, TXT], RolloutSettings(), "max_rounds", 3),  # a search in the last round ends it
        (["I think it is Paris."], RolloutSettings(), "no_action", 1),
        ([f"{R}<text_search>   </text_search>"], RolloutSettings(), "no_action", 1),
        ([ANS], RolloutSettings(), "answer", 1),
    ],
)
def test_episode_end_rules(tiny_policy, fvqa_samples, turns, settings, reason, n_turns):
    sample = fvqa_samples[0]
    loop, _ = make_loop(tiny_policy, {f"{sample.id}#0": turns}, settings)
    (traj,) = loop.run([sample], 1, SamplingParams())
    assert traj.finish_reason == reason and len(traj.turns) == n_turns
    assert spans(traj.loss_mask) == [t.span for t in traj.turns]


def test_truncated_turn_keeps_its_sampled_tokens(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    long = R * 20 + "<answer>Paris</answer>"
    loop, _ = make_loop(tiny_policy, {f"{sample.id}#0": [long]}, RolloutSettings(max_tokens_per_turn=10))
    (traj,) = loop.run([sample], 1, SamplingParams(max_tokens=10))
    assert traj.finish_reason == "truncated" and traj.turns[0].truncated
    sampled = traj.input_ids[traj.turns[0].span[0] :]
    assert sampled == tiny_policy.tokenizer.encode(long, add_special_tokens=False)[:10]  # never overwritten
    assert sum(traj.loss_mask) == 10


def test_tool_failures_and_timeouts_become_observations(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    for text_tool, words in [(FakeTextSearch(fail=True), "ConnectionError: backend down"),
                             (FakeTextSearch(delay=5), "timed out after 0.05 s")]:  # fmt: skip
        settings = RolloutSettings(tool_timeout_s=0.05)
        loop, _ = make_loop(tiny_policy, {f"{sample.id}#0": [TXT, ANS]}, settings, text=text_tool)
        (traj,) = loop.run([sample], 1, SamplingParams())
        call = traj.turns[0].tool_call
        assert not call.result.ok and words in call.result.text
        assert words in tiny_policy.tokenizer.decode(traj.input_ids)
        assert traj.finish_reason == "answer" and loop.stats.tool_failures == 1


def test_groups_and_batched_generation(tiny_policy, fvqa_samples):
    samples = fvqa_samples[:3]
    script = lambda r: [ANS, IMG][int(r.key[-1]) % 2] if r.turn == 0 else ANS  # noqa: E731
    loop, engine = make_loop(tiny_policy, script)
    trajs = loop.run(samples, 2, SamplingParams())
    assert [t.group_id for t in trajs] == [0, 0, 1, 1, 2, 2]
    assert [t.sample_id for t in trajs] == [s.id for s in samples for _ in range(2)]
    # round 1: all 6 episodes in one generate call; round 2: only the 3 that searched
    assert len(engine.requests) == 9 and [r.turn for r in engine.requests[6:]] == [1, 1, 1]
    assert loop.stats.tool_calls == {"image_search": 3, "text_search": 0}


class IndexedImageSearch(FakeImageSearch):
    """Hands every caller the same thumbnail objects, as a local index does."""

    def __init__(self):
        super().__init__()
        self.thumbs = (Image.new("RGB", (56, 56), "red"), Image.new("RGB", (84, 56), "blue"))

    async def __call__(self, request: ToolRequest) -> ToolResult:
        result = await super().__call__(request)
        return ToolResult(result.text, self.thumbs, titles=result.titles)


def test_a_group_processes_its_images_once(tiny_policy, fvqa_samples, monkeypatch):
    calls = []
    process = tiny_policy.process_image
    monkeypatch.setattr(tiny_policy, "process_image", lambda im, tool=False: calls.append((im, tool)) or process(im, tool))
    samples = fvqa_samples[:2]
    loop, _ = make_loop(tiny_policy, lambda r: [IMG, ANS][r.turn], image=IndexedImageSearch())
    trajs = loop.run(samples, 4, SamplingParams())
    # 2 question images + 2 thumbnails, not 8 + 16 (every episode searched)
    assert loop.stats.tool_calls["image_search"] == 8 and sorted(t for _, t in calls) == [False, False, True, True]
    for g, sample in enumerate(samples):
        group = trajs[4 * g : 4 * g + 4]
        alone = process(sample.image)
        assert all(t.vision[0] is group[0].vision[0] for t in group)  # one input, one copy of its pixels
        assert torch.equal(group[0].vision[0].pixel_values, alone.pixel_values) and group[0].vision[0].grid_thw == alone.grid_thw
        assert all(t.input_ids == group[0].input_ids and len(t.vision) == 3 for t in group)
        assert len({id(t.input_ids) for t in group} | {id(t.vision) for t in group}) == 8  # each episode's own lists
    assert len(loop._images) == 0 and not loop._first  # the memo does not outlive the rollout


def test_tool_calls_run_concurrently(tiny_policy, fvqa_samples):
    import time

    samples = fvqa_samples[:4]
    loop, _ = make_loop(tiny_policy, lambda r: [TXT, ANS][r.turn], text=FakeTextSearch(delay=0.3))
    start = time.perf_counter()
    loop.run(samples, 2, SamplingParams())
    assert loop.stats.tool_calls["text_search"] == 8
    assert time.perf_counter() - start < 8 * 0.3 / 2  # 8 calls of 0.3 s overlap


def test_context_budget_ends_episode_before_overflow(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    loop, _ = make_loop(tiny_policy, {f"{sample.id}#0": [IMG, TXT, ANS]})
    (first,) = loop.run([sample], 1, SamplingParams())
    budget = first.turns[0].span[1] + 5  # room for the first turn, not for the image results
    loop.settings = RolloutSettings(max_context_tokens=budget)
    (traj,) = loop.run([sample], 1, SamplingParams())
    assert traj.finish_reason == "truncated" and len(traj) < budget


def test_fatal_tool_errors_are_not_hidden_and_requests_carry_the_question(tiny_policy, fvqa_samples):
    from mmsr.tools.base import FatalToolError

    class Misconfigured:
        async def __call__(self, request):
            raise FatalToolError("replay-only cache has no entry")

    sample = fvqa_samples[0]
    text = FakeTextSearch()
    loop, _ = make_loop(tiny_policy, {f"{sample.id}#0": [TXT, ANS]}, text=text)
    loop.run([sample], 1, SamplingParams())
    assert text.requests[0].question == sample.question
    loop, _ = make_loop(tiny_policy, {f"{sample.id}#0": [TXT, ANS]}, text=Misconfigured())
    with pytest.raises(FatalToolError, match="replay-only"):
        loop.run([sample], 1, SamplingParams())


def test_episodes_advance_independently_of_slow_tool_calls(tiny_policy, fvqa_samples):
    """An episode whose tool answers quickly generates its next turn while another episode's call is
    still running: the rollout waits for the slow call once, not once per round."""
    fast, slow = fvqa_samples[0], fvqa_samples[1]

    class Latency:
        def __init__(self):
            self.requests = []

        async def __call__(self, request):
            self.requests.append(request)
            await asyncio.sleep(1.5 if request.sample_id == slow.id else 0.01)
            return ToolResult("[Text Search Results]\n1. a page")

    class SlowEngine(ScriptedEngine):
        """Generation that takes time (a scripted turn is ~0.1 ms): the fast episode's two generations
        while the slow call runs must show as hidden tool time, well above timer noise."""

        def generate(self, requests, sampling):
            time.sleep(0.1)
            return super().generate(requests, sampling)

    script = {f"{fast.id}#0": [TXT, TXT, ANS], f"{slow.id}#0": [TXT, ANS]}
    engine = SlowEngine(script, tiny_policy.tokenizer)
    tools = {"image_search": FakeImageSearch(), "text_search": Latency()}
    loop = RolloutLoop(engine, tiny_policy, PromptBuilder(), tools, RolloutSettings())
    trajs = loop.run([fast, slow], 1, SamplingParams())
    assert [episode_answer(t.assistant_texts) for t in trajs] == ["Paris", "Paris"] and [len(t.turns) for t in trajs] == [3, 2]
    order = [(r.key.split("#")[0], r.turn) for r in engine.requests]
    # round by round, the fast episode's third turn would wait for the slow episode's second
    assert order.index((fast.id, 2)) < order.index((slow.id, 1)), order
    assert loop.stats.tool_busy_s >= 1.5 and 0.05 < loop.stats.overlap < 1.0, loop.stats


class EndsOnEos(ScriptedEngine):
    """Each scripted turn runs whole and ends on ``eos_token``, past its action tag: as a turn whose tag an
    engine's stop check missed (e.g. split by a special token, which the loop's decoding skips) ends."""

    def _one(self, request, sampling):
        ids = self.tokenizer.encode(self.script(request), add_special_tokens=False) + [self.eos_id]
        return GenerationOutput(ids, [self.logprob] * len(ids), "eos")


def test_a_turn_ended_on_another_eos_id_is_closed_before_the_next_user_turn(tiny_policy, fvqa_samples):
    """A real Qwen2.5-VL checkpoint's generation config also stops on <|endoftext|>: a turn that ends there
    and calls a tool was followed by the observation's user turn without <|im_end|> (only an "eos" finish
    was taken for one). Now <|im_end|> follows any turn that does not end on it, with mask 0."""
    sample, tok = fvqa_samples[0], tiny_policy.tokenizer
    other = tok.convert_tokens_to_ids("<|endoftext|>")
    trajs = {}
    for eos in ("<|im_end|>", "<|endoftext|>"):
        engine = EndsOnEos({sample.id: [f"{TXT} then", ANS]}, tok, eos_token=eos)
        loop = RolloutLoop(engine, tiny_policy, PromptBuilder(), {"image_search": None, "text_search": FakeTextSearch()})
        (trajs[eos],) = loop.run([sample], 1, SamplingParams())
        assert trajs[eos].finish_reason == "answer" and spans(trajs[eos].loss_mask) == [t.span for t in trajs[eos].turns]
    closed, other_eos = trajs["<|im_end|>"], trajs["<|endoftext|>"]
    end = other_eos.turns[0].span[1]
    assert other_eos.input_ids[end - 1 : end + 1] == [other, tok.convert_tokens_to_ids("<|im_end|>")]
    # the same chat as the turns ended on <|im_end|> themselves, but for each sampled <|endoftext|> (the
    # last turn ends the episode: nothing follows it)
    assert [t for t in other_eos.input_ids if t != other] == closed.input_ids[:-1]
