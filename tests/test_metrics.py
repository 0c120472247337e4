"""Rollout metrics by hand: search ratios under both definitions, per source and category over
their own rows (upstream computes them over the whole batch), tools' own counters, and how each
kind of metric is reduced over ranks (counts summed, maxima maxed, the others averaged)."""

import asyncio

import pytest

from mmsr.data.sample import Sample
from mmsr.metrics import rollout_metrics, rollout_timings, search_ratios, tool_counters, tool_metrics, zero_std_groups
from mmsr.rollout.actions import Answer, ImageSearch, TextSearch
from mmsr.rollout.loop import RolloutSettings
from mmsr.rollout.stats import RolloutStats
from mmsr.rollout.trajectory import ToolCall, Trajectory, Turn
from mmsr.tools.base import ToolRequest, ToolResult
from mmsr.tools.cache import CachedTool
from mmsr.tools.spec import ImageSearchTool, TextSearchTool


def traj(group, actions):
    turns = []
    for a in actions:
        call = None if isinstance(a, Answer) else ToolCall("image_search" if isinstance(a, ImageSearch) else "text_search", "", ToolResult("x"))
        turns.append(Turn("t", a, (0, 0), tool_call=call))
    return Trajectory("s", group, [1, 2], [0, 1], [0.0, -1.0], [], 1, turns)


def test_search_ratio_definitions():
    trajs = [traj(0, [Answer("a")]), traj(0, [ImageSearch(), Answer("a")]),
             traj(1, [ImageSearch(), TextSearch("q"), Answer("a")]), traj(1, [TextSearch("q"), Answer("a")])]  # fmt: skip
    r = search_ratios(trajs, RolloutSettings())  # at most 2 calls (3 rounds)
    assert r["any"] == 0.75 and r["image"] == 0.5 and r["text"] == 0.5
    assert r["calls"] == pytest.approx((0 + 1 + 2 + 1) / 2 / 4)


def test_per_source_and_category_use_their_own_rows():
    samples = [Sample("a", "q", None, "x", data_source="src1", category="search_free"),
               Sample("b", "q", None, "x", data_source="src2", category="image_search")]  # fmt: skip
    trajs = [traj(0, [Answer("a")]), traj(0, [Answer("a")]), traj(1, [ImageSearch(), Answer("a")]), traj(1, [Answer("a")])]
    details = [{"correct": 1.0}, {"correct": 0.0}, {"correct": 1.0}, {"correct": 1.0}]
    m = rollout_metrics(trajs, samples, [1, 0, 0.91, 1], details, RolloutSettings())
    assert m["rollout/search_ratio/any"] == 0.25
    assert m["rollout/search_ratio/any/data_source/src1"] == 0.0 and m["rollout/search_ratio/any/data_source/src2"] == 0.5
    assert m["reward/accuracy/search_free"] == 0.5 and m["reward/accuracy/image_search"] == 1.0
    assert m["reward/mean"] == pytest.approx(2.91 / 4)


def test_every_finish_reason_is_logged_each_step_as_a_share_of_episodes():
    trajs = [traj(0, [Answer("a")]) for _ in range(4)]
    for t, reason in zip(trajs, ["answer", "no_action", "no_action", "truncated"]):
        t.finish_reason = reason
    m = rollout_metrics(trajs, [Sample("a", "q", None, "x")], [0.0] * 4, [{}] * 4, RolloutSettings())
    assert {k: v for k, v in m.items() if k.startswith("rollout/finish/")} == {
        "rollout/finish/answer": 0.25, "rollout/finish/no_action": 0.5, "rollout/finish/max_rounds": 0.0,
        "rollout/finish/search_limit": 0.0, "rollout/finish/truncated": 0.25}


