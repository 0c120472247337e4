"""The MMSearch-R1 reward: the spec's reward table, options, the Reward class and WeightedRewards."""

from __future__ import annotations

import random

import pytest

from mmsr.data.sample import Sample
from mmsr.reward import (
    MMSearchR1Reward,
    Reward,
    WeightedRewards,
    format_ok,
    mmsearch_r1_reward,
)
from mmsr.rollout.actions import Answer, ImageSearch, Invalid, TextSearch
from mmsr.rollout.parse import parse_action
from mmsr.rollout.trajectory import Trajectory, Turn

IMG = "<reason>I don't recognize this building.</reason>\n<search><img></search>"
TXT = "<reason>It is the Eiffel Tower.</reason>\n<text_search>Eiffel Tower architect</text_search>"
RIGHT = "<reason>The results name him.</reason>\n<answer>Gustave Eiffel</answer>"
WRONG = "<reason>I think it was him.</reason>\n<answer>Victor Hugo</answer>"
RIGHT_NO_REASON = "<answer>Gustave Eiffel</answer>"
GT = "Gustave Eiffel"
# an answer with a search after it: the rollout parser reads a text search, so the episode goes on
ANSWERED_THEN_SEARCHED = "<reason>r</reason><answer>Gustave Eiffel</answer><text_search>q</text_search>"


@pytest.mark.parametrize(
    ("case", "turns", "expected"),
    [
        ("correct, no search, format ok", [RIGHT], 1.00),
        ("correct, searched, format ok", [IMG, RIGHT], 0.91),
        ("correct, 2 searches, format ok", [IMG, TXT, RIGHT], 0.91),  # penalty applied once
        ("correct, no search, bad format", [RIGHT_NO_REASON], 0.90),
        ("correct, searched, bad format", [TXT, RIGHT_NO_REASON], 0.81),
        ("correct, searched, bad shape", [TXT, TXT, RIGHT], 0.81),
        ("wrong, format ok", [WRONG], 0.10),
        ("wrong, searched, format ok", [IMG, TXT, WRONG], 0.10),
        ("wrong, bad format", ["<answer>Victor Hugo</answer>"], 0.0),
        ("warning, no answer", [IMG, TXT, "Unable to answer due to lack of relevant information"], 0),
        ("truncated search, no answer", [IMG, TXT], 0.0),
        ("right answer in a turn that searched on, none last", [ANSWERED_THEN_SEARCHED, TXT], 0.0),
        ("no turns", [], 0.0),
    ],
)
def test_reward_table(case: str, turns: list[str], expected: float) -> None:
    assert mmsearch_r1_reward(turns, GT) == pytest.approx(expected), case


def test_answer_is_read_from_the_last_turn_only() -> None:
    early = "<reason>r</reason><answer>Gustave Eiffel</answer>"
    assert mmsearch_r1_reward([early, WRONG], GT) == 0.0  # [answer, answer] is also bad format


def test_candidate_answers_as_json_string_or_sequence() -> None:
    turns = ["<reason>r</reason><answer>Eiffel</answer>"]
    assert mmsearch_r1_reward(turns, GT, '["Alexandre Gustave Eiffel", "Eiffel"]') == 1.0
    assert mmsearch_r1_reward(turns, GT, ("Eiffel",)) == 1.0
    assert mmsearch_r1_reward(turns, GT, "[]") == pytest.approx(0.1)
    assert mmsearch_r1_reward(turns, GT) == pytest.approx(0.1)


def test_per_search_penalty_and_custom_weights() -> None:
    turns = [IMG, TXT, RIGHT]
    assert mmsearch_r1_reward(turns, GT, per_search_penalty=True) == pytest.approx(0.9 * 0.81 + 0.1)
    assert mmsearch_r1_reward(turns, GT, search_penalty=0.0) == pytest.approx(1.0)
    assert mmsearch_r1_reward(turns, GT, format_weight=0.0) == pytest.approx(0.9)
    assert mmsearch_r1_reward([WRONG], GT, format_weight=0.5) == pytest.approx(0.5)


def test_subem_mode() -> None:
    turns = ["<reason>r</reason><answer>The engineer Gustave Eiffel.</answer>"]
    assert mmsearch_r1_reward(turns, GT, mode="EM") == pytest.approx(0.1)
    assert mmsearch_r1_reward(turns, GT, mode="SubEM") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown reward mode"):
        mmsearch_r1_reward(turns, GT, mode="F1")  # type: ignore[arg-type]


