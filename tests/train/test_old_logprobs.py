"""``old_logprobs="engine"``: the PPO ratio's denominator is the log-prob the engine sampled each token
with, so a step of several updates needs no scoring pass over its rollouts."""

import copy

import pytest
import torch

from mmsr.rollout.engine import ScriptedEngine
from mmsr.rollout.hf_engine import HFEngine
from tests.test_module import Gradients, fit_one_step, make_module, script


@pytest.fixture(scope="module")
def sample(fvqa_samples):
    return next(s for s in fvqa_samples if s.ground_truth == "musketeers")


def count_scoring_passes(module) -> list[int]:
    """Wraps ``module.policy_update.score``; the returned list grows by one per call."""
    calls, score = [], module.policy_update.score
    module.policy_update.score = lambda *a, **kw: calls.append(1) or score(*a, **kw)
    return calls


def test_engine_logprobs_skip_the_scoring_pass_and_give_the_same_updates(sample):
    """With a real HFEngine on the policy, the engine's log-probs are the trainer's (to ~1e-6 on CPU), so
    both denominators give the same two updates; only ``recompute`` scores the rollouts first."""
    modules = [make_module(engine=HFEngine(seed=0), mini_batches=2, old_logprobs=mode) for mode in ("recompute", "engine")]
    modules[1].model.load_state_dict(modules[0].model.state_dict())
    grads = [Gradients(), Gradients()]
    passes = [count_scoring_passes(m) for m in modules]
    for module, g in zip(modules, grads):
        fit_one_step(module, [sample], max_steps=2, callbacks=[g])  # 2 updates = one training step
    recompute, engine = (m.last_rollout.trajectories for m in modules)
    assert [t.input_ids for t in recompute] == [t.input_ids for t in engine]  # the same rollouts
    assert sum(t.num_sampled_tokens for t in engine) > 20
    assert (len(passes[0]), len(passes[1])) == (1, 0)
    assert len(grads[0].steps) == len(grads[1].steps) == 2
    for a, b in zip(grads[0].steps, grads[1].steps):
        assert a.keys() == b.keys() and len(a) > 10
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-3, msg=name)


def test_the_ratio_is_taken_against_the_engine_logprobs(sample):
    """A scripted engine reports -1.0 for every token, so the first update's ratio of a sampled token is
    exp(trainer log-prob + 1), averaged over the step's sampled tokens (``train/ratio_mean``)."""
    module = make_module(engine=ScriptedEngine(script, logprob=-1.0), old_logprobs="engine")
    initial = copy.deepcopy(module.model.state_dict())
    fit_one_step(module, [sample])
    trajs = module.last_rollout.trajectories
    module.model.load_state_dict(initial)
    scores = module.score(trajs, module.model)
    sampled = torch.cat([lp[torch.tensor(t.loss_mask[1:], dtype=torch.bool)] for lp, t in zip(scores, trajs)])
    assert len(sampled) > 10
    expected = (sampled + 1.0).exp().mean()
    assert module.trainer.callback_metrics["train/ratio_mean"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert module.trainer.callback_metrics["train/ratio_mean"].item() != pytest.approx(1.0, abs=1e-2)


def test_engine_logprobs_refuse_truncated_sampling_and_is_correction():
    with pytest.raises(ValueError, match="top_p=1 and top_k=0"):
        make_module(old_logprobs="engine", top_p=0.9)
    with pytest.raises(ValueError, match="top_p=1 and top_k=0"):
        make_module(old_logprobs="engine", top_k=5)
    with pytest.raises(ValueError, match="is_correction must be 'none'"):
        make_module(old_logprobs="engine", is_correction="truncate")
