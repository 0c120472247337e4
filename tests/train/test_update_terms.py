"""Each term of the GRPO update, worked by hand from the log-probs: the KL to the reference, the entropy bonus, the
importance-sampling correction of the engine/trainer mismatch, the mismatch maxima and the advantage estimator.

The updates run ``PolicyUpdate.update`` (``mmsr.train.update``) on a tiny Qwen2.5-VL's scripted episodes, whose
engine reports -1 for every sampled token; the optimizer keeps the gradient and changes nothing, so it is one
SGD step's parameter delta over -lr. The expected loss and gradient are written out token by token in the test
(``hand``): only the forward pass is shared with the code under test. The estimator runs through a Lightning step."""

import copy

import pytest
import torch

from mmsr.reference import ReferenceModel
from mmsr.train.batch import collate
from mmsr.train.update import Backprop, PolicyUpdate, UpdateSettings
from tests.test_module import fit_one_step, make_module
from tests.train.test_update_metrics import KeepGradients

ADV = torch.tensor([1.0, -0.5, 0.3, -0.8])  # the 4 episodes: right, wrong, search then right, garbage
BASE = dict(kl_coef=0.0, share_prefix=False, grad_clip=1e9, micro_batch_tokens=100_000)


@pytest.fixture(scope="module")
def sample(fvqa_samples):
    return next(s for s in fvqa_samples if s.ground_truth == "musketeers")


