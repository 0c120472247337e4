"""fp32 matmuls over bf16 parameters are refused at setup, before the engine starts or a rollout runs, naming the
two settings (``Policy.autocast`` refused them too, but only at the first forward: a rollout's worth of work in);
so are fp32 matmuls under ``bf16-mixed``, whose autocast ran the update's matmuls in bf16 anyway."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmsr.models.build import TinyQwen2_5_VL
from mmsr.module import GRPOModule
from mmsr.parallel import compute_dtype
from mmsr.rollout.engine import ScriptedEngine
from tests.conftest import FVQA
from tests.test_module import script

WIDER = "model.compute_dtype 'float32' is wider than model.param_dtype 'bfloat16'"
WIDER_THAN_MIXED = "model.compute_dtype 'float32' is wider than trainer.precision 'bf16-mixed'"


def test_a_compute_dtype_wider_than_the_parameters_is_refused():
    with pytest.raises(ValueError, match=f"{WIDER}: autocast only lowers precision.*set model.param_dtype: float32$"):
        compute_dtype("float32", torch.bfloat16, "32-true")
    # bf16 weights under bf16-mixed (the same width) and fp32 masters with bf16 or fp32 compute are as before
    assert compute_dtype(None, torch.bfloat16, "bf16-mixed") == torch.bfloat16
    assert compute_dtype("float32", torch.float32, "32-true") == torch.float32
    assert compute_dtype("bfloat16", torch.float32, "bf16-mixed") == torch.bfloat16


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_fp32_compute_under_bf16_mixed_is_refused_saying_to_use_32_true(precision):
    """Lightning's ``bf16-mixed`` autocasts every training step: with ``compute_dtype: float32`` the LM head's logits
    came out bf16 while FSDP2 gathered fp32 shards (fp32's memory for bf16 matmuls). ``mmsr plan`` reads ``bf16``."""
    with pytest.raises(ValueError, match=f"{WIDER_THAN_MIXED}, which autocasts every training step to bfloat16 .*"
                                         "set trainer.precision: 32-true$"):  # fmt: skip
        compute_dtype("float32", torch.float32, precision)


@pytest.mark.parametrize(("params", "precision", "refused"), [
    ("bfloat16", "32-true", WIDER), ("float32", "bf16-mixed", WIDER_THAN_MIXED)])  # fmt: skip
def test_fit_refuses_fp32_compute_it_cannot_give_before_the_first_rollout(params, precision, refused, tmp_path, fvqa_samples):
    turns = []

    def counted(request):
        turns.append(request.key)
        return script(request)

    model = GRPOModule(policy=TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], hidden_size=32, num_layers=1,
                                             vision_depth=1, seed=0),
                       engine=ScriptedEngine(counted), kl_coef=0.0, param_dtype=params, compute_dtype="float32")  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=refused):
        trainer.fit(model, DataLoader(fvqa_samples[:2], batch_size=2, collate_fn=list))
    assert turns == []  # no episode was rolled out


LOSS_SCALING = "trainer.precision '16-mixed' scales the loss .*: use 'bf16-mixed'"


@pytest.mark.parametrize("precision", ["16-mixed", "16", 16])
def test_fp16_with_loss_scaling_is_refused_saying_to_use_bf16_mixed(precision):
    """Lightning unscales ``16-mixed`` gradients only inside ``optimizer.step()``, after mmsr clipped them: the clip
    saw them 65,536x too large and each update was ~65,000x too small. ``mmsr plan`` reads the short names too."""
    with pytest.raises(ValueError, match=LOSS_SCALING):
        compute_dtype(None, torch.float32, precision)


@pytest.mark.parametrize("module", ["grpo", "sft"])
def test_fit_under_16_mixed_stops_before_the_first_rollout(module, tmp_path, fvqa_samples):
    """On CPU Lightning turns ``precision='16-mixed'`` into bf16-mixed; the plugin given outright keeps its
    ``GradScaler``, as ``16-mixed`` does on a GPU."""
    from lightning.pytorch.plugins import MixedPrecision

    from mmsr.sft import SFTModule
    from tests.train.test_sft_loss import Answers

    turns = []

    def counted(request):
        turns.append(request.key)
        return script(request)

    policy = TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], hidden_size=32, num_layers=1, vision_depth=1,
                            seed=0)  # fmt: skip
    model = GRPOModule(policy=policy, engine=ScriptedEngine(counted), kl_coef=0.0) if module == "grpo" else \
        SFTModule(policy, Answers(), lr=1e-3)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu")], max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    assert trainer.precision_plugin.scaler is not None
    with pytest.raises(ValueError, match=LOSS_SCALING):
        trainer.fit(model, DataLoader(fvqa_samples[:2], batch_size=2, collate_fn=list))
    assert turns == [] and trainer.global_step == 0  # no episode was rolled out, no update made
