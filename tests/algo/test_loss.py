import math

import pytest
import torch

from mmsr.algo import aggregate, policy_loss

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # third row fully masked


# valid tokens: row 0 -> 1, 2 (sum 3, mean 1.5); row 1 -> 4 (sum 4, mean 4); row 2 -> none
# token-mean:              (1 + 2 + 4) / 3 = 7/3
# seq-mean-token-sum:      (3 + 4) / 2 = 3.5          (row 2 has no token: excluded)
# seq-mean-token-mean:     (1.5 + 4) / 2 = 2.75       (row 2 excluded)
# seq-mean-token-sum-norm: 7 / (N * T) = 7 / (3 * 3) = 7/9 (constant normaliser counts every row)
@pytest.mark.parametrize(
    "mode, expected", [(MODES[0], 7 / 3), (MODES[1], 3.5), (MODES[2], 2.75), (MODES[3], 7 / 9)]
)
def test_aggregate_hand_worked(mode, expected):
    torch.testing.assert_close(aggregate(VALUES, MASK, mode), torch.tensor(expected))


def test_aggregate_sum_norm_custom_max_len():
    # 7 / (3 * 10)
    torch.testing.assert_close(aggregate(VALUES, MASK, "seq-mean-token-sum-norm", max_len=10), torch.tensor(7 / 30))


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_bool_mask_equals_float_mask(mode):
    torch.testing.assert_close(aggregate(VALUES, MASK.bool(), mode), aggregate(VALUES, MASK.float(), mode))


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_all_zero_mask_is_zero_with_grad(mode):
    values = torch.randn(2, 4, requires_grad=True)
    out = aggregate(values, torch.zeros(2, 4), mode)
    assert out.shape == () and out.item() == 0.0
    assert out.grad_fn is not None
    out.backward()
    assert torch.equal(values.grad, torch.zeros(2, 4))


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_empty_batch(mode):
    assert aggregate(torch.zeros(0, 5), torch.zeros(0, 5), mode).item() == 0.0


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(VALUES, MASK, "token-sum")
    with pytest.raises(ValueError, match="shape"):
        aggregate(VALUES, MASK[:, :2])
    with pytest.raises(ValueError, match="shape"):
        aggregate(VALUES[0], MASK[0])
    with pytest.raises(ValueError, match="max_len"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm", max_len=0)


def _single_token(adv, ratio, **kwargs):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), **kwargs)
    loss.backward()
    return loss.item(), metrics["clip_frac"].item(), logp.grad.item()


# per token: max(-A*r, -A*clip(r, 0.8, 1.2)); d/dlogp of -A*r is -A*r, of the clipped branch 0
@pytest.mark.parametrize(
    "adv, ratio, loss, clipped, grad",
    [
        (1.0, 1.5, -1.2, 1.0, 0.0),  # max(-1.5, -1.2) = -1.2: clipped, no gradient
        (1.0, 0.5, -0.5, 0.0, -0.5),  # max(-0.5, -0.8) = -0.5: unclipped, grad -A*r
        (-1.0, 0.5, 0.8, 1.0, 0.0),  # max(0.5, 0.8) = 0.8: clipped
        (-1.0, 1.5, 1.5, 0.0, 1.5),  # max(1.5, 1.2) = 1.5: unclipped, grad -A*r = 1.5
        (2.0, 1.1, -2.2, 0.0, -2.2),  # inside the trust region both branches equal: not clipped
        (0.0, 1.5, 0.0, 0.0, 0.0),  # zero advantage: both 0, not clipped
    ],
)
def test_policy_loss_clipping_hand_worked(adv, ratio, loss, clipped, grad):
    got = _single_token(adv, ratio)
    assert got == pytest.approx((loss, clipped, grad), abs=1e-6)