def test_garbage_output_gives_zero_without_raising() -> None:
    rng = random.Random(0)
    for _ in range(50):
        garbage = rng.randbytes(rng.randrange(0, 400)).decode("utf-8", errors="replace")
        turns = [garbage, garbage + "</answer>"]
        assert not format_ok(turns)
        assert mmsearch_r1_reward(turns, GT) == 0.0
        assert isinstance(parse_action(garbage), Answer | ImageSearch | TextSearch | Invalid)


# ---------------------------------------------------------------------------------------------------
# the Reward class


def _trajectory(*texts: str) -> Trajectory:
    turns = [Turn(text=t, action=parse_action(t), span=(0, 0)) for t in texts]
    return Trajectory(
        sample_id="x",
        group_id=0,
        input_ids=[],
        loss_mask=[],
        logprobs=[],
        vision=[],
        prompt_len=0,
        turns=turns,
    )


def _sample(ground_truth: str = GT, candidates: tuple[str, ...] = ()) -> Sample:
    return Sample(
        id="x",
        question="Who designed it?",
        image=None,
        ground_truth=ground_truth,
        candidate_answers=candidates,
    )


@pytest.mark.parametrize(
    ("texts", "reward", "details"),
    [
        ((RIGHT,), 1.0, {"correct": 1.0, "format": 1.0, "searched": 0.0}),
        ((IMG, RIGHT), 0.91, {"correct": 1.0, "format": 1.0, "searched": 1.0}),
        ((TXT, RIGHT_NO_REASON), 0.81, {"correct": 1.0, "format": 0.0, "searched": 1.0}),
        ((IMG, TXT, WRONG), 0.1, {"correct": 0.0, "format": 1.0, "searched": 1.0}),
        ((ANSWERED_THEN_SEARCHED, TXT), 0.0, {"correct": 0.0, "format": 0.0, "searched": 1.0}),
        ((), 0.0, {"correct": 0.0, "format": 0.0, "searched": 0.0}),
    ],
)
def test_reward_class(texts: tuple[str, ...], reward: float, details: dict[str, float]) -> None:
    fn = MMSearchR1Reward()
    traj, sample = _trajectory(*texts), _sample()
    assert isinstance(fn, Reward)
    assert fn(traj, sample) == pytest.approx(reward)
    assert fn.details(traj, sample) == details


def test_reward_class_weights() -> None:
    """The class passes its own format weight and search penalty on: (1 - 0.5) * 0.8 + 0.5 and 0 + 0.5."""
    fn = MMSearchR1Reward(format_weight=0.5, search_penalty=0.2)
    assert fn(_trajectory(IMG, RIGHT), _sample()) == pytest.approx(0.9)
    assert fn(_trajectory(WRONG), _sample()) == pytest.approx(0.5)


def test_reward_class_config_and_candidates() -> None:
    traj = _trajectory(IMG, TXT, "<reason>r</reason><answer>It was Gustave Eiffel</answer>")
    assert MMSearchR1Reward()(traj, _sample()) == pytest.approx(0.1)
    subem = MMSearchR1Reward(mode="SubEM", per_search_penalty=True, search_penalty=0.5)
    assert subem(traj, _sample()) == pytest.approx(0.9 * 0.25 + 0.1)
    assert subem.details(traj, _sample())["correct"] == 1.0
    alias = _trajectory("<reason>r</reason><answer>A. G. Eiffel</answer>")
    assert MMSearchR1Reward()(alias, _sample(candidates=("A G Eiffel",))) == 1.0
    with pytest.raises(ValueError, match="unknown reward mode"):
        MMSearchR1Reward(mode="exact")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# WeightedRewards


class _Const:
    def __init__(self, value: float) -> None:
        self.value = value

    def __call__(self, trajectory: Trajectory, sample: Sample) -> float:
        return self.value


def test_weighted_rewards() -> None:
    traj, sample = _trajectory(IMG, RIGHT), _sample()
    combined = WeightedRewards([MMSearchR1Reward(), _Const(2.0)], [1.0, 0.5])
    assert combined(traj, sample) == pytest.approx(0.91 + 1.0)
    assert WeightedRewards([_Const(1.0), _Const(2.0)])(traj, sample) == pytest.approx(3.0)
    assert WeightedRewards([])(traj, sample) == 0.0
    assert isinstance(combined, Reward)


def test_weighted_rewards_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        WeightedRewards([_Const(1.0), _Const(2.0)], [1.0])


def test_an_episode_without_turns_earns_nothing_even_judged_correct():
    """A judge (or a custom correctness) may call an empty episode right: no turn is no answer and no format."""
    from mmsr.reward.mmsearch_r1 import shaped_reward

    assert shaped_reward([], True) == 0.0 and shaped_reward([], True, format_weight=0.0) == 0.0
    assert shaped_reward(["<reason>r</reason><answer>x</answer>"], True) == 1.0