def test_an_episode_that_ran_out_of_rounds_is_not_counted_truncated():
    """``rollout/truncated`` is the share cut by the token budget alone: an episode that used every round ended on
    a complete turn (``rollout/finish/max_rounds``), and counting it there read as a budget too small."""
    ended = traj(0, [ImageSearch(), Answer("a")])
    ended.finish_reason = "max_rounds"
    m = rollout_metrics([ended], [Sample("a", "q", None, "x")], [0.0], [{}], RolloutSettings())
    assert m["rollout/truncated"] == 0.0 and m["rollout/finish/max_rounds"] == 1.0

def test_tool_metrics_include_each_tools_counters():
    class Counted:
        def metrics(self):
            return {"tools/api_calls": 3.0, "tools/cache_hits": 2.0}

    stats = RolloutStats(generate_s=2.0, sampled_tokens=100, tool_failures=1, tool_latency_s=[0.5, 1.5])
    stats.tool_calls["text_search"] = 2
    m = tool_metrics(stats, {"text_search": Counted(), "image_search": None})
    assert m["tools/text_search/api_calls"] == 3.0 and m["tools/text_search/cache_hits"] == 2.0
    assert m["tools/failure_rate"] == 0.5 and m["tools/latency_s"] == 1.0
    assert rollout_timings(stats) == {"timing/generate": 2.0, "timing/tools": 0.0, "rollout/tokens_per_s": 50.0}


class Echo:
    """A search backend that answers every request, at $0.25 a call."""

    provider_name = "echo"

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: ToolRequest) -> ToolResult:
        self.calls += 1
        return ToolResult(f"{request.kind}: {request.query}", cost=0.25)


def _searched(tool, requests):
    async def main():
        for request in requests:
            await tool(request)

    asyncio.run(main())


SPENT = ("api_calls", "api_cost", "run_api_calls", "run_api_cost")


def test_a_cached_tools_counters_are_logged_under_its_kind_once(tmp_path):
    # A budget of 3 API calls: "a" misses, "a" hits, "b" and "c" miss, "d" misses and the budget refuses it.
    # They were logged as tools/text_search/text_search/cache_hits, unlike the README's tools/<kind>/cache_hits.
    tool = CachedTool(Echo(), str(tmp_path / "c.sqlite"), max_calls=3)
    assert tool_counters({"text_search": tool}) == {f"tools/text_search/{k}": 0.0 for k in SPENT}  # nothing asked yet
    _searched(tool, [ToolRequest("text_search", q) for q in "aabcd"])
    assert tool_counters({"text_search": tool}) == {
        "tools/text_search/cache_hits": 1.0, "tools/text_search/cache_misses": 4.0, "tools/text_search/budget_refusals": 1.0,
        "tools/text_search/api_calls": 3.0, "tools/text_search/api_cost": 0.75,
        "tools/text_search/run_api_calls": 3.0, "tools/text_search/run_api_cost": 0.75,
    }  # fmt: skip


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "in_tool_entries"])
def test_one_cached_tool_serving_both_kinds_logs_each_kinds_counters_under_it_alone(tmp_path, wrapped):
    # Text search "x" misses then hits, image search misses: 2 API calls, 1 per kind. Each kind logged both kinds'
    # events (under tools/<kind>/<other kind>/...) and the tool's 2 calls, 4 in all.
    backend = Echo()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"))
    x, image = ToolRequest("text_search", "x"), ToolRequest("image_search", image_url="https://img.example/1.jpg")
    _searched(tool, [x, x, image])
    both = {"image_search": ImageSearchTool(tool), "text_search": TextSearchTool(tool)} if wrapped else {
        "image_search": tool, "text_search": tool}  # fmt: skip
    m = tool_counters(both)
    one_call = dict(zip(SPENT, (1.0, 0.25, 1.0, 0.25)))
    assert m == {**{f"tools/image_search/{k}": v for k, v in one_call.items()}, "tools/image_search/cache_misses": 1.0,
                 **{f"tools/text_search/{k}": v for k, v in one_call.items()}, "tools/text_search/cache_misses": 1.0,
                 "tools/text_search/cache_hits": 1.0}  # fmt: skip
    assert sum(v for k, v in m.items() if k.endswith("/api_calls")) == backend.calls == 2


