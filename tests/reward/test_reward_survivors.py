"""Pins six behaviours of ``mmsr.reward`` and ``mmsr.prompt`` that a mutation audit found no test held: each
test here fails on its mutant (named in its docstring) and states what a user would lose to it."""

from __future__ import annotations

import pytest

from mmsr.prompt.render import PromptBuilder
from mmsr.reward.base import WeightedRewards
from mmsr.reward.judge import JudgeInput, OpenAIJudge
from mmsr.reward.judged import JudgedReward
from mmsr.reward.mmsearch_r1 import MMSearchR1Reward
from mmsr.tools.base import ToolResult
from tests.eval.test_judge import FakeOpenAI
from tests.reward.test_judged import VERBOSE, VERBOSE_ANSWER, _judge
from tests.reward.test_mmsearch_r1 import GT, IMG, TXT, _sample, _trajectory


def test_em_details_call_a_padded_answer_wrong():
    """``MMSearchR1Reward.details`` matched with SubEM whatever the mode (mutant: ``self.mode`` -> "SubEM"): an
    EM run would log ``reward/accuracy`` 1 for "It was Gustave Eiffel", while its reward (0.1) called it wrong."""
    traj = _trajectory(IMG, TXT, f"<reason>r</reason><answer>It was {GT}</answer>")
    assert MMSearchR1Reward(mode="EM").details(traj, _sample())["correct"] == 0.0
    assert MMSearchR1Reward(mode="SubEM").details(traj, _sample())["correct"] == 1.0


def test_judged_reward_keeps_its_search_penalty_and_format_weight_apart():
    """``JudgedReward`` handed its table the two weights swapped (mutant): a judged-correct answer after one search
    would earn ``(1 - 0.3) * (1 - 0.2) + 0.3 = 0.86`` instead of ``(1 - 0.2) * (1 - 0.3) + 0.2 * 1 = 0.76``."""
    with FakeOpenAI() as server:  # says yes: the ground truth is in the verbose answer
        reward = JudgedReward(_judge(server), search_penalty=0.3, format_weight=0.2)
        assert reward.batch([_trajectory(IMG, VERBOSE)], [_sample()]) == pytest.approx([0.76])


def test_weighted_details_keep_the_first_rewards_correct():
    """``WeightedRewards.details`` let a later reward's shared term win (mutant: ``merged | _terms``): with a judge
    first, exact match's 0 would overwrite the judge's yes, and ``reward/accuracy`` would log EM, not the judge."""
    with FakeOpenAI() as server:
        weighted = WeightedRewards([JudgedReward(_judge(server)), MMSearchR1Reward()], [1.0, 0.0])
        traj = _trajectory(VERBOSE)
        weighted.batch([traj], [_sample()])
        details = weighted.details(traj, _sample())
    assert MMSearchR1Reward().details(traj, _sample())["correct"] == 0.0  # EM says no ...
    assert details == {"correct": 1.0, "format": 1.0, "searched": 0.0, "judge_failed": 0.0}  # ... the judge wins


def test_the_default_observation_restates_the_question():
    """``PromptBuilder()``'s ``repeat_question`` defaulted to False (mutant): the configs/mmsearch_r1 recipes,
    which rely on the default, would stop restating the question after results, as MMSearch-R1 does."""
    observation = PromptBuilder().observation_text(_sample(), "text_search", ToolResult(text="page"))
    assert observation.startswith("Searched results: <information>page</information>\n"
                                  "Original user's question: Who designed it?\n")  # fmt: skip


def test_a_failed_call_shows_only_its_failure_text():
    """A failed call's observation was framed as results (mutant: ``Searched results: <information>...``): the
    model would read the failure text as what the search found instead of answering on its own."""
    failed = ToolResult(text="The search failed: timeout.", ok=False)
    observation = PromptBuilder().observation_text(_sample(), "text_search", failed)
    assert observation == "<information>The search failed: timeout.</information>"


def test_a_base_url_with_a_trailing_slash_posts_to_chat_completions():
    """``OpenAIJudge`` kept a ``base_url``'s trailing slash (mutant: no ``rstrip("/")``): ``http://h/v1/`` would post
    to ``/v1//chat/completions``, which a server answers 404, and the judge would refuse to start."""
    assert OpenAIJudge("http://h/v1/", "judge-model").url == "http://h/v1/chat/completions"
    with FakeOpenAI() as server:
        judge = OpenAIJudge(f"http://127.0.0.1:{server.port}/v1/", "judge-model", api_key_env="MMSR_TEST_NO_KEY",
                            retries=0, timeout_s=10)  # fmt: skip
        (verdict,) = judge.judge([JudgeInput("Who designed it?", GT, (), VERBOSE_ANSWER)])
    assert verdict.correct is True and len(server.bodies) == 1
