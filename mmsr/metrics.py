"""Rollout-side metrics, named by stage (``rollout/``, ``reward/``, ``tools/``) in one place, and their
reduction over ranks.

Per-``data_source`` numbers are computed over that source's own rows (upstream computes every
source's search ratio over the whole batch, spec §9). Over ranks, counts are summed, ratios are of the
summed counts, maxima are maxima (``extreme``), a total every rank reads from one store is its largest reading
(``run_wide``) and everything else is a mean.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import get_args

from mmsr.checkpoint import gather_per_rank
from mmsr.data.rows import label
from mmsr.data.sample import Sample
from mmsr.rollout.loop import RolloutSettings
from mmsr.rollout.stats import RolloutStats
from mmsr.rollout.trajectory import FinishReason, Trajectory
from mmsr.tools.cache import filed_under
from mmsr.tools.spec import MMSEARCH_R1_TOOLS, ToolSpec


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def search_ratios(trajs: Sequence[Trajectory], settings: RolloutSettings,
                  tools: Sequence[ToolSpec] = MMSEARCH_R1_TOOLS) -> dict[str, float]:  # fmt: skip
    """Both of the paper's definitions: share of responses that call a tool (``any``, and per tool under
    its metric name: ``image``/``text`` for MMSearch-R1's pair), and calls made over the maximum allowed
    (``calls``)."""
    allowed = min(settings.max_rounds - 1, sum(settings.limit(spec) for spec in tools))
    per_tool = {spec.metric: _mean([t.num_calls(spec.name) > 0 for t in trajs]) for spec in tools}
    return {
        "any": _mean([t.num_tool_calls > 0 for t in trajs]),
        **per_tool,
        "calls": _mean([t.num_tool_calls / max(allowed, 1) for t in trajs]),
    }


def rollout_metrics(
    trajs: Sequence[Trajectory],
    samples: Sequence[Sample],
    rewards: Sequence[float],
    details: Sequence[dict[str, float]],
    settings: RolloutSettings,
    by_group: bool = True,
) -> dict[str, float]:
    """Scalar metrics of one step's trajectories; ``samples[t.group_id]`` is each one's prompt (the tools
    are the trajectories' own). ``by_group``: with accuracy and search ratio per data source and per
    category (``group_metrics``) of these trajectories alone; a run on several ranks computes those from
    every rank's episodes instead (``summed_over_ranks``)."""
    tools = trajs[0].tools if trajs else MMSEARCH_R1_TOOLS
    terms = {k for d in details for k in d}
    # a term no episode's details hold is not logged: a reward without details measured no accuracy, and a
    # constant 0 read as a policy never right; where some episodes hold it, the others count 0
    named = {"correct": "accuracy", "format": "format"}
    out = {"reward/mean": _mean(rewards)}
    out |= {f"reward/{named[k]}": _mean([d.get(k, 0.0) for d in details]) for k in named if k in terms}
    out |= {
        "rollout/turns": _mean([len(t.turns) for t in trajs]),
        "rollout/response_tokens": _mean([t.num_sampled_tokens for t in trajs]),
        "rollout/length": _mean([len(t) for t in trajs]),
        "rollout/truncated": _mean([t.finish_reason == "truncated" for t in trajs]),
        "rollout/context_cut": _mean([bool(getattr(t, "context", ())) for t in trajs]),  # the budget cut something
    }
    # how episodes ended, every reason every step (a column that appears only when one happens leaves gaps):
    # ``no_action`` is a turn with neither a valid tool call nor an answer, which a policy can drift into unseen
    out |= {f"rollout/finish/{r}": _mean([t.finish_reason == r for t in trajs]) for r in get_args(FinishReason)}
    # a reward's own terms beyond these (``JudgedReward``'s ``judge_failed``): their step means
    extra = sorted(terms - {"correct", "format", "searched"})
    out |= {f"reward/{k}": _mean([d.get(k, 0.0) for d in details]) for k in extra}
    out |= {f"rollout/search_ratio/{k}": v for k, v in search_ratios(trajs, settings, tools).items()}
    return out | group_metrics(group_sums(trajs, samples, details)) if by_group else out


# (field, name) -> (episodes, summed correctness, searched, graded: episodes whose reward reported correctness)
GroupSums = dict[tuple[str, str], tuple[int, float, int, int]]


def group_sums(trajs: Sequence[Trajectory], samples: Sequence[Sample], details: Sequence[dict[str, float]]) -> GroupSums:
    """Per ``data_source`` and per ``category`` (an episode whose prompt has none is in no category): the
    episodes, their summed correctness, how many called a tool and how many have a ``correct`` term."""
    fields = [{"data_source": s.data_source, "category": s.category} for s in samples]
    return _summed((fields[t.group_id], d.get("correct"), t.num_tool_calls > 0) for t, d in zip(trajs, details))


def _summed(episodes: Iterable[tuple[Mapping, float | None, float]]) -> GroupSums:
    """``GroupSums`` of ``(the episode's data_source and category, its correctness or None, whether it searched)``;
    a group is named by its text (a jsonl set's category ``1`` is group ``"1"``), one without a name is in none."""
    sums: GroupSums = {}
    for fields, correct, searched in episodes:
        for field in ("data_source", "category"):
            name = label(fields[field])  # a set's numbers next to its strings: sorted together, they raised
            if name is None:  # in no group (a category 0 is one)
                continue
            key = (field, name)
            n, total, searches, graded = sums.get(key, (0, 0.0, 0, 0))
            if correct is not None:
                total, graded = total + correct, graded + 1
            sums[key] = (n + 1, total, searches + searched, graded)
    return sums


def summed_over_ranks(sums: GroupSums) -> GroupSums:
    """Every rank's ``group_sums`` added up: a group's accuracy is then over its episodes on all ranks (a mean of
    per-rank means would weigh a rank's two episodes like another's ten, and miss a rank's group when that
    rank saw only one)."""
    total: GroupSums = {}
    for rank in gather_per_rank(sums):
        for key, values in rank.items():
            total[key] = tuple(a + b for a, b in zip(total.get(key, (0, 0.0, 0, 0)), values))  # type: ignore[assignment]
    return total


# A category's metrics are under its name (the question kinds ``mmsr report`` and the demo plot), a data source's
# under ``data_source/``: a source and a category of one name shared a key, the category's value overwriting.
GROUP_KEYS = {"data_source": "data_source/{}", "category": "{}"}


def group_metrics(sums: GroupSums) -> dict[str, float]:
    """``reward/accuracy/<category>`` and ``rollout/search_ratio/any/<category>`` of each category over its own
    episodes, and ``.../data_source/<name>`` of each data source; also for a step whose prompts share one (a step
    without one left a hole in its curve). Accuracies only when some episode was graded (as ``reward/accuracy``);
    after ``summed_over_ranks`` every rank decides alike."""
    out = {}
    graded = any(n_graded for *_, n_graded in sums.values())
    for field, key in GROUP_KEYS.items():
        for name in sorted(name for f, name in sums if f == field):
            n, correct, searched, _ = sums[field, name]
            out[f"rollout/search_ratio/any/{key.format(name)}"] = searched / n
            if graded:
                out[f"reward/accuracy/{key.format(name)}"] = float(correct / n)
    return out


def zero_std_groups(rewards: Sequence[float], group_ids: Sequence[int]) -> float:
    """Share of the step's groups whose rewards are all equal (a group of one included): every estimator
    gives them advantage 0, so the policy loss learns nothing from them (only a KL or entropy term moves
    them). Near 1 the step is wasted: prompts too easy or too hard for the policy, or a reward that does
    not tell its samples apart."""
    groups: dict[int, set[float]] = defaultdict(set)
    for g, r in zip(group_ids, rewards):
        groups[g].add(r)
    return _mean([len(values) == 1 for values in groups.values()])


def episode_metrics(traj: Trajectory, samples: Sequence[Sample], reward: float, detail: dict[str, float],
                    settings: RolloutSettings) -> dict:
    """One held-out episode's ``rollout_metrics`` values with its prompt's ``data_source`` and ``category``
    (``samples[traj.group_id]``): what ``held_out_metrics`` pools over episodes and ranks."""
    sample = samples[traj.group_id]
    metrics = rollout_metrics([traj], samples, [reward], [detail], settings, by_group=False)  # pooled later
    calls = [t.tool_call for t in traj.turns if t.tool_call is not None]
    return {"metrics": metrics, "data_source": sample.data_source, "category": sample.category,
            "calls": len(calls), "failed_calls": sum(not call.result.ok for call in calls)}  # fmt: skip


def held_out_metrics(episodes: Sequence[dict]) -> dict[str, float]:
    """``val/`` metrics of held-out episodes (``episode_metrics`` of each, every rank's): each key's mean
    over the episodes, and accuracy and search ratio per data source and per category, computed over that
    group's own episodes (``group_metrics``, as for a step); ``val/tools/failure_rate``, failed calls over calls
    (absent without any)."""
    # every episode's keys: a reward's own terms may be in some episodes' details only (a step's metrics count
    # them 0 where absent, as here; taking the first episode's keys dropped some and raised on others)
    keys = dict.fromkeys(k for e in episodes for k in e["metrics"])
    out = {f"val/{k}": _mean([e["metrics"].get(k, 0.0) for e in episodes]) for k in keys}
    sums = _summed((e, e["metrics"].get("reward/accuracy"), e["metrics"].get("rollout/search_ratio/any", 0.0))
                   for e in episodes)  # fmt: skip
    out |= {f"val/{k}": v for k, v in group_metrics(sums).items()} | {"val/episodes": float(len(episodes))}
    # a tool that cannot serve the held-out rows (a cache keyed on the training rows) showed only as lower accuracy
    calls = sum(e.get("calls", 0) for e in episodes)
    return out | ({"val/tools/failure_rate": sum(e.get("failed_calls", 0) for e in episodes) / calls} if calls else {})


def tool_metrics(stats: RolloutStats, tools: dict | None = None,
                 counters: ToolCounters | None = None) -> dict[str, float]:  # fmt: skip
    """The tool calls of every rank's rollout (a collective; on one process its own): calls per tool, failure
    rate, latency and overlap (``tool_rates`` of the summed ``tool_sums``), and each tool's own counters (API
    calls, cost, cache hits of cached/web tools) under ``tools/<kind>/``, summed: a step's totals, what each
    process's tools added since ``counters``' previous reading (``ToolCounters.step``; without ``counters``,
    since they were built; a run-wide one, ``run_wide``, the largest rank's reading)."""
    own = (counters or ToolCounters()).step(tools)
    ranks = gather_per_rank((own, tool_sums(stats)))  # one collective for both
    return _counters_over_ranks([own for own, _ in ranks]) | tool_rates(_added(sums for _, sums in ranks))


class ToolCounters:
    """This process's tool counters a step added: a tool counts from when it was built (from 0 again in a resumed
    process), and a step's row logged that running total, the step's calls read 1, 2, 3 over three steps of one.
    Keep one across steps (``GRPOModule``); held-out episodes' calls between two readings fall in the next one."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}  # the previous reading (``tool_counters``)

    def step(self, tools: dict | None) -> dict[str, float]:
        """``tool_counters(tools)`` less the previous reading, key by key, but for a run-wide counter (``run_wide``:
        its run's shared total, logged as read)."""
        now = tool_counters(tools)
        added = {k: v if run_wide(k) else v - self._last.get(k, 0.0) for k, v in now.items()}
        self._last = now
        return added


def run_wide(key: str) -> bool:
    """Whether a tool's counter is its run's (its last part starts with ``run_``: ``CachedTool``'s
    ``run_api_calls`` and ``run_api_cost``, read from the budget a run's processes share in one file): every
    rank reads the same total, which their sum would count once per rank."""
    return key.rsplit("/", 1)[-1].startswith("run_")


def _counters_over_ranks(per_rank: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each tool counter's sum over the ranks that have it, a run-wide one's largest value (``run_wide``: the
    ranks read it at different moments, and it grows but for calls given back)."""
    total = _added(per_rank)
    return total | {k: max(rank[k] for rank in per_rank if k in rank) for k in total if run_wide(k)}


def tool_counters(tools: dict | None) -> dict[str, float]:
    """Each tool's own counters (``tool.metrics()``, since the tool was built) under ``tools/<kind>/``, a
    ``CachedTool``'s of each kind under that kind alone (``filed_under``: ``tools/<kind>/cache_hits``)."""
    own, tools = {}, tools or {}
    for kind, tool in tools.items():
        if hasattr(tool, "metrics"):
            own |= filed_under(kind, tool.metrics(), tools)
    return own


def rollout_timings(stats: RolloutStats) -> dict[str, float]:
    """This rank's seconds generating and waiting for tools, and its sampled tokens a second of generation."""
    return {
        "timing/generate": stats.generate_s,
        "timing/tools": stats.tools_s,
        "rollout/tokens_per_s": stats.sampled_tokens / stats.generate_s if stats.generate_s else 0.0,
    }


def tool_sums(stats: RolloutStats) -> dict[str, float]:
    """What ``tool_rates`` are made of, as sums that add up over ranks (``totals_over_ranks``): the calls per
    tool (``tools/<name>_calls``), failures, summed latency and its calls, seconds waited for and run by tools."""
    calls = {f"tools/{name}_calls": float(n) for name, n in stats.tool_calls.items()}
    return calls | {"failures": float(stats.tool_failures), "latency_s": sum(stats.tool_latency_s),
                    "timed_calls": float(len(stats.tool_latency_s)), "tools_s": stats.tools_s,
                    "tool_busy_s": stats.tool_busy_s}  # fmt: skip


def tool_rates(sums: dict[str, float]) -> dict[str, float]:
    """Calls per tool, ``tools/failure_rate``, ``tools/latency_s`` and ``rollout/overlap`` of ``tool_sums``:
    ratios of the sums, so that every call weighs the same whichever rank made it. A ratio of nothing (no call, no
    timed call, no second a tool ran) is left out: a step without calls logged a failure rate and latency of 0 and
    an overlap of 1, which a plot or a mean over steps read as measured."""
    counts = {k: v for k, v in sums.items() if k.startswith("tools/")}
    calls, waits = sum(counts.values()), RolloutStats(tools_s=sums["tools_s"], tool_busy_s=sums["tool_busy_s"])
    ratios = {
        "tools/failure_rate": (sums["failures"], calls),
        "tools/latency_s": (sums["latency_s"], sums["timed_calls"]),
    }
    out = counts | {k: n / d for k, (n, d) in ratios.items() if d}
    if waits.tool_busy_s > 0:
        out["rollout/overlap"] = waits.overlap  # share of tool time the rollout did not wait for
    return out


def totals_over_ranks(sums: dict[str, float]) -> dict[str, float]:
    """Each key's sum over the ranks that have it (``sums`` itself on one process)."""
    return _added(gather_per_rank(sums))


def _added(per_rank: Iterable[dict[str, float]]) -> dict[str, float]:
    """Each key's sum over the dicts that have it (the first one's value itself, bit for bit, where one has it)."""
    total: dict[str, float] = {}
    for rank in per_rank:
        for key, value in rank.items():
            total[key] = total[key] + value if key in total else value
    return total


# The metrics that are a maximum, by name: a key's words said it before, and ``rollout/finish/max_rounds`` (a share of
# episodes, a mean) was taken as the largest rank's share, the finish shares then summing past 1. ``memory/``: each
# rank's own reading, already the largest over ranks (``mmsr.parallel.memory_metrics``). No minimum is logged.
MAXIMA = frozenset({
    "train/ratio_max", "train/mismatch_max_abs_diff",  # mmsr.algo.loss._policy_metrics, mmsr.algo.correction.Mismatch
    "memory/policy_mb", "memory/reference_mb", "memory/cuda_peak_gb",
    "train/nonfinite_grad_steps",  # a count every rank shares (the norm is global): over ranks, exact as it is
})  # fmt: skip


def extreme(key: str) -> Callable[[Iterable[float]], float] | None:
    """``max`` for a metric that is a maximum (``MAXIMA``), ``None`` for the others: a mean of maxima is no
    maximum, so these are reduced (over micro-batches, updates and ranks) by what they are."""
    return max if key in MAXIMA else None


def reduced_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that logged it, or for a maximum the largest value (``extreme``). Ranks
    roll out different prompts, so their key sets can differ (a rank whose episodes sampled nothing has no
    ``train/ratio_max``); Lightning's ``sync_dist`` would pair the reductions of different keys across ranks.
    A reward term (``reward/accuracy``, ``reward/<term>``) is over every rank, 0 where a rank lacks it
    (``absent_is_zero``)."""
    per_rank = gather_per_rank({k: float(v) for k, v in metrics.items()})
    values = {k: [m.get(k, 0.0) for m in per_rank if k in m or absent_is_zero(k)]
              for k in sorted({k for m in per_rank for k in m})}  # fmt: skip
    return {k: (extreme(k) or _mean)(v) for k, v in values.items()}


def absent_is_zero(key: str) -> bool:
    """Whether a rank without ``key`` counts 0 for it: a reward term, absent where none of the rank's episodes hold
    it (``rollout_metrics``, which counts an episode without it 0). Over the ranks holding it, a term on one rank's
    episodes alone read 1.0 where one process holding all the episodes read 0.5."""
    return key.startswith("reward/")


def forget_step_metrics(trainer) -> None:
    """Drop the values of step-level metrics logged at earlier steps, so a step's row holds only what that
    step measured. Lightning keeps a metric's last value until the epoch ends and writes it into every
    later row of the epoch: a step without a text-search question repeated the previous step's
    ``reward/accuracy/text_search``, the warm start's imitation rows its last reading loss. Epoch-level
    metrics are left to accumulate. Call before the step logs (``on_train_batch_start``)."""
    results = trainer._results  # Lightning's collection of logged values (private: tests/test_module.py checks the rows)
    for metric in results.values() if results is not None else ():
        if metric.meta.on_step and not metric.meta.on_epoch:
            metric.reset()
