"""SFTModule: optimization settings that would stall or reverse the warm start are refused before the policy is
built, naming the field (before, grad_clip=-1 flipped every gradient and the NLL climbed; 0 zeroed them)."""

import re

import pytest

from mmsr.sft import SFTModule


class Unbuildable:
    def build(self):
        raise AssertionError("the policy was built before the settings were checked")


@pytest.mark.parametrize(("setting", "named"), [
    ({"grad_clip": -1.0}, "grad_clip=-1.0 (must be > 0"), ({"grad_clip": 0.0}, "grad_clip=0.0 (must be > 0"),
    ({"grad_clip": float("nan")}, "grad_clip=nan"), ({"lr": 0.0}, "lr=0.0 (must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"), ({"warmup_steps": -1}, "warmup_steps=-1"),
    ({"total_steps": 0}, "total_steps=0"), ({"micro_batch_tokens": 0}, "micro_batch_tokens=0"),
    ({"reading_steps": -1}, "reading_steps=-1")])  # fmt: skip
def test_settings_out_of_range_are_refused_before_the_policy_is_built(setting, named):
    with pytest.raises(ValueError, match=re.escape(f"SFTModule: {named}")):
        SFTModule(Unbuildable(), teacher=object(), **setting)
