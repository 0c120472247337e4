"""``model.compute_dtype: float16`` ran an fp16 autocast (FSDP2: an fp16 ``MixedPrecisionPolicy``) with no loss
scaling, so small gradients underflowed to 0 (measured on the tiny policy with a recipe-sized loss scale: 7-13% of
the fp32 run's nonzero gradient elements came out exactly 0, a gradient error of 6-15%; bf16 compute: 0.0%, 0.3%).
``16-mixed`` was refused for its scaler; this path had none at all. Refused now in ``mmsr.parallel.compute_dtype``,
so ``GRPOModule.setup`` and ``mmsr plan`` refuse it alike."""

import pytest
import torch

from mmsr.parallel import compute_dtype
from mmsr.plan import main
from tests.test_plan import RECIPES

USE = r"use trainer.precision 'bf16-mixed' .* or '32-true'"


@pytest.mark.parametrize("params", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", None])
def test_fp16_compute_over_wider_parameters_is_refused_saying_what_to_use(params, precision):
    with pytest.raises(ValueError, match=f"model.compute_dtype 'float16' runs the matmuls in float16 with no loss "
                                         f"scaling.*{USE}"):  # fmt: skip
        compute_dtype("float16", params, precision)


def test_fp16_parameters_compute_in_their_own_dtype():
    """No autocast at all: the matmuls run in the parameters' dtype, as any ``compute_dtype`` equal to it."""
    assert compute_dtype("float16", torch.float16, "32-true") == torch.float16
    assert compute_dtype("bfloat16", torch.float32, "32-true") == torch.bfloat16  # bf16 compute is unchanged


def test_mmsr_plan_refuses_fp16_compute_as_fit_does():
    with pytest.raises(ValueError, match="model.compute_dtype 'float16' runs the matmuls in float16"):
        main(["-c", str(RECIPES[0]), "--model.init_args.compute_dtype", "float16", "--json"])
