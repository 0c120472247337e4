"""``loss_agg: seq-mean-*`` averages over the episodes that sampled something: an episode whose prompt already
filled the context (no sampled token) weighs nothing, whichever micro-batch it lands in."""

import pytest
import torch

from mmsr.algo import group_advantages
from mmsr.train.update import Backprop
from tests.test_module import make_module


@pytest.fixture(scope="module")
def sample(fvqa_samples):
    return [s for s in fvqa_samples if s.ground_truth == "musketeers"][0]


class KeepGradients:
    """An optimizer that only keeps the gradients it is asked to step with."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def zero_grad(self, set_to_none=False):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads = torch.cat([p.grad.flatten() for p in self.params if p.grad is not None])


def update_gradients(sample, agg: str, budget: int, keep: list[int]) -> torch.Tensor:
    """The gradient of one update over episodes ``keep`` of a 4-episode group whose last episode sampled nothing."""
    module = make_module(loss_agg=agg, micro_batch_tokens=budget, share_prefix=False, grad_clip=1e9)
    module.start_engine()
    trajs = module.loop.run([sample], 4, module.sampling)
    empty = trajs[3]
    cut = empty.prompt_len  # as an episode whose prompt already filled the context: it ends before a turn
    empty.input_ids, empty.loss_mask, empty.logprobs, empty.turns = empty.input_ids[:cut], empty.loss_mask[:cut], empty.logprobs[:cut], []
    advantages = group_advantages(torch.tensor([1.0, 0.1, 0.91, 0.0]), torch.zeros(4, dtype=torch.long))
    opt = KeepGradients(module.model.parameters())
    step = Backprop(module.model, opt, torch.Tensor.backward, torch.device("cpu"), 1)
    module.policy_update.update([trajs[i] for i in keep], advantages[keep], None, step)
    return opt.grads


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_an_episode_without_sampled_tokens_weighs_nothing(sample, agg):
    with_empty = [update_gradients(sample, agg, budget, [0, 1, 2, 3]) for budget in (1, 100_000)]  # 1: one episode a pass
    without = update_gradients(sample, agg, 100_000, [0, 1, 2])
    for grads in with_empty:
        torch.testing.assert_close(grads, without, rtol=1e-5, atol=1e-6)  # before: 0.05 apart
