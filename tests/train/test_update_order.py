"""The scores an update reads back by episode land on their own episode's row, and the clip range is the one
asked for (``mmsr.train.update``).

``pack_by_tokens`` orders a micro-batch's rows longest first, so ``TrainBatch.index`` is rarely sorted: the old
policy's and the reference's log-probs (``pad_rows``) must follow it, or each row's PPO ratio and KL are taken
against another episode's tokens. DAPO's clip-higher keeps ``clip_low`` below 1 and ``clip_high`` above it; both
swapped, the update still runs and logs a clip fraction. The episodes are a tiny Qwen2.5-VL's 4 scripted
episodes of one question (lengths 435, 432, 638, 431)."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from mmsr.reference import ReferenceModel
from mmsr.train.batch import TrainBatch
from mmsr.train.update import Backprop, PolicyUpdate, UpdateSettings, pad_rows
from tests.test_module import make_module
from tests.train.test_update_metrics import KeepGradients
from tests.train.test_update_terms import ADV, BASE, sample  # noqa: F401 - fixture

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def rollout(sample):
    """The policy and its 4 episodes of ``sample``."""
    module = make_module()
    module.start_engine()
    return module.policy, module.loop.run([sample], 4, module.sampling)


def update(policy, trajs, adv, ref=None, **settings) -> dict[str, float]:
    """``PolicyUpdate.update`` of ``trajs``; the optimizer changes nothing (every update stays on-policy)."""
    step = Backprop(policy.model, KeepGradients(policy.model.parameters()), torch.Tensor.backward, CPU, 1)
    return PolicyUpdate(policy, UpdateSettings(**BASE | settings)).update(trajs, adv, ref, step)


def test_pad_rows_gives_each_row_its_own_episodes_scores():
    """A micro-batch of episodes 2 then 0 (longest first is not index order): row 0 gets episode 2's scores, row 1
    episode 0's, each zero-padded to the width; episode 1 is in another micro-batch."""
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([9.0]), torch.tensor([4.0, 5.0])]
    batch = TrainBatch(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4),
                       position_ids=torch.zeros(2, 4, dtype=torch.long), loss_mask=torch.ones(2, 3),
                       engine_logprobs=torch.full((2, 3), -1.0), vision=[], index=torch.tensor([2, 0]))  # fmt: skip
    assert torch.equal(pad_rows(scores, batch), torch.tensor([[4.0, 5.0, 0.0], [1.0, 2.0, 3.0]]))


def test_old_and_reference_logprobs_follow_the_micro_batch_order(rollout):
    """The episodes shortest first, so every micro-batch runs them in reverse order (its index unsorted); 2
    mini-batches score the old policy first. Nothing changes the policy and the reference is a copy of it, so
    every ratio is 1 and the KL 0 when each row is scored against its own episode (a row read against another
    episode's log-probs has a ratio far from 1)."""
    policy, trajs = rollout
    order = sorted(range(4), key=lambda i: len(trajs[i]))  # [3, 1, 0, 2]: 431, 432, 435, 638 tokens
    shortest_first = [trajs[i] for i in order]
    packer = PolicyUpdate(policy, UpdateSettings(**BASE))
    # the first mini-batch's one micro-batch: positions 1 then 0 of its part (longest first), an unsorted index
    assert packer.micro_batches(shortest_first, [0, 1], policy.model, CPU) == [[1, 0]]
    reference = ReferenceModel(copy.deepcopy(policy.model).eval().requires_grad_(False), CPU)
    metrics = update(policy, shortest_first, ADV[order], reference, mini_batches=2, kl_coef=0.5)
    assert metrics["train/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["train/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["train/kl"] == pytest.approx(0.0, abs=1e-6)


def with_ratios(policy, trajs, ratios: list[float]):
    """``trajs`` with engine log-probs set so each sampled token of episode i has PPO ratio ``ratios[i]`` against the
    policy (``old_logprobs='engine'``): its log-prob under the policy, less log ratio."""
    scores = PolicyUpdate(policy, UpdateSettings(**BASE)).score(trajs, policy.model, CPU)
    out = []
    for t, lp, r in zip(trajs, scores, ratios):
        engine = [0.0] + [float(v) - math.log(r) if m else 0.0 for v, m in zip(lp, t.loss_mask[1:])]
        out.append(replace(t, logprobs=engine))
    return out


def test_clip_higher_clips_each_side_at_its_own_bound(rollout):
    """clip_low 0.1, clip_high 0.5: r in [0.9, 1.5]. The positive-advantage episodes' tokens have ratio 1.3 (inside
    1 + clip_high, outside 1 + clip_low), the negative ones' 0.7 (outside 1 - clip_low, inside 1 - clip_high). Only
    the latter clip, at 0.9: the token loss is -A * 1.3 where A > 0 and -A * 0.9 where A < 0, the token-mean taken
    over the 49 sampled tokens (12, 9, 20, 8). With the bounds swapped the A > 0 tokens clip (at 1.1) instead."""
    policy, trajs = rollout
    tokens = [t.num_sampled_tokens for t in trajs]
    trajs = with_ratios(policy, trajs, [1.3 if a > 0 else 0.7 for a in ADV.tolist()])
    metrics = update(policy, trajs, ADV, old_logprobs="engine", clip_low=0.1, clip_high=0.5)
    token_loss = [-a * (1.3 if a > 0 else 0.9) for a in ADV.tolist()]
    want_loss = sum(n * x for n, x in zip(tokens, token_loss)) / sum(tokens)
    want_clip = sum(n for n, a in zip(tokens, ADV.tolist()) if a < 0) / sum(tokens)
    assert want_clip == pytest.approx(17 / 49)
    assert metrics["train/clip_frac"] == pytest.approx(want_clip, rel=1e-6)
    assert metrics["train/policy_loss"] == pytest.approx(want_loss, rel=1e-4)
    assert metrics["train/ratio_max"] == pytest.approx(1.3, rel=1e-4)
