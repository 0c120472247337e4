"""Update settings that would stall or reverse training are refused when the settings are made, naming the field
(before, ppo_epochs=0 rolled out forever without an update and grad_clip=-1 climbed the loss)."""

import math
import re

import pytest
import torch

from mmsr.train.update import UpdateSettings


@pytest.mark.parametrize(("field", "value"), [
    ("ppo_epochs", 0), ("mini_batches", 0), ("micro_batch_tokens", 0), ("max_context_tokens", 0),
    ("grad_clip", -1.0), ("grad_clip", 0.0), ("grad_clip", math.nan), ("kl_coef", -0.001), ("clip_low", -0.2),
    ("clip_high", -0.2), ("clip_ratio_c", 1.0), ("clip_ratio_c", 0.5), ("clip_ratio_c", math.nan),
    ("entropy_coef", math.nan), ("is_cap", 0.0)])  # fmt: skip
def test_a_setting_out_of_range_is_refused_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"UpdateSettings: {field}={value!r} \(must be"):
        UpdateSettings(**{field: value})


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("old_logprobs", "recomputed", "'recompute', 'engine'"),  # no old policy was scored: every PPO ratio was 1
    ("loss_agg", "token_mean", "'token-mean', 'seq-mean-token-sum', 'seq-mean-token-mean', 'seq-mean-token-sum-norm'"),
    ("is_correction", "truncated", "'none', 'truncate', 'mask'"), ("kl_kind", "low-var-kl", "'k1', 'k2', 'k3', 'low_var_kl'"),
])  # fmt: skip
def test_a_misspelt_choice_is_refused_naming_the_allowed_values(field, value, allowed):
    """These failed at the first update, a rollout in, or (old_logprobs) never."""
    with pytest.raises(ValueError, match=re.escape(f"UpdateSettings: {field}={value!r} (must be one of {allowed})")):
        UpdateSettings(**{field: value}, ppo_epochs=2)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_a_temperature_that_is_not_positive_is_refused(temperature):
    """The log-probs were scored at temperature 1 then, not at the rollouts' temperature."""
    with pytest.raises(ValueError, match=re.escape(f"UpdateSettings: temperature={temperature} (must be > 0")):
        UpdateSettings(temperature=temperature)


def test_a_negative_entropy_coef_minimizes_entropy_on_purpose():
    assert UpdateSettings(entropy_coef=-0.001).entropy_coef == -0.001


def test_every_field_out_of_range_is_named_at_once():
    with pytest.raises(ValueError, match=r"ppo_epochs=0 .*; mini_batches=0 .*; grad_clip=-1.0 \(must be > 0"):
        UpdateSettings(ppo_epochs=0, mini_batches=0, grad_clip=-1.0)


def test_an_infinite_grad_clip_turns_clipping_off():
    assert UpdateSettings(grad_clip=math.inf).updates_per_step == 1
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([30.0, -40.0])
    assert float(torch.nn.utils.clip_grad_norm_([p], math.inf)) == 50.0  # the norm is still logged
    assert p.grad.tolist() == [30.0, -40.0]


@pytest.mark.parametrize("truncation", [dict(top_p=0.9), dict(top_k=5)])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_is_correction_refuses_truncated_sampling(truncation, mode):
    """With top-p / top-k on, vLLM's log-probs are of the kept tokens renormalized, the trainer's of the whole
    distribution: every weight would be the kept mass (0.5 at top_p=0.5 on the tiny policy of
    tests/rollout/test_vllm_engine.py), not the engine/trainer mismatch it is meant to correct."""
    with pytest.raises(ValueError, match=rf"is_correction='{mode}' needs top_p=1 and top_k=0 \(got top_p="):
        UpdateSettings(is_correction=mode, **truncation)
    assert UpdateSettings(**truncation).truncated and not UpdateSettings(is_correction=mode).truncated


def test_the_module_hands_its_sampling_truncation_to_the_update():
    from tests.test_module import make_module

    with pytest.raises(ValueError, match="is_correction='truncate' needs top_p=1 and top_k=0"):
        make_module(is_correction="truncate", top_p=0.9)


def test_the_dual_clip_is_off_by_default_and_reaches_the_update():
    """veRL's ``clip_ratio_c`` (the MMSearch-R1 recipes set its 3.0): off unless set, so nothing else changes; a
    module's value is its update's, and one of at most 1 (a cap below the unclipped ratio 1) is refused by name."""
    from tests.test_module import make_module

    assert UpdateSettings().clip_ratio_c is None and UpdateSettings(clip_ratio_c=3.0).clip_ratio_c == 3.0
    assert make_module(clip_ratio_c=3.0).policy_update.settings.clip_ratio_c == 3.0
    with pytest.raises(ValueError, match=r"clip_ratio_c=1.0 \(must be > 1 \(None: off\)\)"):
        make_module(clip_ratio_c=1.0)
