"""What an update logs and how many optimizer steps it makes when some episodes sampled nothing (their prompt
filled the context): the token-mean diagnostics (entropy, ratio, clip fraction, mismatch) are means over the
sampled tokens whatever ``loss_agg`` and the micro-batch cut, their maxima the largest, and every mini-batch
makes its optimizer step."""

from dataclasses import replace

import pytest
import torch

from mmsr.train.update import Backprop, PolicyUpdate, UpdateSettings
from tests.test_module import make_module

DIAGNOSTICS = ("train/ratio_mean", "train/entropy", "train/clip_frac", "train/mismatch_kl", "train/mismatch_ratio_mean")


class KeepGradients:
    """An optimizer that changes nothing (every update stays on-policy: PPO ratio 1) and keeps each step's
    gradients, zeros where a parameter has none."""

    def __init__(self, params):
        self.params, self.steps = list(params), []

    def zero_grad(self, set_to_none=False):
        for p in self.params:
            p.grad = None

    def step(self):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.steps.append(torch.cat([g.flatten() for g in grads]))


def emptied(traj):
    """``traj`` as if its prompt had filled the context: it ends before a turn, with the question's image only."""
    cut = traj.prompt_len
    return replace(traj, input_ids=traj.input_ids[:cut], loss_mask=traj.loss_mask[:cut], logprobs=traj.logprobs[:cut],
                   turns=[], vision=traj.vision[:1])  # fmt: skip


@pytest.fixture(scope="module")
def rollout(fvqa_samples):
    """A module's policy and 8 episodes of 2 questions; the second question's 4 sampled nothing."""
    module = make_module()
    module.start_engine()
    trajs = module.loop.run(fvqa_samples[:2], 4, module.sampling)
    return module.policy, trajs[:4] + [emptied(t) for t in trajs[4:]]


def update(rollout, episodes: list[int], world_size: int = 1, **settings) -> tuple[dict[str, float], KeepGradients]:
    policy, trajs = rollout
    opt = KeepGradients(policy.model.parameters())
    settings = UpdateSettings(**{"kl_coef": 0.0, "share_prefix": False, "grad_clip": 1e9} | settings)
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.8, 0.0, 0.0, 0.0, 0.0])[episodes]
    step = Backprop(policy.model, opt, torch.Tensor.backward, torch.device("cpu"), world_size)
    return PolicyUpdate(policy, settings).update([trajs[i] for i in episodes], advantages, None, step), opt


EPISODES = [0, 1, 2, 4]  # one that sampled nothing among them


@pytest.fixture(scope="module")
def token_mean(rollout):
    metrics, _ = update(rollout, EPISODES, loss_agg="token-mean")
    assert metrics["train/ratio_mean"] == pytest.approx(1.0)  # on-policy
    return metrics


