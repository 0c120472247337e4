"""Boundaries of the GRPO math that a mutation audit of mmsr/algo found unpinned: each test failed against a
mutant the other algo tests let pass. Hand-computed values."""

import pytest
import torch

from mmsr.algo import cosine_with_warmup, kl_penalty, policy_loss
from mmsr.algo.correction import corrected_advantages, is_weights


def test_k3_of_a_log_ratio_past_float32_exp_overflow_is_clamped_with_a_finite_gradient():
    """ref - logp = 100 (a padding position's garbage log-prob, masked out later): exp(100) is inf in float32, and
    inf * 0 in the masked product's backward is NaN, which would poison every gradient of the step. The log-ratio
    clamp keeps it at the k3 bound 10; the other token, ref = logp, is 0 with gradient 1 - exp(0) = 0."""
    logp = torch.tensor([[-100.0, -1.0]], requires_grad=True)
    kl = kl_penalty(logp, torch.tensor([[0.0, -1.0]]), "low_var_kl")
    torch.testing.assert_close(kl.detach(), torch.tensor([[10.0, 0.0]]))
    (kl * torch.tensor([[0.0, 1.0]])).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0]]))


@pytest.mark.parametrize(("clip_low", "clip_high"), [(0.2, -0.5), (-0.1, 0.2)])
def test_policy_loss_refuses_a_negative_clip_bound_on_either_side(clip_low, clip_high):
    """clip(r, 1 - 0.2, 1 - 0.5) is a clamp with min above max: a loss with no meaning and no error."""
    one = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="clip_low and clip_high must be >= 0"):
        policy_loss(one, one, torch.ones(1), torch.ones(1, 1), clip_low=clip_low, clip_high=clip_high)


def test_a_schedule_all_warmup_reaches_1_and_stays_there():
    """warmup_steps == total_steps is accepted (the config check accepts it): (step + 1) / 4 up to step 3, the
    cosine's start (1.0) at step 4 as after any warmup, then its end, min_ratio (a cosine of length max(1, 0))."""
    assert [cosine_with_warmup(s, 4, 4, min_ratio=0.1) for s in range(7)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 0.1, 0.1])  # fmt: skip


def test_mask_mode_keeps_a_ratio_equal_to_the_cap():
    """Only ratios above the cap are dropped: with cap 1.0, a token the trainer and the engine agree on (ratio 1)
    keeps weight 1, one the trainer likes more (ratio e^0.5) is masked to 0."""
    trainer = torch.tensor([[-1.0, -0.5]])
    weights = is_weights(trainer, torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2), cap=1.0, mode="mask")
    torch.testing.assert_close(weights, torch.tensor([[1.0, 0.0]]))


def test_correction_weights_and_corrected_advantages_carry_no_gradient():
    """The weights scale the advantages, which the loss treats as constants: a gradient through them would push the
    trainer's log-probs towards the engine's, a term no one asked for."""
    trainer = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    weights = is_weights(trainer, torch.tensor([[-1.2, -1.0]]), torch.ones(1, 2))
    assert not weights.requires_grad
    advantages = torch.tensor([2.0], requires_grad=True)
    corrected = corrected_advantages(advantages, weights)
    torch.testing.assert_close(corrected.detach(), 2 * weights)
    assert not corrected.requires_grad
