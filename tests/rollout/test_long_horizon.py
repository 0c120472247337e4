"""Long horizons: per-tool limits from the tools' YAML, a dozen rounds, and a context budget that is
enforced (observations cut to fit, or the episode ends) and logged in the trajectory."""

import asyncio
import json

import pytest
from PIL import Image

from mmsr.metrics import rollout_metrics
from mmsr.prompt.render import PromptBuilder
from mmsr.report.records import TrajectoryRecord, trajectory_record
from mmsr.reward.format import format_ok
from mmsr.rollout.context import CUT, DROPPED_IMAGE, fit
from mmsr.rollout.engine import SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.tools.base import IMAGE_MARKER, ToolRequest, ToolResult
from mmsr.tools.spec import ImageSearchTool, TextSearchTool, configured

R = "<reason>more</reason>"
ANS = f"{R}<answer>Paris</answer>"


class Pages:
    """A text search whose pages are ``chars`` long."""

    def __init__(self, chars: int = 60):
        self.chars = chars

    async def __call__(self, request: ToolRequest) -> ToolResult:
        return ToolResult(f"[Text Search Results] {request.query}: " + "Paris is the capital. " * (self.chars // 22))


class Thumbnails:
    async def __call__(self, request: ToolRequest) -> ToolResult:
        images = tuple(Image.new("RGB", (56, 56), c) for c in ("red", "blue"))
        return ToolResult(f"[Image Search Results] 1. {IMAGE_MARKER} Eiffel 2. {IMAGE_MARKER} Louvre", images)


def run(policy, sample, script, tools, settings):
    loop = RolloutLoop(ScriptedEngine({f"{sample.id}#0": script}, policy.tokenizer), policy, PromptBuilder(),
                       configured(tools), settings)  # fmt: skip
    (traj,) = loop.run([sample], 1, SamplingParams())
    return traj


def sampled_only(traj) -> bool:
    return [i for i, m in enumerate(traj.loss_mask) if m] == [i for t in traj.turns for i in range(*t.span)]


def test_ten_text_searches_in_twelve_rounds(tiny_policy, fvqa_samples):
    tools = [TextSearchTool(Pages(), limit=10, format_max=10)]  # what `init_args: {limit: 10, format_max: 10}` builds
    searches = [f"{R}<text_search>fact {k}</text_search>" for k in range(11)]
    settings = RolloutSettings(max_rounds=12, max_tokens_per_turn=32, max_context_tokens=16384)
    traj = run(tiny_policy, fvqa_samples[0], [*searches[:10], ANS], tools, settings)
    assert traj.finish_reason == "answer" and traj.num_calls("text_search") == 10 and len(traj.turns) == 11
    assert format_ok(traj.assistant_texts, traj.tools) and sampled_only(traj) and traj.context == []
    assert not format_ok(traj.assistant_texts)  # MMSearch-R1's pair allows one text search
    refused = run(tiny_policy, fvqa_samples[0], [*searches, ANS], tools, settings)
    assert refused.finish_reason == "search_limit" and refused.num_calls("text_search") == 10


def test_an_entry_s_limit_that_the_pair_s_setting_would_override_is_refused_naming_both(tiny_policy, fvqa_samples):
    """Every shipped config sets ``rollout.text_search_limit: 2``: a ``tools:`` entry's ``limit: 10`` gave 2 calls an
    episode without a word (the pair's setting won). Refused (the training modules call it before the build); the
    setting null, an equal value or a ``tool_limits`` entry (which overrides both) pass, and an entry without a limit
    keeps the setting's. The loop itself does not refuse: evaluation's RAG workflow sets one search of each kind."""
    import pytest

    tools = [TextSearchTool(Pages(), limit=10, format_max=10)]
    searches = [f"{R}<text_search>fact {k}</text_search>" for k in range(4)]
    with pytest.raises(ValueError, match=r"the text_search entry of tools sets limit: 10, and rollout.text_search_limit: 2 "
                                         r"would override it: set rollout.text_search_limit: null"):  # fmt: skip
        RolloutSettings(text_search_limit=2).refuse_overridden_limits(configured(tools))
    for ok in (dict(text_search_limit=None), dict(text_search_limit=10), dict(text_search_limit=2, tool_limits={"text_search": 3})):
        settings = RolloutSettings(max_rounds=6, **ok)
        settings.refuse_overridden_limits(configured(tools))
        traj = run(tiny_policy, fvqa_samples[0], [*searches, ANS], tools, settings)
        assert traj.num_calls("text_search") == (3 if ok.get("tool_limits") else 4), ok
    derived = run(tiny_policy, fvqa_samples[0], [*searches, ANS], tools, RolloutSettings(max_rounds=6, text_search_limit=1))
    assert derived.num_calls("text_search") == 1  # as RAG's one search: the loop takes the setting
    plain = run(tiny_policy, fvqa_samples[0], [*searches, ANS], [TextSearchTool(Pages())],
                RolloutSettings(max_rounds=6, text_search_limit=2))  # fmt: skip
    assert plain.num_calls("text_search") == 2 and plain.finish_reason == "search_limit"


def test_an_observation_that_does_not_fit_is_cut_and_logged(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    tools = [ImageSearchTool(Thumbnails()), TextSearchTool(Pages(4000))]
    script = [f"{R}<search><img></search>", f"{R}<text_search>capital</text_search>", ANS]
    whole = run(tiny_policy, sample, script, tools, RolloutSettings(max_context_tokens=100_000))
    budget = len(whole) - 200  # the long page no longer fits whole
    settings = RolloutSettings(max_tokens_per_turn=32, max_context_tokens=budget, fit_observations=True)
    traj = run(tiny_policy, sample, script, tools, settings)
    assert traj.finish_reason == "answer" and len(traj) <= budget and sampled_only(traj)
    shown = traj.turns[1].tool_call.result.text
    assert shown.endswith(CUT) and len(shown) < len(whole.turns[1].tool_call.result.text)
    assert tiny_policy.tokenizer.decode(traj.input_ids).count(CUT.strip()) == 1
    (note,) = traj.context
    assert note.startswith("turn 2: text_search observation of") and "text cut from" in note
    # Without fitting the same observation ends the episode, and the log says so.
    ended = run(tiny_policy, sample, script, tools, RolloutSettings(max_tokens_per_turn=32, max_context_tokens=budget))
    assert ended.finish_reason == "truncated" and ended.context[0].endswith("dropped, the episode ends (truncated)")
    # The trajectory log and the metrics carry it.
    record = trajectory_record(traj, sample, step=0, global_step=0, index=0, reward=1.0, advantage=0.0, reward_terms={})
    assert TrajectoryRecord.from_dict(json.loads(record.to_json())).context == [note]
    assert rollout_metrics([traj, whole], [sample], [0.0, 0.0], [{}, {}], settings)["rollout/context_cut"] == 0.5


def test_fit_drops_images_before_cutting_text():
    thumbs = asyncio.run(Thumbnails()(ToolRequest("image_search")))
    tokens = lambda r: len(r.text) // 4 + 50 * len(r.images)  # noqa: E731
    assert fit(thumbs, tokens, 1000) is thumbs
    bare = fit(thumbs, tokens, 40)
    assert bare.images == () and bare.text.count(DROPPED_IMAGE) == 2 and not bare.text.endswith(CUT)
    cut = fit(thumbs, tokens, 20)
    assert cut.text.endswith(CUT) and tokens(cut) <= 20 and tokens(ToolResult(cut.text[:-len(CUT)] + "xxxx" + CUT)) > 20
    assert fit(thumbs, tokens, 3) is None


def test_an_observation_that_fits_but_leaves_no_full_turn_is_cut(tiny_policy, fvqa_samples):
    """With fitting, an observation that would leave less than ``max_tokens_per_turn`` after it is cut too: kept
    whole, the next turn was cut at the context limit and the episode ended unanswered, while a slightly longer
    observation (cut) let it answer."""
    sample = fvqa_samples[0]
    tools = [TextSearchTool(Pages(3000))]
    script = [f"{R}<text_search>capital</text_search>", ANS]
    settings = RolloutSettings(max_tokens_per_turn=32, max_context_tokens=100_000)
    whole = run(tiny_policy, sample, script, tools, settings)
    budget = whole.turns[1].span[0] + 3  # the whole page leaves 3 tokens for the answer turn
    traj = run(tiny_policy, sample, script, tools, RolloutSettings(max_tokens_per_turn=32, max_context_tokens=budget,
                                                                   fit_observations=True))  # fmt: skip
    assert traj.finish_reason == "answer" and traj.turns[1].text == ANS and len(traj) <= budget
    assert traj.turns[0].tool_call.result.text.endswith(CUT)
    assert traj.turns[1].span[0] <= budget - 32
    (note,) = traj.context
    assert note.startswith("turn 1: text_search observation of") and "text cut from" in note


def test_an_observation_no_cut_can_fit_with_a_full_turn_after_it_stays_whole_if_it_fits(tiny_policy, fvqa_samples):
    """Where even the shortest cut (the wrapper and instructions) leaves less than a full turn, fitting does not
    end an episode that the whole observation fits: it goes on as it does without fitting."""
    sample = fvqa_samples[0]
    tools = [TextSearchTool(Pages(60))]
    script = [f"{R}<text_search>capital</text_search>", ANS]
    whole = run(tiny_policy, sample, script, tools, RolloutSettings(max_context_tokens=100_000))
    observation = whole.turns[1].span[0] - whole.turns[0].span[1]
    turn = observation + 10  # a full turn longer than the observation: no cut of it leaves that room
    budget = whole.turns[1].span[0] + 20  # the whole page fits, leaving 20 tokens
    plain = run(tiny_policy, sample, script, tools, RolloutSettings(max_tokens_per_turn=turn, max_context_tokens=budget))
    fitted = run(tiny_policy, sample, script, tools, RolloutSettings(max_tokens_per_turn=turn, max_context_tokens=budget,
                                                                     fit_observations=True))  # fmt: skip
    assert plain.turns[0].tool_call.result.text == whole.turns[0].tool_call.result.text
    assert fitted.turns[0].tool_call.result.text == plain.turns[0].tool_call.result.text
    assert fitted.input_ids == plain.input_ids and fitted.finish_reason == plain.finish_reason and fitted.context == []



@pytest.mark.parametrize("fitting", ["off", "turn equals room", "cut cannot fit"])
def test_an_observation_exactly_filling_the_context_is_dropped_and_one_token_more_room_keeps_it(
        tiny_policy, fvqa_samples, fitting):  # fmt: skip
    """An observation of exactly the room left would leave the next request 0 tokens: it is dropped (the episode
    ends, truncated, and says so), with or without fitting; one token more room keeps it, and the next turn gets
    that token. Fitting: ``max_tokens_per_turn`` equal to the room turns it off (no full turn fits after anything:
    the plain rule, ``room - 1`` left); one less leaves 1 token, which no cut fits."""
    sample, tools = fvqa_samples[0], [TextSearchTool(Pages(60))]
    script = [f"{R}<text_search>capital</text_search>", ANS]
    whole = run(tiny_policy, sample, script, tools, RolloutSettings(max_context_tokens=100_000))
    start = whole.turns[0].span[1]
    observation = whole.turns[1].span[0] - start  # the end of turn before it included
    turn = {"off": 32, "turn equals room": observation, "cut cannot fit": observation - 1}[fitting]
    assert whole.turns[0].span[1] - whole.turns[0].span[0] <= min(turn, 32)  # the first turn is never cut here
    for room in (observation, observation + 1):
        settings = RolloutSettings(max_tokens_per_turn=turn, max_context_tokens=start + room,
                                   fit_observations=fitting != "off")  # fmt: skip
        traj = run(tiny_policy, sample, script, tools, settings)
        assert traj.finish_reason == "truncated" and traj.input_ids == whole.input_ids[: len(traj)], room
        assert sampled_only(traj), room
        if room == observation:  # dropped: none of it is in the sequence, and the log says so
            left = 1 if fitting == "cut cannot fit" else room - 1
            assert len(traj.turns) == 1 and len(traj) == start
            assert traj.turns[0].tool_call.result.text == whole.turns[0].tool_call.result.text
            assert traj.context == [f"turn 1: text_search observation of {observation} tokens, {left} left for it: "
                                    "dropped, the episode ends (truncated)"]  # fmt: skip
        else:  # kept whole: the answer turn gets the one token left, and is cut at the context limit
            assert len(traj.turns) == 2 and traj.turns[1].span == (start + observation, start + room)
            assert traj.context == ["turn 2: cut at the context limit after 1 tokens"]

def test_fit_returns_the_fullest_version_that_fits_for_every_small_size_and_limit():
    """Against a brute force over every text length, image count and limit: ``fit`` returns the first of the whole
    result, the result without its images, or its text cut to ``k`` characters (``k`` from the longest down) whose
    tokens are within the limit, or None. The edges: the whole result at exactly the limit (images kept), the bare
    cut marker at exactly the limit, and the longest cut that fits, not one a character shorter."""
    image = Image.new("RGB", (8, 8), "red")
    tokens = lambda r: len(r.text) + 30 * len(r.images)  # noqa: E731 - an image costs more than its marker's note

    def brute(text: str, images: int, limit: int) -> tuple[str, int] | None:
        """``(text, images)`` of the expected answer: plain strings, as a ``ToolResult`` redacts as it is built."""
        bare = text.replace(IMAGE_MARKER, DROPPED_IMAGE)
        cuts = [(bare[:k] + CUT, 0) for k in range(len(bare) - 1, -1, -1)]
        return next((v for v in [(text, images), (bare, 0), *cuts] if len(v[0]) + 30 * v[1] <= limit), None)

    for n in range(16):
        for images in range(3):
            result = ToolResult(IMAGE_MARKER * images + "x" * n, (image,) * images)
            for limit in range(tokens(result) + 2):
                got, want = fit(result, tokens, limit), brute(result.text, images, limit)
                where = f"n={n} images={images} limit={limit}"
                assert (got if got is None else (got.text, len(got.images))) == want, where
                assert got is result or tokens(result) > limit, where  # whole, it is returned as is
