"""Five rules of the rollout loop that a mutation audit found untested: a truncated turn's recorded action, the
loop's count of sampled tokens, the union of tool spans, the name of the last unclosed tag, and the words of a
text-only cut note. Each test's docstring says what a user would lose if its rule broke."""

from dataclasses import replace

from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.actions import Answer, Invalid
from mmsr.rollout.context import CUT, describe
from mmsr.rollout.engine import SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.rollout.parse import parse_action
from mmsr.rollout.stats import covered_seconds
from mmsr.tools.base import ToolResult
from mmsr.tools.spec import TextSearchTool
from tests.rollout.test_long_horizon import Pages, run
from tests.rollout.test_long_horizon import R as MORE
from tests.rollout.test_loop import ANS, TXT, FakeImageSearch, FakeTextSearch, R, make_loop


class LengthOnEveryTurn(ScriptedEngine):
    """Each scripted turn runs whole, closing tag included, and reports "length": a turn whose token budget ran
    out on the last token of its tag (the scripted engine proper says "stop" there)."""

    def _one(self, request, sampling):
        return replace(super()._one(request, sampling), finish="length")


def test_a_truncated_turn_is_recorded_as_invalid_turn_truncated_even_if_its_text_parses(tiny_policy, fvqa_samples):
    """A turn cut by its token budget is recorded as ``Invalid("turn truncated")``, whatever its cut text would
    parse to. Parsed instead, the trajectory log and eval records showed a cut turn as "unclosed <answer>" (as if
    the policy had forgotten the tag), or as an answer it was never allowed to finish, with its argument."""
    sample, tok = fvqa_samples[0], tiny_policy.tokenizer
    long = f"{R}<answer>Paris is the capital of France</answer>"
    budget = len(tok.encode(f"{R}<answer>Paris", add_special_tokens=False))
    loop, _ = make_loop(tiny_policy, {f"{sample.id}#0": [long]}, RolloutSettings(max_tokens_per_turn=budget))
    (traj,) = loop.run([sample], 1, SamplingParams(max_tokens=budget))
    (turn,) = traj.turns
    assert turn.truncated and traj.finish_reason == "truncated"
    assert parse_action(turn.text) == Invalid("unclosed <answer>")  # what parsing the cut text would record
    assert turn.action == Invalid("turn truncated")
    # cut on the closing tag's last token: the text holds a complete <answer>, still not an answer
    engine = LengthOnEveryTurn({f"{sample.id}#0": [ANS]}, tok)
    tools = {"image_search": FakeImageSearch(), "text_search": FakeTextSearch()}
    (cut,) = RolloutLoop(engine, tiny_policy, PromptBuilder(), tools, RolloutSettings()).run([sample], 1, SamplingParams())
    assert parse_action(cut.turns[0].text) == Answer("Paris") and cut.turns[0].truncated
    assert cut.turns[0].action == Invalid("turn truncated") and cut.finish_reason == "truncated"


def test_sampled_tokens_counts_every_sampled_token_of_every_turn(tiny_policy, fvqa_samples):
    """``stats.sampled_tokens`` (the numerator of ``rollout/tokens_per_s``) is every token the engine sampled: each
    turn's text up to its stop string, plus the eos of a turn that ended on one. One token short a turn, the
    throughput read low by one token a turn (here 38 of 41)."""
    tok, (a, b) = tiny_policy.tokenizer, fvqa_samples[:2]
    rambling = "I think it is Paris."  # no tag: the engine samples its eos, <|im_end|>, which counts
    loop, _ = make_loop(tiny_policy, {f"{a.id}#0": [TXT, ANS], f"{b.id}#0": [rambling]})
    trajs = loop.run([a, b], 1, SamplingParams())
    assert [len(t.turns) for t in trajs] == [2, 1] and [t.finish_reason for t in trajs] == ["answer", "no_action"]
    n = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    by_hand = n(TXT) + n(ANS) + (n(rambling) + 1)
    assert loop.stats.sampled_tokens == by_hand == sum(t.num_sampled_tokens for t in trajs)


def test_covered_seconds_counts_overlapping_tool_spans_once():
    """``tool_busy_s`` (the denominator of ``rollout/overlap``) is the union of the calls' spans: two calls running
    at once are busy seconds once. Summed per call, it read 5 s for (0, 2), (1, 3), (5, 6) instead of 4, and the
    overlap credited generation with hiding tool time that was only the tools overlapping each other."""
    assert covered_seconds([(0, 2), (1, 3), (5, 6)]) == 4.0  # [0, 3] and [5, 6]
    assert covered_seconds([(5, 6), (1, 3), (0, 2)]) == 4.0  # order does not matter
    assert covered_seconds([(0, 10), (2, 5)]) == 10.0  # a call inside another adds nothing
    assert covered_seconds([(0, 10), (2, 5), (4, 12)]) == 12.0  # nor does one that ends inside the union
    assert covered_seconds([]) == 0.0


def test_without_a_complete_tag_the_last_unclosed_tag_is_named():
    """A turn with no complete action tag is judged by its LAST opening tag: ``<answer>x <text_search>q`` was
    cut (or stopped) while writing a search, and its reason says so. Named by the first tag, the trajectory log
    said "unclosed <answer>", sending the user after an answer the policy had abandoned."""
    assert parse_action("<answer>x <text_search>q") == Invalid("unclosed <text_search>")
    assert parse_action("<text_search>q <answer>x") == Invalid("unclosed <answer>")
    assert parse_action("<search> <text_search>q") == Invalid("unclosed <text_search>")
    assert parse_action("<text_search>q <search>") == Invalid("malformed <search> (expected <search><img></search>)")


def test_a_text_only_cut_is_noted_without_dropped_images(tiny_policy, fvqa_samples):
    """The note of an observation whose text alone was cut says so and nothing else: a result with no images has
    none to drop. With a false "dropped 0 images, " in every cut note, a user reading the trajectory log looked
    for thumbnails that were never there."""
    text = "x" * 100
    note = describe(1, "text_search", 900, 500, ToolResult(text), ToolResult(text[:10] + CUT))
    assert note == "turn 1: text_search observation of 900 tokens, 500 left for it: text cut from 100 to 10 characters"
    # in a rollout (the cut of test_long_horizon's test_an_observation_that_fits_but_leaves_no_full_turn_is_cut)
    sample, tools, script = fvqa_samples[0], [TextSearchTool(Pages(3000))], [f"{MORE}<text_search>capital</text_search>", ANS]
    whole = run(tiny_policy, sample, script, tools, RolloutSettings(max_tokens_per_turn=32, max_context_tokens=100_000))
    observation = whole.turns[1].span[0] - whole.turns[0].span[1]  # its tokens, the end of turn before it included
    budget = whole.turns[1].span[0] + 3  # the room left for it: observation + 3, less a full turn of 32
    traj = run(tiny_policy, sample, script, tools, RolloutSettings(max_tokens_per_turn=32, max_context_tokens=budget,
                                                                   fit_observations=True))  # fmt: skip
    page, shown = whole.turns[0].tool_call.result.text, traj.turns[0].tool_call.result.text
    assert shown.endswith(CUT) and page.startswith(shown[: -len(CUT)])
    assert traj.context == [f"turn 1: text_search observation of {observation} tokens, {observation + 3 - 32} left for "
                            f"it: text cut from {len(page)} to {len(shown) - len(CUT)} characters"]  # fmt: skip
    assert "dropped" not in traj.context[0]