def test_policy_loss_clip_higher():
    # DAPO clip-higher: A=+1, r=1.5, clip_high=0.28 -> max(-1.5, -1.28) = -1.28
    assert _single_token(1.0, 1.5, clip_high=0.28)[:2] == pytest.approx((-1.28, 1.0))
    # A=-1, r=0.5, clip_low=0.1 -> max(0.5, 0.9) = 0.9
    assert _single_token(-1.0, 0.5, clip_low=0.1)[:2] == pytest.approx((0.9, 1.0))


def test_policy_loss_batch_and_metrics_hand_worked():
    # A = [+1, +1, -1, -1], r = [1.5, 0.5, 0.5, 1.5]
    # per-token losses [-1.2, -0.5, 0.8, 1.5] -> token-mean 0.6 / 4 = 0.15
    # clipped: tokens 0 and 2 -> clip_frac 2/4 = 0.5
    # ratio_mean (1.5 + 0.5 + 0.5 + 1.5) / 4 = 1.0, ratio_max 1.5
    # approx_kl = mean(r - 1 - log r): r=1.5 -> 0.5 - 0.405465 = 0.094535
    #                                  r=0.5 -> -0.5 + 0.693147 = 0.193147 -> mean 0.143841
    # the 5th token (ratio e^3, masked out) must not show up anywhere
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, math.e**3]]).T
    logp = ratio.log()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 5.0])
    mask = torch.tensor([[1], [1], [1], [1], [0]])
    loss, metrics = policy_loss(logp, torch.zeros(5, 1), adv, mask)
    torch.testing.assert_close(loss, torch.tensor(0.15))
    expected = {"clip_frac": 0.5, "ratio_mean": 1.0, "ratio_max": 1.5, "approx_kl": 0.143841}
    assert {k: round(v.item(), 6) for k, v in metrics.items()} == expected
    assert all(v.shape == () and not v.requires_grad for v in metrics.values())


def test_policy_loss_seq_agg_modes_forwarded():
    # A=+1 everywhere, r=1 -> per-token loss -1; row lengths 2 and 1
    # seq-mean-token-sum: (-2 + -1) / 2 = -1.5; seq-mean-token-sum-norm, max_len 4: -3 / (2 * 4)
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    args = (logp, torch.zeros(2, 3), torch.ones(2), mask)
    assert policy_loss(*args, agg="seq-mean-token-sum")[0].item() == pytest.approx(-1.5)
    assert policy_loss(*args, agg="seq-mean-token-sum-norm", max_len=4)[0].item() == pytest.approx(-0.375)


def test_policy_loss_token_level_advantages_match_broadcast():
    gen = torch.Generator().manual_seed(0)
    logp, old = torch.randn(3, 5, generator=gen) * 0.3, torch.randn(3, 5, generator=gen) * 0.3
    adv = torch.randn(3, generator=gen)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    a = policy_loss(logp, old, adv, mask)
    b = policy_loss(logp, old, adv[:, None].expand(3, 5), mask)
    torch.testing.assert_close(a[0], b[0])
    for key in a[1]:
        torch.testing.assert_close(a[1][key], b[1][key])


def test_on_policy_old_logprobs_are_treated_as_constant():
    # old = logp (same tensor): r = 1 but d r / d logp = 1, so grad = -A / num_tokens
    logp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    adv = torch.tensor([2.0], requires_grad=True)
    loss, metrics = policy_loss(logp, logp, adv, torch.ones(1, 2))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0]]))
    assert adv.grad is None
    assert metrics["clip_frac"].item() == 0.0 and metrics["approx_kl"].item() == 0.0


def test_policy_loss_garbage_in_padding_stays_finite():
    # padded positions with absurd old log-probs would overflow exp() without the log-ratio bound
    logp = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1e9]])
    loss, metrics = policy_loss(logp, old, torch.tensor([0.0]), torch.tensor([[1, 0]]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_policy_loss_all_zero_mask():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(v.item() == 0.0 for v in metrics.values())


def test_policy_loss_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(z, torch.zeros(2, 4), torch.zeros(2), z)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(z, z, torch.zeros(3), z)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(z, z, torch.zeros(2, 1, 1), z)
    with pytest.raises(ValueError, match="clip"):
        policy_loss(z, z, torch.zeros(2), z, clip_low=-0.1)
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        policy_loss(z, z, torch.zeros(2), z, agg="sum")


def _dual_clipped_token(adv, ratio, clip_ratio_c):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), clip_ratio_c=clip_ratio_c)
    loss.backward()
    return loss.item(), metrics["dual_clip_frac"].item(), logp.grad.item()


