"""The trainer scores ``logits / temperature``: at a sampling temperature other than 1 its log-probs of a real
HFEngine's rollout are the engine's, so the update's engine/trainer mismatch stays at float noise."""

from dataclasses import replace

import pytest
import torch

from mmsr.rollout.hf_engine import HFEngine
from mmsr.rollout.loop import RolloutSettings
from mmsr.train.update import PolicyUpdate
from tests.test_module import fit_one_step, make_module


@pytest.fixture(scope="module")
def sample(fvqa_samples):
    return next(s for s in fvqa_samples if s.ground_truth == "musketeers")


def hot_module():
    """A policy sampling at T = 0.7 with a real engine: 2 episodes of one 16-token turn each (a second or so)."""
    return make_module(engine=HFEngine(seed=0), temperature=0.7, num_generations=2,
                       rollout=RolloutSettings(max_tokens_per_turn=16))  # fmt: skip


def sampled_gap(trajs, scores) -> torch.Tensor:
    """The largest |trainer - engine| log-prob over the sampled tokens (``scores[i]``: ``[len_i - 1]``)."""
    masks = [torch.tensor(t.loss_mask[1:], dtype=torch.bool) for t in trajs]
    gaps = [(lp - torch.tensor(t.logprobs[1:]))[m] for t, lp, m in zip(trajs, scores, masks)]
    return torch.cat(gaps).abs().max()


def test_the_trainer_scores_at_the_sampling_temperature(sample):
    """At T = 0.7 the trainer's log-probs of the sampled tokens are the engine's (~1e-6 on CPU); at T = 1 they
    are another distribution's, off by far more (so the check can tell the two apart)."""
    module = hot_module()
    module.start_engine()
    trajs = module.loop.run([sample], 2, module.sampling)
    assert sum(t.num_sampled_tokens for t in trajs) >= 30
    assert sampled_gap(trajs, module.score(trajs, module.model)) < 1e-4
    at_one = PolicyUpdate(module.policy, replace(module.policy_update.settings, temperature=1.0))
    assert sampled_gap(trajs, at_one.score(trajs, module.model, torch.device("cpu"))) > 1e-2


def test_the_update_s_mismatch_metric_is_float_noise_at_temperature_0_7(sample):
    module = hot_module()
    trainer = fit_one_step(module, [sample])
    assert sum(t.num_sampled_tokens for t in module.last_rollout.trajectories) >= 30
    assert trainer.callback_metrics["train/mismatch_max_abs_diff"].item() < 1e-4