def test_zero_std_groups_counts_groups_without_a_learning_signal():
    # groups 0 (all 1.0) and 2 (alone) teach nothing; 1 has two rewards; 3 repeats 0.5 but differs once
    rewards = [1.0, 1.0, 0.0, 1.0, 0.7, 0.5, 0.5, 0.4]
    groups = [0, 0, 1, 1, 2, 3, 3, 3]
    assert zero_std_groups(rewards, groups) == 2 / 4
    assert zero_std_groups([0.0, 0.0], [5, 5]) == 1.0 and zero_std_groups([], []) == 0.0


def test_per_source_metrics_of_several_ranks_are_over_every_ranks_episodes(monkeypatch):
    """Rank 0 holds 4 episodes of source A (right), rank 1 two of A (wrong) and two of B: A is 4 of 6 right.
    Per-rank means gave 0 (rank 0, one source, logged no per-source key then; rank 1's A was 0 of 2)."""
    import mmsr.metrics as metrics

    samples = [Sample("a", "q", None, "x", data_source="A"), Sample("b", "q", None, "x", data_source="B")]
    ranks = [([traj(0, [Answer("a")])] * 4, [{"correct": 1.0}] * 4),
             ([traj(0, [Answer("a")])] * 2 + [traj(1, [ImageSearch(), Answer("a")])] * 2, [{"correct": 0.0}] * 2 + [{"correct": 1.0}] * 2)]  # fmt: skip
    per_rank = [metrics.group_sums(trajs, samples, details) for trajs, details in ranks]
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: per_rank)
    m = metrics.group_metrics(metrics.summed_over_ranks(per_rank[0]))
    assert m["reward/accuracy/data_source/A"] == pytest.approx(4 / 6) and m["reward/accuracy/data_source/B"] == 1.0
    assert m["rollout/search_ratio/any/data_source/A"] == 0.0 and m["rollout/search_ratio/any/data_source/B"] == 1.0


def test_held_out_metrics_take_every_episodes_keys():
    """A reward whose details name a term in some episodes only: absent counts 0, as in a step's metrics (the
    first episode's keys were taken: a term missing there was dropped, one missing later raised KeyError)."""
    from mmsr.metrics import held_out_metrics

    episodes = [{"metrics": {"reward/mean": 1.0}, "data_source": "a", "category": None},
                {"metrics": {"reward/mean": 0.0, "reward/judge_failed": 1.0}, "data_source": "a", "category": None},
                {"metrics": {"reward/mean": 0.5}, "data_source": "a", "category": None}]  # fmt: skip
    m = held_out_metrics(episodes)
    assert m["val/reward/mean"] == 0.5 and m["val/reward/judge_failed"] == pytest.approx(1 / 3) and m["val/episodes"] == 3


def test_the_held_out_tool_failure_rate_is_over_calls_not_episodes():
    """Failed calls over every episode's calls: 1 of 4 calls failed is 0.25, whichever episode made them (over the
    2 episodes it read 0.5)."""
    from mmsr.metrics import held_out_metrics

    episodes = [{"metrics": {}, "data_source": "a", "category": None, "calls": 3, "failed_calls": 1},
                {"metrics": {}, "data_source": "a", "category": None, "calls": 1, "failed_calls": 0}]  # fmt: skip
    assert held_out_metrics(episodes)["val/tools/failure_rate"] == 0.25