# veRL's dual-clip (clip_ratio_c=3), per token: with A < 0, min(max(-A*r, -A*clip(r, 0.8, 1.2)), -A*3)
@pytest.mark.parametrize(
    "adv, ratio, loss, capped, grad",
    [
        (-1.0, 5.0, 3.0, 1.0, 0.0),  # max(5, 1.2) = 5 > 3: capped at 3, no gradient (unclipped: 5, grad 5)
        (1.0, 5.0, -1.2, 0.0, 0.0),  # A > 0: the ordinary clip alone, max(-5, -1.2) = -1.2
        (-1.0, 2.0, 2.0, 0.0, 2.0),  # max(2, 1.2) = 2 < 3: as without the dual-clip, grad -A*r = 2
        (-2.0, 0.5, 1.6, 0.0, 0.0),  # max(1, 1.6) = 1.6 (clipped low) < 6: unchanged
    ],
)
def test_policy_loss_dual_clip_hand_worked(adv, ratio, loss, capped, grad):
    assert _dual_clipped_token(adv, ratio, 3.0) == pytest.approx((loss, capped, grad), abs=1e-6)


def test_policy_loss_dual_clip_batch_and_metrics_hand_worked():
    # A = [-1, -1, +1, -2], r = [5, 2, 5, 4]; c = 3
    # per token: min(5, 3) = 3 (capped), 2, max(-5, -1.2) = -1.2, min(8, 6) = 6 (capped) -> token-mean 9.8 / 4
    # dual_clip_frac 2/4; clip_frac counts the ordinary clip only (token 2): 1/4
    # d/dlogp: 0, -A*r / 4 = 0.5, 0, 0; the masked 5th token (A=-1, r=e^3 > 3) is neither counted nor capped
    logp = torch.tensor([[5.0, 2.0, 5.0, 4.0, math.e**3]]).T.log().requires_grad_()
    adv = torch.tensor([-1.0, -1.0, 1.0, -2.0, -1.0])
    mask = torch.tensor([[1], [1], [1], [1], [0]])
    loss, metrics = policy_loss(logp, torch.zeros(5, 1), adv, mask, clip_ratio_c=3.0)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(9.8 / 4))
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0]]).T)
    assert (metrics["dual_clip_frac"].item(), metrics["clip_frac"].item()) == (0.5, 0.25)
    assert not metrics["dual_clip_frac"].requires_grad


def test_policy_loss_without_dual_clip_is_unchanged():
    # None (the default) is the loss it always was, bit for bit, and logs no dual_clip_frac
    gen = torch.Generator().manual_seed(0)
    logp, old = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    adv, mask = torch.tensor([-1.0, 0.5, -0.3]), torch.rand(3, 5, generator=gen) > 0.3
    ratio = (logp - old).exp()
    expected = aggregate(torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.8, 1.2)), mask)
    loss, metrics = policy_loss(logp, old, adv, mask, clip_ratio_c=None)
    assert torch.equal(loss, expected) and "dual_clip_frac" not in metrics
    # rows 0 and 2 (A < 0) have valid tokens with r > 3 (4.13, 4.31; 4.36, 3.07): there the dual-clip bites
    assert policy_loss(logp, old, adv, mask, clip_ratio_c=3.0)[1]["dual_clip_frac"] > 0


@pytest.mark.parametrize("c", [1.0, 0.5, -3.0, math.nan])
def test_policy_loss_refuses_a_dual_clip_of_at_most_one(c):
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"clip_ratio_c must be > 1 \(or None: no dual-clip\); got"):
        policy_loss(z, z, torch.zeros(2), z, clip_ratio_c=c)
