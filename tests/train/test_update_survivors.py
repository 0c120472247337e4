"""Details of ``PolicyUpdate.update`` that a mutation audit of ``mmsr/train`` found unchecked: which episodes and
advantages the loss sees when zero-advantage episodes are skipped (or not), the old log-probs the PPO ratio of a
later update is taken against, the global step each update reports, and the packed micro-batch budget at its edge."""

from dataclasses import replace

import pytest
import torch

from mmsr.train.batch import collate, sampled_logprobs
from mmsr.train.update import Backprop, PolicyUpdate, UpdateSettings
from tests.test_module import make_module
from tests.train.test_packed import pack_rows_size
from tests.train.test_prefix import GROUPS, rollouts
from tests.train.test_update_metrics import KeepGradients

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def episodes(fvqa_samples):
    """A module's policy and the 4 scripted episodes of one question."""
    module = make_module()
    module.start_engine()
    return module.policy, module.loop.run(fvqa_samples[:1], 4, module.sampling)


def advantages_seen(update: PolicyUpdate) -> list[float]:
    """Wraps ``update.loss``; the returned list gets the advantage of every row each micro-batch trains on."""
    seen, loss = [], update.loss
    update.loss = lambda batch, adv, *a: seen.extend(adv.tolist()) or loss(batch, adv, *a)
    return seen


def run_update(policy, trajs, advantages, settings, opt=None, global_step=0):
    """A ``PolicyUpdate`` of ``policy`` and a call that runs its update of ``trajs`` (by default an optimizer that
    changes nothing, ``KeepGradients``)."""
    update = PolicyUpdate(policy, settings)
    opt = opt or KeepGradients(policy.model.parameters())
    step = Backprop(policy.model, opt, torch.Tensor.backward, CPU, 1, global_step=global_step)
    return update, lambda: update.update(trajs, advantages, None, step)


def test_skipping_trains_the_nonzero_episodes_even_after_a_zero_one(episodes):
    """Zero-advantage episodes 0 and 2 come before the non-zero 1 and 3 in the mini-batch: the loss must see
    episodes 1 and 3 with their advantages (positions of the micro-batch index the episodes run, not the part),
    else the update trains a skipped episode with advantage 0 and drops one that teaches."""
    policy, trajs = episodes
    settings = UpdateSettings(kl_coef=0.0, share_prefix=False, skip_zero_advantage=True)
    update, go = run_update(policy, trajs, torch.tensor([0.0, 1.0, 0.0, -0.5]), settings)
    seen = advantages_seen(update)
    metrics = go()
    assert sorted(seen) == [-0.5, 1.0]
    assert metrics["train/episodes_run"] == 0.5


def test_without_skipping_zero_advantage_episodes_carry_their_entropy_term(episodes):
    """With an entropy (or KL) term a zero-advantage episode still has a loss and a gradient, so with
    ``skip_zero_advantage`` off every episode runs, whatever its advantage."""
    policy, trajs = episodes
    settings = UpdateSettings(kl_coef=0.0, entropy_coef=0.01, share_prefix=False)
    update, go = run_update(policy, trajs, torch.tensor([1.0, 0.0, 0.0, 0.0]), settings)
    seen = advantages_seen(update)
    go()
    assert sorted(seen) == [0.0, 0.0, 0.0, 1.0]


def test_a_later_update_takes_its_ratio_against_the_log_probs_before_the_first(episodes):
    """Two PPO epochs: the first update moves the policy (SGD, a large step), so the second's ratio of the
    current to the scored old log-probs is no longer 1. Taken against the current log-probs (detached), every
    update would be on-policy: ratio 1, nothing clipped, PPO's trust region gone."""
    policy, trajs = episodes
    model = make_module().model  # a fresh copy of the same initial weights: the fixture's policy stays as it is
    model.load_state_dict(policy.model.state_dict())
    own = replace(policy, model=model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    settings = UpdateSettings(kl_coef=0.0, share_prefix=False, ppo_epochs=2)
    _, go = run_update(own, trajs, torch.tensor([1.0, -0.5, 0.3, -0.8]), settings, opt=opt)
    metrics = go()
    assert metrics["train/ratio_max"] > 1.01
    assert metrics["train/clip_frac"] > 0


def test_each_update_reports_its_own_global_step(episodes):
    """2 epochs x 2 mini-batches from global step 7 are updates 7, 8, 9, 10: the step a non-finite gradient
    warning (and the stop after five in a row) names."""
    policy, trajs = episodes
    settings = UpdateSettings(kl_coef=0.0, share_prefix=False, ppo_epochs=2, mini_batches=2)
    update, go = run_update(policy, trajs, torch.tensor([1.0, -0.5, 0.3, -0.8]), settings, global_step=7)
    at, guard = [], update.nonfinite.step
    update.nonfinite.step = lambda opt, norm, step: at.append(step) or guard(opt, norm, step)
    go()
    assert at == [7, 8, 9, 10]


def test_packed_micro_batches_stay_within_the_budget_at_its_edge(tiny_policy, fvqa_samples):
    """A group's packed row shares its prompt but the last token (whose logits score the first sampled one), so
    it holds ``pack_rows_size`` tokens: a budget one or two tokens short must split the group, or its forward
    holds more than ``micro_batch_tokens`` (what ``mmsr plan`` bounds the dense mask by)."""
    trajs = rollouts(tiny_policy, fvqa_samples[:2], GROUPS, 3)
    update, sizes = PolicyUpdate(tiny_policy, UpdateSettings(share_prefix=True)), []
    record = lambda m, a, kw: sizes.append(kw["input_ids"].shape)  # noqa: E731
    hook = tiny_policy.model.register_forward_pre_hook(record, with_kwargs=True)
    tiny_policy.model.gradient_checkpointing_enable()
    whole = []
    try:
        for group in (0, 1):
            size = pack_rows_size(trajs, group)
            rows = [i for i, t in enumerate(trajs) if t.group_id == group]
            for budget in (size - 2, size - 1, size):
                update.settings = replace(update.settings, micro_batch_tokens=budget)
                for micro in update.micro_batches(trajs, rows, tiny_policy.model, CPU):
                    batch = collate([trajs[rows[j]] for j in micro], range(len(micro)), tiny_policy, "cpu")
                    with torch.no_grad():
                        sampled_logprobs(tiny_policy, batch, share_prefix=True)
                    n, width = sizes.pop()
                    assert n * width <= budget or len(micro) == 1, (group, budget, micro, n, width)
                    whole.append((budget == size, len(micro), n))
    finally:
        tiny_policy.model.gradient_checkpointing_disable()
        hook.remove()
    assert (True, 3, 1) in whole  # at the budget itself a whole group runs as one packed row