def test_tool_rates_of_several_ranks_are_over_every_ranks_calls(monkeypatch):
    """Rank 0's one call failed after 20 s, rank 1's nine took 1 s each: 1 failure in 10 calls, 2.9 s a call
    (a mean of the ranks' ratios logged 0.5 and 10.5 s); counts are the step's totals."""
    import mmsr.metrics as metrics

    r0 = RolloutStats(tools_s=20.0, tool_busy_s=20.0, tool_failures=1, tool_latency_s=[20.0])
    r1 = RolloutStats(tools_s=0.0, tool_busy_s=9.0, tool_latency_s=[1.0] * 9)
    r0.tool_calls["text_search"], r1.tool_calls["text_search"] = 1, 9
    per_rank = [metrics.tool_sums(r0), metrics.tool_sums(r1)]
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: per_rank)
    m = metrics.tool_rates(metrics.totals_over_ranks(per_rank[0]))
    assert m["tools/failure_rate"] == pytest.approx(0.1) and m["tools/latency_s"] == pytest.approx(2.9)
    assert m["tools/text_search_calls"] == 10 and m["tools/image_search_calls"] == 0
    assert m["rollout/overlap"] == pytest.approx(1 - 20 / 29)  # 20 s waited of the 29 s tools ran


def test_tool_rates_of_one_process_are_its_own_ratios_bit_for_bit():
    stats = RolloutStats(generate_s=3.0, tools_s=0.7, tool_busy_s=2.3, tool_failures=1, tool_latency_s=[0.1, 0.7, 0.35])
    stats.tool_calls |= {"image_search": 1, "text_search": 2}
    m = tool_metrics(stats)
    assert m["tools/failure_rate"] == 1 / 3 and m["tools/latency_s"] == float(sum(stats.tool_latency_s) / 3)
    assert m["rollout/overlap"] == stats.overlap and m["tools/text_search_calls"] == 2.0
    from mmsr.metrics import tool_rates, tool_sums, totals_over_ranks

    assert tool_rates(totals_over_ranks(tool_sums(stats))).items() <= m.items()  # what training_step logs


def test_tool_rates_of_a_step_without_calls_leave_out_the_ratios_of_nothing(monkeypatch):
    """No rank called a tool: a failure rate and latency of 0 and an overlap of 1 were logged, read as measured. A
    rank without calls whose peer had some logs the peer's ratios (every rank decides on the summed counts)."""
    import mmsr.metrics as metrics

    idle = metrics.tool_sums(RolloutStats(generate_s=1.0))
    assert metrics.tool_rates(idle) == {"tools/image_search_calls": 0.0, "tools/text_search_calls": 0.0}
    busy = RolloutStats(tools_s=0.5, tool_busy_s=1.0, tool_latency_s=[1.0])
    busy.tool_calls["text_search"] = 1
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: [obj, ({}, metrics.tool_sums(busy))])
    m = metrics.tool_metrics(RolloutStats())
    assert (m["tools/failure_rate"], m["tools/latency_s"], m["rollout/overlap"]) == (0.0, 1.0, 0.5)


def test_tool_counters_log_what_each_step_added_and_a_run_wide_total_as_read():
    """A tool counts from when it was built: each reading less the previous one, the run's shared total as it is,
    and the first reading whole (a resumed process counts from 0 again)."""
    from mmsr.metrics import ToolCounters

    class Growing:
        readings = iter([(2.0, 0.5, 7.0), (2.0, 0.5, 7.0), (5.0, 1.25, 11.0)])

        def metrics(self):
            calls, cost, run_calls = next(self.readings)
            return {"tools/api_calls": calls, "tools/api_cost": cost, "tools/run_api_calls": run_calls}

    counters, tools = ToolCounters(), {"text_search": Growing()}
    steps = [counters.step(tools) for _ in range(3)]
    assert [s["tools/text_search/api_calls"] for s in steps] == [2.0, 0.0, 3.0]
    assert [s["tools/text_search/api_cost"] for s in steps] == [0.5, 0.0, 0.75]
    assert [s["tools/text_search/run_api_calls"] for s in steps] == [7.0, 7.0, 11.0]


