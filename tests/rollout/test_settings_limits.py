"""RolloutSettings refuses limits that would run without a word, and a prompt that fills the context says so."""

import math
from dataclasses import replace

import pytest

from mmsr.metrics import rollout_metrics
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.engine import SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings

ANS = "<reason>look</reason><answer>Paris</answer>"


@pytest.mark.parametrize(("field", "value", "shown"), [
    ("max_rounds", 0, "max_rounds=0"),  # still sampled one turn
    ("image_search_limit", -1, "image_search_limit=-1"),
    ("text_search_limit", -1, "text_search_limit=-1"),  # ended every text search as search_limit
    ("tool_limits", {"crop": -2}, "tool_limits['crop']=-2"),
    ("max_tokens_per_turn", 0, "max_tokens_per_turn=0"),
    ("max_context_tokens", 0, "max_context_tokens=0"),
    ("tool_concurrency", 0, "tool_concurrency=0"),  # every call waited forever on the semaphore
    ("tool_timeout_s", 0.0, "tool_timeout_s=0.0"),
    ("tool_timeout_s", math.nan, "tool_timeout_s=nan"),
    ("tool_rejoin_steps", -1, "tool_rejoin_steps=-1"),
])  # fmt: skip
def test_out_of_range_settings_are_refused_naming_field_and_value(field, value, shown):
    with pytest.raises(ValueError, match=r"^RolloutSettings: .*" + shown.replace("[", r"\[")):
        RolloutSettings(**{field: value})
    with pytest.raises(ValueError, match=field):  # an override (``mmsr eval --max-rounds 0``) goes through replace
        replace(RolloutSettings(), **{field: value})


def test_every_field_out_of_range_is_named_in_one_error():
    with pytest.raises(ValueError) as info:
        RolloutSettings(max_rounds=0, text_search_limit=-1, max_context_tokens=-5)
    assert str(info.value) == ("RolloutSettings: max_rounds=0 (must be >= 1); text_search_limit=-1 (must be >= 0 "
                               "(None: the tool's declared limit)); max_context_tokens=-5 (must be >= 1)")  # fmt: skip


def test_the_smallest_limits_in_range_are_accepted():
    # 0 searches is a real setting: the eval workflows' one-turn baseline (``mmsr.eval.workflows``) uses it
    s = RolloutSettings(max_rounds=1, image_search_limit=0, text_search_limit=0, tool_limits={"crop": 0},
                        max_tokens_per_turn=1, max_context_tokens=1, tool_concurrency=1, tool_timeout_s=0.01,
                        tool_rejoin_steps=0)  # fmt: skip
    assert (s.max_rounds, s.text_search_limit, s.tool_limits) == (1, 0, {"crop": 0})


def _run(policy, sample, max_context_tokens, **settings):
    engine = ScriptedEngine({f"{sample.id}#0": [ANS]}, policy.tokenizer)
    loop = RolloutLoop(engine, policy, PromptBuilder(), {"image_search": None, "text_search": None},
                       RolloutSettings(max_context_tokens=max_context_tokens, **settings))  # fmt: skip
    (traj,) = loop.run([sample], 1, SamplingParams())
    return traj, engine


def test_a_prompt_that_fills_the_context_is_noted(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    whole, _ = _run(tiny_policy, sample, 4096)
    assert whole.finish_reason == "answer" and whole.context == []
    prompt = whole.prompt_len
    traj, engine = _run(tiny_policy, sample, prompt)  # not one token of room
    assert traj.finish_reason == "truncated" and traj.turns == [] and engine.requests == []
    assert traj.context == [f"prompt of {prompt} tokens fills max_context_tokens={prompt}: no turn generated, "
                            "the episode ends (truncated)"]  # fmt: skip
    assert traj.input_ids == whole.input_ids[:prompt] and traj.loss_mask == [0] * prompt  # the prompt, unchanged
    # the budget cut this episode whole: rollout/context_cut counts it, as it counts any other cut
    metrics = rollout_metrics([traj], [sample], [0.0], [{}], RolloutSettings(max_context_tokens=prompt))
    assert metrics["rollout/context_cut"] == 1.0 and metrics["rollout/truncated"] == 1.0


def test_a_prompt_with_room_for_a_token_is_not_noted(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    prompt = _run(tiny_policy, sample, 4096)[0].prompt_len
    traj, _ = _run(tiny_policy, sample, prompt + 1)
    # one sampled token, cut at the context limit: that turn's own note, not the prompt's
    assert len(traj.turns) == 1 and traj.turns[0].truncated and traj.finish_reason == "truncated"
    assert traj.context == ["turn 1: cut at the context limit after 1 tokens"]



def test_a_turn_cut_by_its_own_cap_where_the_room_left_equals_it_is_not_a_context_cut(tiny_policy, fvqa_samples):
    """A turn that stops at ``max_tokens_per_turn`` is cut by its cap, not the context, even where the room left
    is exactly that cap; one token less room and the same turn is cut at the context limit, and noted."""
    sample = fvqa_samples[0]
    whole, _ = _run(tiny_policy, sample, 4096)
    prompt, (start, end) = whole.prompt_len, whole.turns[0].span
    cap = end - start - 2  # the answer turn no longer fits its cap
    for room, context in ((cap, []), (cap - 1, [f"turn 1: cut at the context limit after {cap - 1} tokens"])):
        traj, _ = _run(tiny_policy, sample, prompt + room, max_tokens_per_turn=cap)
        assert traj.finish_reason == "truncated" and traj.turns[0].truncated and len(traj) == prompt + room, room
        assert traj.context == context, room

def test_a_tool_limit_naming_no_configured_tool_is_refused_as_the_loop_is_built(tiny_policy):
    """``tool_limits={"imge_search": 1}`` (a typo) limited nothing, without a word: the settings cannot know the
    tools, the loop refuses it, naming the key and the tools it has."""
    engine, tools = ScriptedEngine({}, tiny_policy.tokenizer), {"image_search": None, "text_search": None}
    with pytest.raises(ValueError, match=r"^RolloutSettings.tool_limits names 'imge_search', not a configured tool "
                                         r"\(configured: image_search, text_search\)"):  # fmt: skip
        RolloutLoop(engine, tiny_policy, PromptBuilder(), tools, RolloutSettings(tool_limits={"imge_search": 1}))
    loop = RolloutLoop(engine, tiny_policy, PromptBuilder(), tools, RolloutSettings(tool_limits={"image_search": 0}))
    assert loop.settings.tool_limits == {"image_search": 0}  # a configured tool's name is kept