@pytest.fixture(scope="module")
def rollout(sample):
    """The policy, its 4 episodes and a reference: the policy with every weight moved (a KL well above 0)."""
    module = make_module()
    module.start_engine()
    trajs = module.loop.run([sample], 4, module.sampling)
    model = copy.deepcopy(module.model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.policy, trajs, ReferenceModel(model, "cpu")


def update(rollout, ref=False, **settings) -> tuple[dict[str, float], torch.Tensor]:
    """An update of the 4 episodes: its metrics and its first gradient (flat, 0 where a parameter has none)."""
    policy, trajs, reference = rollout
    opt = KeepGradients(policy.model.parameters())
    step = Backprop(policy.model, opt, torch.Tensor.backward, torch.device("cpu"), 1)
    updater = PolicyUpdate(policy, UpdateSettings(**BASE | settings))
    metrics = updater.update(trajs, ADV, reference if ref else None, step)
    return metrics, opt.steps[0]


def hand(rollout, terms, **settings) -> tuple[list[float], torch.Tensor | None]:
    """``terms(logp, entropy, engine_logp, ref_logp, adv, mask)`` (each ``[N, T-1]`` but ``adv`` ``[N, 1]``), a loss
    and metrics (0-dim tensors), and the loss's flat gradient (``None``: it has none), from one forward pass of the
    4 episodes scored as ``settings`` say (the temperature): none of the update's loss code runs."""
    policy, trajs, reference = rollout
    batch = collate(trajs, range(len(trajs)), policy, torch.device("cpu"))
    scorer = PolicyUpdate(policy, UpdateSettings(**BASE | settings))
    logp, entropy = scorer.token_logprobs(batch, policy.model, with_entropy=True)
    with torch.no_grad():
        ref_logp, _ = scorer.token_logprobs(batch, reference.model)
    values = terms(logp, entropy, batch.engine_logprobs, ref_logp, ADV[:, None], batch.loss_mask)
    if not values[0].requires_grad:  # metrics only
        return [float(v) for v in values], None
    params = list(policy.model.parameters())
    grads = torch.autograd.grad(values[0], params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return [float(v) for v in values], flat


def on_policy(logp, adv):
    """PPO's token loss at ratio 1: -A * r, with r = exp(logp - logp) (1, and d r = d logp)."""
    return -adv * torch.exp(logp - logp.detach())


def mean(x, mask):
    return (x * mask).sum() / mask.sum()


SEQ_MEANS = ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
MAX_LEN = 1024  # max_context_tokens, seq-mean-token-sum-norm's normalizer (above the 637 positions of the episodes)


def seq_mean(x, mask, agg):
    """``x`` ``[N, T]`` aggregated as ``loss_agg`` ``agg`` says, every episode having sampled tokens: the mean over
    episodes of each one's token mean, token sum or token sum / MAX_LEN. E.g. x [[1, 1, 1, 1], [3, 0, 0, 0]], mask
    [[1, 1, 1, 1], [1, 0, 0, 0]]: 2, 3.5 and 0.875 with MAX_LEN 4, where the token mean is 1.4."""
    sums, tokens = (x * mask).sum(-1), mask.sum(-1)
    assert tokens.min() > 0
    per_episode = {"seq-mean-token-mean": sums / tokens, "seq-mean-token-sum": sums,
                   "seq-mean-token-sum-norm": sums / MAX_LEN}  # fmt: skip
    return per_episode[agg].mean()


def assert_grad(got: torch.Tensor, want: torch.Tensor) -> None:
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["low_var_kl", "k1"])
def test_the_kl_term_pulls_toward_the_reference(rollout, kind):
    """loss = policy_loss + 0.5 * KL, the KL a token mean of k3 = e^(ref - logp) - (ref - logp) - 1 (or k1 =
    logp - ref); its gradient follows. Without the term (or with its sign flipped) loss and gradient differ."""
    def k(logp, ref):
        return torch.exp(ref - logp) - (ref - logp) - 1 if kind == "low_var_kl" else logp - ref

    def terms(lp, h, e, ref, a, m):
        pg, kl = mean(on_policy(lp, a), m), mean(k(lp, ref), m)
        return pg + 0.5 * kl, pg, kl

    (want, want_pg, want_kl), grad = hand(rollout, terms)
    metrics, got = update(rollout, ref=True, kl_coef=0.5, kl_kind=kind)
    assert abs(want_kl) > 0.01  # the reference is another policy
    assert metrics["train/kl"] == pytest.approx(want_kl, rel=1e-4)
    assert metrics["train/policy_loss"] == pytest.approx(want_pg, rel=1e-4)
    assert metrics["train/loss"] == pytest.approx(want, rel=1e-4)
    assert_grad(got, grad)


def test_the_entropy_bonus_raises_entropy(rollout):
    """loss = policy_loss - 0.1 * H (the token mean of the entropies): a positive entropy_coef rewards entropy."""
    def terms(lp, h, e, ref, a, m):
        return mean(on_policy(lp, a) - 0.1 * h, m), mean(h, m)

    (want, want_h), grad = hand(rollout, terms)
    metrics, got = update(rollout, entropy_coef=0.1)
    assert metrics["train/entropy"] == pytest.approx(want_h, rel=1e-4) and want_h > 1
    assert metrics["train/loss"] == pytest.approx(want, rel=1e-4)
    assert_grad(got, grad)


@pytest.mark.parametrize("agg", SEQ_MEANS)
def test_the_kl_term_follows_loss_agg(rollout, agg):
    """Under a seq-mean loss_agg the KL (train/kl, added to the loss times kl_coef) is averaged over the episodes
    as the policy loss is, not over their tokens: the episodes' KLs (0.03 to 0.12) and lengths (8 to 20 sampled
    tokens) differ, so the token mean is another number (by 4% under seq-mean-token-mean). The values pin the
    aggregation (the gradients are checked under token-mean above; here they would double the test's time)."""
    def terms(lp, h, e, ref, a, m):
        lp = lp.detach()
        k = torch.exp(ref - lp) - (ref - lp) - 1
        pg, kl = seq_mean(on_policy(lp, a), m, agg), seq_mean(k, m, agg)
        return pg + 0.5 * kl, kl, mean(k, m)

    (want, want_kl, token_mean), _ = hand(rollout, terms)
    metrics, _ = update(rollout, ref=True, kl_coef=0.5, loss_agg=agg, max_context_tokens=MAX_LEN)
    assert want_kl != pytest.approx(token_mean, rel=0.02)
    assert metrics["train/kl"] == pytest.approx(want_kl, rel=1e-4)
    assert metrics["train/loss"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("agg", SEQ_MEANS)
def test_the_entropy_bonus_follows_loss_agg(rollout, agg):
    """Under a seq-mean loss_agg the entropy bonus is averaged over the episodes as the policy loss is, while
    train/entropy stays a token mean. At temperature 0.1 the episodes' mean entropies differ (0.15 to 0.19; at 1
    all are 6.232), so under seq-mean-token-mean too the loss with a token-mean bonus is off by over 1%."""
    def terms(lp, h, e, ref, a, m):
        lp, h = lp.detach(), h.detach()
        pg = seq_mean(on_policy(lp, a), m, agg)
        return pg - 0.1 * seq_mean(h, m, agg), pg - 0.1 * mean(h, m), mean(h, m)

    (want, token_mean_loss, want_h), _ = hand(rollout, terms, temperature=0.1)
    metrics, _ = update(rollout, entropy_coef=0.1, loss_agg=agg, max_context_tokens=MAX_LEN, temperature=0.1)
    assert want != pytest.approx(token_mean_loss, rel=0.01)
    assert metrics["train/entropy"] == pytest.approx(want_h, rel=1e-4)
    assert metrics["train/loss"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_importance_weights_scale_each_tokens_advantage(rollout, mode):
    """is_correction: token t's advantage is A * w_t, w_t = p_trainer / p_engine = e^(logp + 1) (the engine says
    -1), truncated to the cap (or 0 above it). The cap sits among the weights (~0.004 to 0.008), so both cases
    occur; without the correction every weight is 1 and the loss is 100 times larger."""
    cap = 0.006

    def weights(lp, e, m):
        r = torch.exp(lp.detach() - e)
        return (r.clamp(max=cap) if mode == "truncate" else r.masked_fill(r > cap, 0.0)) * m

    def terms(lp, h, e, ref, a, m):
        return mean(on_policy(lp, a * weights(lp, e, m)), m), mean((torch.exp(lp.detach() - e) > cap).float(), m)

    (want, share), grad = hand(rollout, terms)
    metrics, got = update(rollout, is_correction=mode, is_cap=cap)
    assert 0.05 < share < 0.95  # some tokens over the cap, some under
    assert metrics["train/mismatch_over_cap_frac"] == pytest.approx(share)
    assert metrics["train/policy_loss"] == pytest.approx(want, rel=1e-4)
    assert_grad(got, grad)


def test_mismatch_maxima_are_the_largest_token_gaps(rollout):
    """Two updates (episodes 0-1, 2-3) of one episode a micro-batch: train/mismatch_max_abs_diff is the largest
    |logp - (-1)| over all their sampled tokens and, with the engine's log-probs as the old policy's,
    train/ratio_max the largest e^(logp + 1); the mean gap is the mean of the two updates' token means."""
    def halves(x, m):
        return (mean(x[:2], m[:2]) + mean(x[2:], m[2:])) / 2

    def terms(lp, h, e, ref, a, m):
        lp = lp.detach()
        return ((lp - e).abs() * m).max(), (torch.exp(lp - e) * m).max(), halves((lp - e).abs(), m)

    gaps, _ = hand(rollout, terms)
    metrics, _ = update(rollout, old_logprobs="engine", micro_batch_tokens=1, mini_batches=2)
    assert gaps[0] > 1
    assert metrics["train/mismatch_max_abs_diff"] == pytest.approx(gaps[0], rel=1e-5)
    assert metrics["train/ratio_max"] == pytest.approx(gaps[1], rel=1e-5)
    assert metrics["train/mismatch_mean_abs_diff"] == pytest.approx(gaps[2], rel=1e-4)


@pytest.mark.parametrize("estimator", ["drgrpo", "rloo"])
def test_the_configured_advantage_estimator_reaches_the_update(sample, estimator):
    """Rewards 1, 0.1, 0.91, 0 (mean 0.5025): Dr. GRPO's advantages are r - mean, RLOO's r - the mean of the other
    three (GRPO's would be (r - mean) / 0.5254). On-policy, the logged policy loss is -sum(A_i n_i) / sum(n_i) over
    the n_i sampled tokens of episode i."""
    rewards = [1.0, 0.1, 0.91, 0.0]
    want = [r - 0.5025 if estimator == "drgrpo" else r - (2.01 - r) / 3 for r in rewards]
    module = make_module(advantage_estimator=estimator)
    trainer = fit_one_step(module, [sample])
    step = module.last_rollout
    assert step.rewards.tolist() == pytest.approx(rewards)
    assert step.advantages.tolist() == pytest.approx(want, abs=1e-6)
    n = [t.num_sampled_tokens for t in step.trajectories]
    loss = -sum(a * k for a, k in zip(want, n)) / sum(n)
    assert trainer.callback_metrics["train/policy_loss"].item() == pytest.approx(loss, rel=1e-5)