def test_a_reward_without_details_logs_no_accuracy_or_format():
    """The README's reward with ``__call__`` alone: no term measures correctness, so no ``reward/accuracy`` (nor
    per source, nor held-out) rather than a constant 0 that reads "never right"; search ratios stay."""
    from mmsr.metrics import episode_metrics, held_out_metrics

    samples = [Sample("a", "q", None, "x", data_source="A"), Sample("b", "q", None, "x", data_source="B")]
    trajs = [traj(0, [Answer("a")]), traj(0, [ImageSearch(), Answer("a")]), traj(1, [Answer("a")]), traj(1, [Answer("a")])]
    m = rollout_metrics(trajs, samples, [1.0] * 4, [{}] * 4, RolloutSettings())
    assert not [k for k in m if k.startswith(("reward/accuracy", "reward/format"))]
    assert m["reward/mean"] == 1.0 and m["rollout/search_ratio/any/data_source/A"] == 0.5
    val = held_out_metrics([episode_metrics(t, samples, 1.0, {}, RolloutSettings()) for t in trajs])
    assert not [k for k in val if "accuracy" in k or "format" in k] and val["val/rollout/search_ratio/any/data_source/A"] == 0.5
    # where some episodes hold a term, the others count 0 (as for a reward's own terms)
    m = rollout_metrics(trajs, samples, [1.0] * 4, [{"correct": 1.0}, {}, {}, {}], RolloutSettings())
    assert m["reward/accuracy"] == 0.25 and m["reward/accuracy/data_source/A"] == 0.5
    assert m["reward/accuracy/data_source/B"] == 0.0
    assert "reward/format" not in m


def test_group_accuracies_are_decided_alike_on_every_rank(monkeypatch):
    """Rank 1 graded none of its episodes, rank 0 graded its own: both log the accuracy per source (the keys of
    a step must match across ranks), from the sums of all."""
    import mmsr.metrics as metrics

    samples = [Sample("a", "q", None, "x", data_source="A"), Sample("b", "q", None, "x", data_source="B")]
    ranks = [([traj(0, [Answer("a")]), traj(1, [Answer("a")])], [{"correct": 1.0}] * 2),
             ([traj(0, [Answer("a")]), traj(1, [Answer("a")])], [{}] * 2)]  # fmt: skip
    per_rank = [metrics.group_sums(trajs, samples, details) for trajs, details in ranks]
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: per_rank)
    on_each = [metrics.group_metrics(metrics.summed_over_ranks(own)) for own in per_rank]
    assert on_each[0] == on_each[1] and on_each[0]["reward/accuracy/data_source/A"] == 0.5
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: [per_rank[1], per_rank[1]])
    assert "reward/accuracy/data_source/A" not in metrics.group_metrics(metrics.summed_over_ranks(per_rank[1]))


def test_a_step_of_one_category_and_one_source_still_logs_them():
    """Every prompt of the step is a ``search_free`` one from ``src``: its curves get this step's point (a field
    with one group logged nothing, a hole at every such step); a prompt without a category is in none."""
    samples = [Sample("a", "q", None, "x", data_source="src", category="search_free"),
               Sample("b", "q", None, "x", data_source="src", category="search_free")]  # fmt: skip
    trajs = [traj(0, [Answer("a")]), traj(1, [ImageSearch(), Answer("a")])]
    m = rollout_metrics(trajs, samples, [1.0, 0.0], [{"correct": 1.0}, {"correct": 0.0}], RolloutSettings())
    assert m["reward/accuracy/search_free"] == 0.5 and m["rollout/search_ratio/any/search_free"] == 0.5
    assert m["reward/accuracy/data_source/src"] == 0.5 and m["rollout/search_ratio/any/data_source/src"] == 0.5
    uncategorized = [Sample("a", "q", None, "x", data_source="src")]
    m = rollout_metrics(trajs[:1], uncategorized, [1.0], [{"correct": 1.0}], RolloutSettings())
    assert sorted(k for k in m if k.startswith("reward/accuracy/")) == ["reward/accuracy/data_source/src"]


