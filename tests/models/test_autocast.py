"""``Policy.autocast``: which dtype a forward's matmuls run in, given the parameters' and ``compute_dtype``."""

import pytest
import torch

from mmsr.models.policy import Policy


def policy_with(param: torch.dtype, compute: torch.dtype | None) -> Policy:
    return Policy(torch.nn.Linear(4, 4).to(param), tokenizer=None, compute_dtype=compute)


def test_a_lower_compute_dtype_autocasts():
    with policy_with(torch.float32, torch.bfloat16).autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with policy_with(torch.bfloat16, torch.bfloat16).autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_fp32_compute_over_bf16_parameters_is_refused():
    """torch disables an fp32 autocast with a warning ("target dtype is not supported"): the matmuls ran in
    bf16, bit for bit the plain bf16 forward, while FSDP2's MixedPrecisionPolicy would have gathered fp32."""
    with pytest.raises(ValueError, match="compute_dtype torch.float32 is wider than the parameters' torch.bfloat16"):
        policy_with(torch.bfloat16, torch.float32).autocast()
