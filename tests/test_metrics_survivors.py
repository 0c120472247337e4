"""Rollout and held-out metrics a mutation audit found untested: the reward's ``searched`` term is not logged twice,
a prompt without a data source is in no source group, and a held-out failure rate counts the failed calls."""

import pytest

from mmsr.data.sample import Sample
from mmsr.metrics import episode_metrics, held_out_metrics, rollout_metrics
from mmsr.reward.mmsearch_r1 import MMSearchR1Reward
from mmsr.rollout.actions import Answer, ImageSearch, TextSearch
from mmsr.rollout.loop import RolloutSettings
from mmsr.rollout.trajectory import ToolCall, Trajectory, Turn
from mmsr.tools.base import ToolResult
from tests.test_metrics import traj


def test_the_rewards_searched_term_is_not_logged_as_a_reward_term():
    """``MMSearchR1Reward.details`` holds ``searched`` (any tool called): it is ``rollout/search_ratio/any`` already,
    and a ``reward/searched`` column beside it would be the same number under a second name."""
    samples = [Sample("a", "q", None, "x")]
    trajs = [traj(0, [Answer("a")]), traj(0, [ImageSearch(), Answer("a")])]
    details = [MMSearchR1Reward().details(t, samples[0]) for t in trajs]
    assert all("searched" in d for d in details)  # the term this is about
    m = rollout_metrics(trajs, samples, [0.0, 0.0], details, RolloutSettings())
    assert not any("searched" in k for k in m if k.startswith("reward/"))
    assert {k for k in m if k.startswith("reward/") and "/accuracy/" not in k} == {
        "reward/mean", "reward/accuracy", "reward/format"}


def test_prompts_without_a_data_source_form_no_source_group():
    """A row with no ``data_source`` (None or empty) is in no source group, as one without a category is in no
    category: a ``data_source/None`` curve would read as a source of that name (and beside a named source the
    group names, None among strings, could not be sorted)."""
    samples = [Sample("a", "q", None, "x", data_source=None, category="free"),
               Sample("b", "q", None, "x", data_source="", category=None)]  # fmt: skip
    trajs = [traj(0, [ImageSearch(), Answer("a")]), traj(1, [Answer("a")])]
    m = rollout_metrics(trajs, samples, [1.0, 0.0], [{"correct": 1.0}, {"correct": 0.0}], RolloutSettings())
    grouped = {k: v for k, v in m.items() if k.startswith(("reward/accuracy/", "rollout/search_ratio/any/"))}
    assert grouped == {"reward/accuracy/free": 1.0, "rollout/search_ratio/any/free": 1.0}


def test_held_out_episodes_without_a_data_source_form_no_source_group():
    """The held-out pooling groups alike (``val/.../data_source/None`` neither)."""
    episodes = [{"metrics": {"reward/accuracy": 1.0, "rollout/search_ratio/any": 0.0}, "data_source": None,
                 "category": None},
                {"metrics": {"reward/accuracy": 0.0, "rollout/search_ratio/any": 1.0}, "data_source": "s",
                 "category": None}]  # fmt: skip
    m = held_out_metrics(episodes)
    assert {k: v for k, v in m.items() if "/data_source/" in k} == {
        "val/reward/accuracy/data_source/s": 0.0, "val/rollout/search_ratio/any/data_source/s": 1.0}


def test_an_episodes_failed_calls_are_its_failed_calls_not_its_successful_ones():
    """One of an episode's three calls failed: ``failed_calls`` 1 and a held-out failure rate of 1/3 (counting the
    successful calls read 2/3: a tool that fails a third of the time looked like one that mostly fails)."""
    calls = [ToolResult("ok"), ToolResult("error: timeout", ok=False), ToolResult("ok")]
    actions = [ImageSearch(), TextSearch("q"), TextSearch("r")]
    turns = [Turn("t", a, (0, 0), tool_call=ToolCall("image_search" if isinstance(a, ImageSearch) else "text_search",
                                                      "", r))
             for a, r in zip(actions, calls)] + [Turn("t", Answer("a"), (0, 0))]  # fmt: skip
    episode = Trajectory("s", 0, [1, 2], [0, 1], [0.0, -1.0], [], 1, turns)
    got = episode_metrics(episode, [Sample("s", "q", None, "x")], 0.0, {}, RolloutSettings())
    assert (got["calls"], got["failed_calls"]) == (3, 1)
    assert held_out_metrics([got])["val/tools/failure_rate"] == pytest.approx(1 / 3)
