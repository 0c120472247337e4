"""``skip_zero_advantage``: episodes whose advantage is 0 (a group whose samples all got one reward) are
left out of the update's passes; without a KL or entropy term that changes nothing but the compute."""

import pytest
import torch

from mmsr.rollout.engine import ScriptedEngine
from tests.test_module import (
    WRONG,
    Gradients,
    assert_same_gradients,
    fit_one_step,
    make_module,
    script,
)


@pytest.fixture(scope="module")
def samples(fvqa_samples):
    """A prompt whose 4 episodes get 4 rewards, and one whose episodes all answer alike (advantage 0)."""
    mixed = next(s for s in fvqa_samples if s.ground_truth == "musketeers")
    return [mixed, next(s for s in fvqa_samples if s.id != mixed.id)]


def alike_for(sample_id: str):
    """``script``, except that every episode of ``sample_id`` answers the same wrong answer."""
    return lambda request: WRONG if request.key.startswith(f"{sample_id}#") else script(request)


def rows_run(module) -> list[int]:
    """Wraps the update's loss; the returned list gets each micro-batch's row count."""
    rows, loss = [], module.policy_update.loss
    module.policy_update.loss = lambda batch, *a: rows.append(batch.input_ids.shape[0]) or loss(batch, *a)
    return rows


def test_skipping_runs_half_the_episodes_for_the_same_update(samples):
    modules = [make_module(engine=ScriptedEngine(alike_for(samples[1].id)), skip_zero_advantage=skip) for skip in (False, True)]
    modules[1].model.load_state_dict(modules[0].model.state_dict())
    grads, rows = [Gradients(), Gradients()], [rows_run(m) for m in modules]
    trainers = [fit_one_step(m, samples, callbacks=[g]) for m, g in zip(modules, grads)]
    advantages = modules[1].last_rollout.advantages
    assert (advantages[4:] == 0).all() and (advantages[:4] != 0).all()  # the second group teaches nothing
    assert (sum(rows[0]), sum(rows[1])) == (8, 4)
    assert any(g.abs().sum() > 0 for g in grads[0].steps[0].values())
    assert_same_gradients(*grads)
    metrics = [t.callback_metrics for t in trainers]
    assert metrics[1]["train/episodes_run"].item() == 0.5 and "train/episodes_run" not in metrics[0]
    assert metrics[0]["reward/zero_std_groups"].item() == metrics[1]["reward/zero_std_groups"].item() == 0.5


def test_a_step_with_nothing_to_learn_still_steps_on_zero_gradients(samples):
    module = make_module(engine=ScriptedEngine(lambda request: WRONG), skip_zero_advantage=True)
    grads, rows = Gradients(), rows_run(module)
    trainer = fit_one_step(module, samples, callbacks=[grads])
    assert rows == [1] and trainer.callback_metrics["train/episodes_run"].item() == 1 / 8
    (step,) = grads.steps
    assert len(step) > 10 and all((g == 0).all() for g in step.values())


def test_skipping_is_refused_where_the_episodes_carry_a_loss():
    with pytest.raises(ValueError, match="kl_coef=0 and entropy_coef=0"):
        make_module(skip_zero_advantage=True, kl_coef=0.001)
    with pytest.raises(ValueError, match="kl_coef=0 and entropy_coef=0"):
        make_module(skip_zero_advantage=True, entropy_coef=0.01)


def test_the_scoring_pass_before_several_updates_skips_them_too(samples):
    """Two updates a step score the rollouts first (``old_logprobs: recompute``): only the episodes that
    will run are scored, and both updates are as without skipping."""
    modules = [make_module(engine=ScriptedEngine(alike_for(samples[1].id)), mini_batches=2, skip_zero_advantage=skip)
               for skip in (False, True)]  # fmt: skip
    modules[1].model.load_state_dict(modules[0].model.state_dict())
    grads, scored = [Gradients(), Gradients()], [[], []]
    for module, rows in zip(modules, scored):
        logprobs = module.policy_update.token_logprobs

        def counted(batch, *a, _logprobs=logprobs, _rows=rows, **kw):
            if not torch.is_grad_enabled():  # the scoring pass (the update's passes take gradients)
                _rows.append(batch.input_ids.shape[0])
            return _logprobs(batch, *a, **kw)

        module.policy_update.token_logprobs = counted
    for module, g in zip(modules, grads):
        fit_one_step(module, samples, max_steps=2, callbacks=[g])  # 2 updates = one training step
    advantages = modules[1].last_rollout.advantages
    assert (advantages[4:] == 0).all() and (advantages[:4] != 0).all()
    assert (sum(scored[0]), sum(scored[1])) == (8, 4 + 1)  # the second half keeps one episode to step on
    for a, b in zip(grads[0].steps, grads[1].steps, strict=True):
        assert a.keys() == b.keys() and len(a) > 10
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-7, rtol=1e-4, msg=name)