def test_a_source_and_a_category_of_one_name_have_their_own_keys():
    """Source ``x`` is right, category ``x`` (of the other prompt) wrong: they shared ``reward/accuracy/x``, where
    the category's 0 overwrote the source's 1."""
    samples = [Sample("a", "q", None, "x", data_source="x", category="y"),
               Sample("b", "q", None, "x", data_source="y", category="x")]  # fmt: skip
    trajs = [traj(0, [Answer("a")]), traj(1, [Answer("a")])]
    m = rollout_metrics(trajs, samples, [1.0, 0.0], [{"correct": 1.0}, {"correct": 0.0}], RolloutSettings())
    assert m["reward/accuracy/data_source/x"] == 1.0 and m["reward/accuracy/x"] == 0.0
    assert m["reward/accuracy/data_source/y"] == 0.0 and m["reward/accuracy/y"] == 1.0


def test_maxima_are_the_largest_over_ranks_and_the_others_means(monkeypatch):
    """Rank 0's largest PPO ratio is 3, rank 1's 1: the step's is 3 (the mean of the ranks' maxima logged 2); a key
    one rank lacks (its episodes sampled nothing) is reduced over the ranks that have it."""
    import mmsr.metrics as metrics

    per_rank = [{"train/ratio_max": 3.0, "train/mismatch_max_abs_diff": 0.5, "train/ratio_mean": 1.5, "memory/cuda_peak_gb": 30.0},
                {"train/ratio_max": 1.0, "train/ratio_mean": 0.5, "memory/cuda_peak_gb": 10.0}]  # fmt: skip
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: per_rank)
    assert metrics.reduced_over_ranks(per_rank[0]) == {
        "memory/cuda_peak_gb": 30.0, "train/mismatch_max_abs_diff": 0.5, "train/ratio_max": 3.0, "train/ratio_mean": 1.0}


def test_a_reward_term_one_rank_lacks_counts_0_there(monkeypatch):
    """Rank 0's 4 episodes are graded right with a bonus, rank 1's reward gave no terms: over both, as on one process
    holding all 8, accuracy and bonus are 1/2 (reduced over the ranks holding them, they read 1.0)."""
    import mmsr.metrics as metrics

    samples, trajs, settings = [Sample("a", "q", None, "x")], [traj(0, [Answer("a")])] * 4, RolloutSettings()
    graded, ungraded = [{"correct": 1.0, "bonus": 1.0}] * 4, [{}] * 4
    one = rollout_metrics(trajs * 2, samples, [1.0] * 8, graded + ungraded, settings, by_group=False)
    per_rank = [rollout_metrics(trajs, samples, [1.0] * 4, d, settings, by_group=False) for d in (graded, ungraded)]
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: per_rank)
    reduced = metrics.reduced_over_ranks(per_rank[0])
    assert reduced["reward/accuracy"] == reduced["reward/bonus"] == one["reward/accuracy"] == one["reward/bonus"] == 0.5
    assert reduced.keys() == one.keys()


def test_finish_shares_over_ranks_sum_to_one(monkeypatch):
    """Rank 0's episodes all answered, half of rank 1's ran out of rounds: over both, 3/4 answered and 1/4 ran out.
    ``max`` is a word of ``rollout/finish/max_rounds``, which took the largest rank's 1/2 (shares summing to 5/4);
    a key with ``min`` in its words is no minimum either."""
    import mmsr.metrics as metrics

    per_rank = [{"rollout/finish/answer": 1.0, "rollout/finish/max_rounds": 0.0, "x/min_y": 2.0},
                {"rollout/finish/answer": 0.5, "rollout/finish/max_rounds": 0.5, "x/min_y": 0.0}]  # fmt: skip
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: per_rank)
    reduced = metrics.reduced_over_ranks(per_rank[0])
    assert reduced == {"rollout/finish/answer": 0.75, "rollout/finish/max_rounds": 0.25, "x/min_y": 1.0}
    assert sum(v for k, v in reduced.items() if k.startswith("rollout/finish/")) == 1.0