@pytest.mark.parametrize("budget", [1, 100_000])  # 1: one episode a micro-batch
@pytest.mark.parametrize("agg", ["seq-mean-token-sum-norm", "seq-mean-token-mean"])
def test_token_diagnostics_do_not_depend_on_loss_agg_or_the_cut(rollout, token_mean, agg, budget):
    metrics, _ = update(rollout, EPISODES, loss_agg=agg, micro_batch_tokens=budget)
    for k in DIAGNOSTICS:  # before: ratio_mean 0.75 (sum-norm, one episode a pass); mismatch_kl 1e-3 off
        assert metrics[k] == pytest.approx(token_mean[k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_token_diagnostics_weigh_this_ranks_tokens_by_every_ranks(rollout, agg, monkeypatch):
    """Under a ``seq-mean-*`` loss_agg the token-weighted metrics still weigh each rank's tokens by the tokens of
    every rank: a second rank rolled out episodes 3 and 5 (one sampled, one not). The PPO ratio is 1 at every token,
    so this rank logs 2 x its share of the two ranks' tokens, and Lightning's mean over the ranks is 1 (its own
    tokens times the world size, as if each rank sampled as many, read 1 here)."""
    policy, trajs = rollout
    other = [3, 5]
    sums = {}  # what each of this rank's sums over the ranks reads: its value plus the other rank's
    for agg_of in (agg, "token-mean"):
        count = PolicyUpdate(policy, UpdateSettings(loss_agg=agg))._counter(trajs, agg_of)
        sums[float(count(EPISODES))] = float(count(EPISODES) + count(other))
    monkeypatch.setattr("mmsr.train.update.all_reduce", lambda value, op, device: sums[float(value)])
    metrics, _ = update(rollout, EPISODES, world_size=2, loss_agg=agg)
    mine, theirs = (sum(trajs[i].num_sampled_tokens for i in ids) for ids in (EPISODES, other))
    assert theirs > 0 and theirs != mine  # the other rank's tokens count, and not as this rank's again
    assert metrics["train/ratio_mean"] == pytest.approx(2 * mine / (mine + theirs), rel=1e-5)


@pytest.mark.parametrize("truncation", [dict(top_p=0.5), dict(top_k=3)])
def test_truncated_sampling_logs_no_mismatch(rollout, token_mean, truncation):
    """With top-p / top-k on, vLLM's log-probs are of the kept tokens renormalized, the trainer's of the whole
    distribution: their gap is the kept mass, not a mismatch (before: train/mismatch_ratio_mean read 0.50 with
    vLLM at top_p=0.5, tests/rollout/test_vllm_engine.py). The update itself is the same."""
    metrics, _ = update(rollout, EPISODES, loss_agg="token-mean", **truncation)
    assert {k for k in token_mean if k.startswith("train/mismatch_")}  # logged without truncation
    assert metrics == {k: v for k, v in token_mean.items() if not k.startswith("train/mismatch_")}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_a_mini_batch_that_sampled_nothing_still_steps(rollout, agg):
    metrics, opt = update(rollout, [0, 1, 4, 5], loss_agg=agg, mini_batches=2)  # the second part sampled nothing
    assert len(opt.steps) == 2  # as updates_per_step, which global_step and max_steps count (before: 1)
    assert opt.steps[0].abs().sum() > 0 and (opt.steps[1] == 0).all()
    assert metrics["train/ratio_mean"] == pytest.approx(1.0)  # the second update has no token to average: before 0.5
    assert metrics["train/grad_norm"] == pytest.approx(float(opt.steps[0].norm()) / 2, rel=1e-4)


def test_maxima_are_the_largest_over_micro_batches_and_updates(rollout):
    """The PPO ratio against the engine's log-probs (the scripted engine's, not the policy's) and the mismatch: their
    maxima over the step's tokens are those of one update of one micro-batch, whatever the cut (here 2 updates of
    one episode a micro-batch: a token-weighted mean of the micro-batches' maxima, then a mean over updates, read
    less). Both are pinned to the largest gap of the policy's log-probs to the engine's: equal values alone passed
    with the maximum zeroed."""
    whole, _ = update(rollout, EPISODES, old_logprobs="engine", micro_batch_tokens=100_000)
    cut, _ = update(rollout, EPISODES, old_logprobs="engine", micro_batch_tokens=1, mini_batches=2)
    policy, trajs = rollout
    scored = PolicyUpdate(policy, UpdateSettings(kl_coef=0.0)).score(trajs, policy.model, torch.device("cpu"), EPISODES)
    gaps = torch.cat([(scored[i] - torch.tensor(trajs[i].logprobs[1:]))[torch.tensor(trajs[i].loss_mask[1:]) == 1]
                      for i in EPISODES])  # fmt: skip
    want = {"train/ratio_max": float(gaps.max().exp()), "train/mismatch_max_abs_diff": float(gaps.abs().max())}
    assert want["train/mismatch_max_abs_diff"] > 1  # the scripted engine's -1 against a random policy's ~-6
    for k in ("train/ratio_max", "train/mismatch_max_abs_diff"):
        assert cut[k] == pytest.approx(want[k], rel=1e-5) and whole[k] == pytest.approx(want[k], rel=1e-5), k


def test_the_dual_clip_reaches_the_loss(rollout):
    """``clip_ratio_c`` goes from the settings to ``policy_loss``. Against engine log-probs 10 nats below the
    policy's, every sampled token's ratio is far above 3 (e^10 times ~0.005, the scripted engine's gap): the
    episodes with A > 0 are clipped at 1.2, those with A < 0 capped at -3A by the dual-clip, so no token has a
    gradient; without it the A < 0 tokens pull with -A*r (veRL's ``clip_ratio_c`` default is 3)."""
    policy, trajs = rollout
    lowered = [replace(t, logprobs=[lp - 10.0 if m else lp for lp, m in zip(t.logprobs, t.loss_mask)]) for t in trajs]
    n0, n1, n2 = (lowered[i].num_sampled_tokens for i in EPISODES[:3])  # advantages 1.0, -0.5, 0.3
    capped, opt = update((policy, lowered), EPISODES, old_logprobs="engine", clip_ratio_c=3.0)
    assert capped["train/ratio_mean"] > 3 and capped["train/dual_clip_frac"] == pytest.approx(n1 / (n0 + n1 + n2))
    expected = (0.5 * 3 * n1 - 1.2 * (1.0 * n0 + 0.3 * n2)) / (n0 + n1 + n2)
    assert capped["train/policy_loss"] == pytest.approx(expected, rel=1e-5)
    assert capped["train/grad_norm"] == 0 and (opt.steps[0] == 0).all()
    plain, opt = update((policy, lowered), EPISODES, old_logprobs="engine")
    assert "train/dual_clip_frac" not in plain and plain["train/policy_loss"] > expected
    assert plain["train/grad_norm"] > 0 and opt.steps[0].abs().sum() > 0


def test_each_ranks_gradient_is_scaled_by_the_world_size(rollout, monkeypatch):
    """DDP and FSDP2 average the ranks' gradients, so a rank's share of the loss is its tokens over every rank's
    times the world size. A second rank with as many tokens as this one: this rank's gradient is the one-rank
    gradient x 2 x 1/2, the one-rank gradient (without the world size, half of it: ``grad_clip`` caps too little
    and ``train/grad_norm`` logs half)."""
    _, one = update(rollout, EPISODES, loss_agg="token-mean")
    monkeypatch.setattr("mmsr.train.update.all_reduce", lambda value, op, device: 2 * value)  # the other rank alike
    _, two = update(rollout, EPISODES, world_size=2, loss_agg="token-mean")
    assert one.steps[0].abs().max() > 0
    torch.testing.assert_close(two.steps[0], one.steps[0], rtol=1e-5, atol=1e-8)
