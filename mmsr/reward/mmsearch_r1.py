"""The MMSearch-R1 reward (paper Eq. 1): ``(1 - a) * Acc * SearchPenalty + a * Format``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from mmsr.data.sample import Sample
from mmsr.reward.answer import episode_answer, exact_match, parse_candidate_answers, sub_exact_match
from mmsr.reward.format import format_ok, penalized_count, search_count
from mmsr.rollout.trajectory import Trajectory
from mmsr.tools.spec import MMSEARCH_R1_TOOLS, ToolSpec

Mode = Literal["EM", "SubEM"]
_MATCHERS = {"EM": exact_match, "SubEM": sub_exact_match}


def is_correct(
    turns: list[str],
    ground_truth: str,
    candidate_answers: str | Sequence[str] = (),
    mode: Mode = "EM",
) -> bool:
    """Whether the last turn's ``<answer>`` matches the ground truth or a candidate answer."""
    if mode not in _MATCHERS:
        raise ValueError(f"unknown reward mode {mode!r}; expected one of {sorted(_MATCHERS)}")
    answer = episode_answer(turns)
    if answer is None:
        return False
    return _MATCHERS[mode](answer, [ground_truth, *parse_candidate_answers(candidate_answers)])


def mmsearch_r1_reward(
    turns: list[str],
    ground_truth: str,
    candidate_answers: str | Sequence[str] = (),
    *,
    search_penalty: float = 0.1,
    format_weight: float = 0.1,
    mode: Mode = "EM",
    per_search_penalty: bool = False,
    tools: Sequence[ToolSpec] = MMSEARCH_R1_TOOLS,
) -> float:
    """Reward of one trajectory given its decoded assistant turns (spec section 4).

    score = 1 if the last turn's answer is correct else 0; a correct answer reached after searching
    is multiplied by ``1 - search_penalty`` (once, or once per search if ``per_search_penalty``);
    reward = ``(1 - format_weight) * score + format_weight * format_ok(turns)``.
    ``candidate_answers`` may be a JSON string list, as in the upstream parquet data. ``tools``: the
    configured tools: those declared ``penalized`` count as searches (``ToolSpec.penalized``; a free crop
    need not), and all decide the valid shapes (``mmsr.reward.format``).
    """
    correct = is_correct(turns, ground_truth, candidate_answers, mode)
    return shaped_reward(turns, correct, search_penalty=search_penalty, format_weight=format_weight,
                         per_search_penalty=per_search_penalty, tools=tools)  # fmt: skip


def shaped_reward(turns: list[str], correct: bool, *, search_penalty: float = 0.1, format_weight: float = 0.1,
                  per_search_penalty: bool = False,
                  tools: Sequence[ToolSpec] = MMSEARCH_R1_TOOLS) -> float:  # fmt: skip
    """``mmsearch_r1_reward`` given whether the answer is correct, however that was decided (exact match,
    an LLM judge: ``mmsr.reward.judged``); 0.0 for an episode without turns."""
    if not turns:
        return 0.0
    score = float(correct)
    num_searches = penalized_count(turns, tools)
    if score > 0.99 and num_searches > 0:
        score *= (1.0 - search_penalty) ** (num_searches if per_search_penalty else 1)
    return (1.0 - format_weight) * score + format_weight * float(format_ok(turns, tools))


def trajectory_tools(trajectory: Trajectory) -> tuple[ToolSpec, ...]:
    """The tools the trajectory was rolled out with (a record without them: MMSearch-R1's pair)."""
    return getattr(trajectory, "tools", MMSEARCH_R1_TOOLS)


class MMSearchR1Reward:
    """``mmsearch_r1_reward`` as a configurable ``Reward`` (YAML: class_path + init_args)."""

    def __init__(
        self,
        search_penalty: float = 0.1,
        format_weight: float = 0.1,
        mode: Mode = "EM",
        per_search_penalty: bool = False,
    ) -> None:
        if mode not in _MATCHERS:
            raise ValueError(f"unknown reward mode {mode!r}; expected one of {sorted(_MATCHERS)}")
        self.search_penalty = search_penalty
        self.format_weight = format_weight
        self.mode: Mode = mode
        self.per_search_penalty = per_search_penalty

    def __call__(self, trajectory: Trajectory, sample: Sample) -> float:
        correct = is_correct(trajectory.assistant_texts, sample.ground_truth, sample.candidate_answers, self.mode)
        return self.shaped(trajectory, correct)

    def shaped(self, trajectory: Trajectory, correct: bool) -> float:
        """This table's reward of ``trajectory`` given whether its answer is correct, however that was
        decided (exact match here, an LLM judge in ``mmsr.reward.judged``)."""
        return shaped_reward(trajectory.assistant_texts, correct, search_penalty=self.search_penalty,
                             format_weight=self.format_weight, per_search_penalty=self.per_search_penalty,
                             tools=trajectory_tools(trajectory))  # fmt: skip

    def details(self, trajectory: Trajectory, sample: Sample) -> dict[str, float]:
        """Per-trajectory 0/1 metrics: answer correctness, format, and whether it searched: called any
        tool, penalized or not, as ``rollout/search_ratio/any`` counts it."""
        correct = is_correct(trajectory.assistant_texts, sample.ground_truth, sample.candidate_answers, self.mode)
        return {"correct": float(correct), **shape_details(trajectory)}


def shape_details(trajectory: Trajectory) -> dict[str, float]:
    """The reward's 0/1 terms besides correctness: ``format`` and ``searched`` (any tool called)."""
    turns, tools = trajectory.assistant_texts, trajectory_tools(trajectory)
    return {"format": float(format_ok(turns, tools)), "searched": float(search_count(turns, tools) > 0)}