def test_tools_own_counters_are_summed_over_ranks(monkeypatch):
    """Rank 0's web tool made 3 API calls, rank 1's 5: the step's total is 8 (averaged, it read 4); the calls'
    ratios are of the summed counts."""
    import mmsr.metrics as metrics

    class Counted:
        def __init__(self, calls):
            self.calls = calls

        def metrics(self):
            return {"tools/api_calls": self.calls}

    stats = [RolloutStats(tool_failures=1, tool_latency_s=[4.0]), RolloutStats(tool_latency_s=[1.0] * 3)]
    stats[0].tool_calls["text_search"], stats[1].tool_calls["text_search"] = 1, 3
    tools = [{"text_search": Counted(3.0)}, {"text_search": Counted(5.0)}]
    sent = []  # what rank 1 hands the collectives, then what rank 0 gets back from them
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: sent.append(obj) or [obj])
    metrics.tool_metrics(stats[1], tools[1])
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: [obj, sent.pop(0)])
    m = metrics.tool_metrics(stats[0], tools[0])
    assert m["tools/text_search/api_calls"] == 8.0 and m["tools/text_search_calls"] == 4.0
    assert m["tools/failure_rate"] == 0.25 and m["tools/latency_s"] == pytest.approx(7 / 4)


def test_a_tools_run_wide_counter_is_the_largest_ranks_not_their_sum(monkeypatch):
    """Two ranks and a third process share one run's budget: rank 0 made 2 API calls, rank 1 made 3 and the other
    process 1; rank 0 read the budget before that one's call (5), rank 1 after it (6). The step's calls are 5
    (2 + 3), the run's 6, the latest reading (their sum logged 11); a counter of this rank's own is summed."""
    import mmsr.metrics as metrics

    class Budgeted:
        def __init__(self, calls, run_calls):
            self.calls, self.run_calls = calls, run_calls

        def metrics(self):
            return {"tools/api_calls": self.calls, "tools/run_api_calls": self.run_calls}

    stats = RolloutStats()
    per_rank = [(metrics.tool_counters({"image_search": Budgeted(*c)}), metrics.tool_sums(stats))
                for c in ((2.0, 5.0), (3.0, 6.0))]  # fmt: skip
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: per_rank)
    m = metrics.tool_metrics(stats, {})
    assert m["tools/image_search/api_calls"] == 5.0 and m["tools/image_search/run_api_calls"] == 6.0
    assert metrics.run_wide("tools/image_search/run_api_cost") and not metrics.run_wide("tools/image_search/api_cost")


class WebCounters:
    """A web search's counters: its own name their kind (``WebImageSearch``), its provider's do not."""

    def metrics(self):
        return {"tools/image_search/thumbnail_bad_image": 1.0, "tools/serper_lens/calls": 2.0}


def test_a_web_tools_own_counters_are_not_filed_under_their_kind_twice():
    # They were logged as tools/image_search/image_search/thumbnail_bad_image.
    assert tool_counters({"image_search": WebCounters()}) == {
        "tools/image_search/thumbnail_bad_image": 1.0, "tools/image_search/serper_lens/calls": 2.0}


def test_numeric_categories_and_sources_are_grouped_by_their_text():
    """A jsonl set's ``category`` of numbers next to a string one and a row without any: sorting the group names
    raised ``TypeError`` (str < int) after the step's episodes had run. Category ``0`` is a group, ``None`` none."""
    samples = [Sample("a", "q", None, "x", data_source=7, category=1), Sample("b", "q", None, "x", data_source="s", category=0),
               Sample("c", "q", None, "x", data_source="s", category="free"), Sample("d", "q", None, "x", data_source="s")]  # fmt: skip
    trajs = [traj(i, [Answer("a")]) for i in range(4)]
    details = [{"correct": c} for c in (1.0, 0.0, 1.0, 1.0)]
    m = rollout_metrics(trajs, samples, [1.0, 0.0, 1.0, 1.0], details, RolloutSettings())
    assert {k: v for k, v in m.items() if k.startswith("reward/accuracy/")} == {
        "reward/accuracy/0": 0.0, "reward/accuracy/1": 1.0, "reward/accuracy/free": 1.0,
        "reward/accuracy/data_source/7": 1.0, "reward/accuracy/data_source/s": 2 / 3}  # fmt: skip
