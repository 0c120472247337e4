"""``mmsr eval --ckpt`` of a run whose module overrides ``compute_rewards`` (the README's batch-level reward) scores
the ``reward`` column with that override, over one evaluation batch's episodes as over a training step's: it scored
them with the module's ``reward`` alone, the override ignored."""

from __future__ import annotations

import pytest
import torch

from mmsr.module import GRPOModule
from tests.eval.test_cli import TINY, TOOLS, _checkpointed, scripted_evaluation


class BonusModule(GRPOModule):
    """The base rewards (the run's reward) plus ``bonus``, plus 10 per episode before it in the batch."""

    def __init__(self, *args, bonus: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bonus = bonus

    def compute_rewards(self, trajectories, samples) -> torch.Tensor:
        return super().compute_rewards(trajectories, samples) + self.bonus + 10.0 * torch.arange(len(trajectories))


def test_a_checkpoints_compute_rewards_override_scores_the_reward_column(tmp_path):
    init = {"policy": TINY, **TOOLS, "num_generations": 2, "kl_coef": 0.001, "bonus": 100.0,
            "rollout": {"max_rounds": 2, "max_tokens_per_turn": 5, "max_context_tokens": 1500}}  # fmt: skip
    ckpt, _ = _checkpointed(tmp_path, {"class_path": f"{__name__}.BonusModule", "init_args": init})
    evaluator, rewards = scripted_evaluation(ckpt)
    # MMSearchR1Reward(): 0.91 (right after a search), 0.1 (EM fails, format kept); the override's bonus and rank
    assert rewards == pytest.approx([100.91, 110.1])
    assert type(evaluator.reward.module) is BonusModule  # ``mmsr.eval.load.RunRewards``
