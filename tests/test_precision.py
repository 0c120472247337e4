"""The paper's precision regime on CPU: a policy loaded in bf16 trains fp32 master weights with bf16
compute (``trainer.precision: bf16-mixed``), so lr 2e-6 updates are not lost to bf16 rounding.

Three runs of 10 updates on the same scripted rollouts (lr 2e-6, KL 0.001 as in the 7B recipes):
  fp32  - the policy loaded in fp32, ``precision: 32-true`` (the reference curve);
  mixed - loaded in bf16, ``bf16-mixed``: fp32 master weights, bf16 matmuls (the recipes);
  bf16  - loaded in bf16, ``param_dtype: bfloat16``: AdamW updates bf16 weights (the old recipe bug).
"""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmsr.models.build import PretrainedPolicy, TinyQwen2_5_VL, save_policy
from mmsr.module import GRPOModule
from mmsr.parallel import compute_dtype
from mmsr.rollout.engine import ScriptedEngine
from mmsr.rollout.loop import RolloutSettings
from mmsr.sft import SFTModule
from tests.conftest import FVQA
from tests.rollout.test_loop import FakeImageSearch
from tests.test_module import script
from tests.train.test_sft_loss import Answers

UPDATES = 10


def train(path, sample, load_dtype: str, precision: str, **kw) -> tuple[GRPOModule, dict[str, torch.Tensor], list[float]]:
    """Fit ``UPDATES`` steps on one prompt; returns the module, its initial weights (fp32) and losses."""
    module = GRPOModule(policy=PretrainedPolicy(str(path), dtype=load_dtype), engine=ScriptedEngine(script),
                        image_search=FakeImageSearch(), num_generations=4, lr=2e-6, kl_coef=0.001,
                        rollout=RolloutSettings(max_tokens_per_turn=64), **kw)  # fmt: skip
    initial = {k: v.detach().float().clone() for k, v in module.model.named_parameters()}
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            losses.append(float(trainer.callback_metrics["train/loss"]))

    loader = torch.utils.data.DataLoader([sample] * UPDATES, batch_size=1, collate_fn=list)
    trainer = L.Trainer(max_steps=UPDATES, accelerator="cpu", precision=precision, logger=False, callbacks=[Losses()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader)
    return module, initial, losses


@pytest.fixture(scope="module")
def runs(tiny_policy, fvqa_samples, tmp_path_factory):
    sample = [s for s in fvqa_samples if s.ground_truth == "musketeers"][0]
    path = tmp_path_factory.mktemp("bf16_policy")
    tiny_policy.model.to(torch.bfloat16)
    try:
        save_policy(tiny_policy, path)  # a bf16 checkpoint, as Qwen2.5-VL-7B-Instruct is published
    finally:
        tiny_policy.model.float()
    return {
        "fp32": train(path, sample, "float32", "32-true"),
        "mixed": train(path, sample, "bfloat16", "bf16-mixed"),
        "bf16": train(path, sample, "bfloat16", "bf16-mixed", param_dtype="bfloat16"),
    }


def changed_share(module: GRPOModule, initial: dict[str, torch.Tensor]) -> float:
    changed = total = 0
    for name, p in module.model.named_parameters():
        changed += int((p.detach().float() != initial[name]).sum())
        total += p.numel()
    return changed / total


def update(module: GRPOModule, initial: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.detach().float() - initial[n]).flatten() for n, p in module.model.named_parameters()])


def test_mixed_precision_keeps_fp32_master_weights_and_bf16_compute(runs):
    module, _, _ = runs["mixed"]
    assert all(p.dtype == torch.float32 for p in module.model.parameters())  # upcast from the bf16 checkpoint
    state = module.optimizers().optimizer.state
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    assert module.policy.compute_dtype == torch.bfloat16
    assert {p.dtype for p in module._ref.model.parameters()} == {torch.bfloat16}  # the reference computes in bf16
    # ... at the policy's positions: its rotary tables are the policy's (Module.to(bf16) rounded them, and
    # the reference's cos at position 1,000 was off by 0.15, its KL non-zero at step 0)
    policy_buffers = dict(module.model.named_buffers())
    for name, buffer in module._ref.model.named_buffers():
        assert buffer.dtype == policy_buffers[name].dtype and torch.equal(buffer, policy_buffers[name]), name
    assert any("inv_freq" in name for name in policy_buffers)


def test_lr_2e6_updates_reach_the_weights_only_with_fp32_masters(runs):
    assert changed_share(*runs["fp32"][:2]) >= 0.99
    assert changed_share(*runs["mixed"][:2]) >= 0.99
    assert changed_share(*runs["bf16"][:2]) < 0.5  # most updates are below half a bf16 rounding step


def test_mixed_precision_follows_the_fp32_run(runs):
    (fp32, init32, loss32), (mixed, init_mixed, loss_mixed) = runs["fp32"], runs["mixed"]
    # bf16 matmuls carry ~3 significant digits: the losses agree to bf16 tolerance (on-policy, the
    # loss is mostly -mean(advantage), so this alone says little) ...
    torch.testing.assert_close(torch.tensor(loss_mixed), torch.tensor(loss32), atol=2e-3, rtol=2e-2)
    # ... and the weights moved the same way (Adam's early steps are ~lr * sign(grad) per weight):
    # measured cosine 0.999 with fp32 masters, 0.19 when the bf16 weights are updated directly
    reference = update(fp32, init32)
    cos = torch.nn.functional.cosine_similarity(update(mixed, init_mixed), reference, dim=0)
    assert cos > 0.95, float(cos)
    cos_bf16 = torch.nn.functional.cosine_similarity(update(*runs["bf16"][:2]), reference, dim=0)
    assert cos_bf16 < 0.5, float(cos_bf16)


@pytest.mark.parametrize(("requested", "precision", "expected"), [
    (None, "bf16-mixed", torch.bfloat16), (None, "32-true", torch.float32), (None, "bf16", torch.bfloat16),
    ("bfloat16", "32-true", torch.bfloat16), ("float32", "32-true", torch.float32),
    ("bfloat16", "bf16-mixed", torch.bfloat16),
])  # fmt: skip
def test_compute_dtype_follows_the_trainer_unless_set(requested, precision, expected):
    assert compute_dtype(requested, torch.float32, precision) == expected


@pytest.mark.parametrize(("precision", "params", "why"), [
    ("bf16-true", torch.float32, "casts the master weights"), ("16-true", torch.float32, "casts the master weights"),
    ("bf16-true", torch.bfloat16, "frozen Sample records"), ("64-true", torch.float32, "float64"),
])  # fmt: skip
def test_true_precisions_are_refused(precision, params, why):
    with pytest.raises(ValueError, match=f"{why}.*'bf16-mixed'"):
        compute_dtype(None, params, precision)


@pytest.mark.parametrize("module", ["grpo", "sft"])
@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_fit_under_a_true_precision_stops_before_the_first_step_saying_what_to_use(module, precision, tmp_path, fvqa_samples):
    """Lightning's ``bf16-true`` and ``64-true`` rebuilt every batch and failed on the frozen samples at the
    first step, with its own "frozen dataclass" error, even with bf16 weights on purpose."""
    model = GRPOModule(policy=TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], hidden_size=32, num_layers=1,
                                             vision_depth=1, seed=0),
                       engine=ScriptedEngine(script), kl_coef=0.0, param_dtype="bfloat16") if module == "grpo" else \
        SFTModule(TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], hidden_size=32, num_layers=1,
                                 vision_depth=1, seed=0), Answers(), lr=1e-3)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=f"trainer.precision '{precision}'.*'32-true'"):
        trainer.fit(model, DataLoader(fvqa_samples[:2], batch_size=2, collate_fn=list))


def test_a_pretrained_policy_trains_in_train_mode_with_checkpointing_on(tmp_path, tiny_policy):
    """from_pretrained returns eval mode, where transformers skips gradient checkpointing: the module
    puts the policy in train mode (the 7B recipe's activations need checkpointing to fit)."""
    save_policy(tiny_policy, tmp_path)
    module = GRPOModule(policy=PretrainedPolicy(str(tmp_path)), engine=ScriptedEngine(script), kl_coef=0.0,
                        gradient_checkpointing=True)  # fmt: skip
    assert all(m.training for m in module.model.modules())
    assert module.model.is_gradient_checkpointing


def test_bf16_weights_on_one_device_keep_fp32_rotary_tables_as_the_reference_and_fsdp2_do():
    """``param_dtype: bfloat16`` cast the policy with ``Module.to``, which rounded its rotary ``inv_freq`` buffers
    too: the reference (``copy_to``) and an FSDP2 run (``shard``) kept them fp32, so policy and reference disagreed
    on positions from step 0 (KL before any update) and a 7B's cos drifted by up to 0.9 at position 1,000."""
    module = GRPOModule(policy=TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], hidden_size=32, num_layers=1,
                                              vision_depth=1, seed=0),
                        engine=ScriptedEngine(script), kl_coef=0.001, param_dtype="bfloat16")  # fmt: skip
    built = {n: b.dtype for n, b in module.model.named_buffers() if "inv_freq" in n}
    module.configure_model()
    assert built and all(d == torch.float32 for d in built.values())
    assert {n: b.dtype for n, b in module.model.named_buffers() if "inv_freq" in n} == built
    assert {n: b.dtype for n, b in module._ref.model.named_buffers() if "inv_freq" in n} == built
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize(("param_dtype", "master", "moved"), [("float32", torch.float32, True), ("bfloat16", torch.bfloat16, False)])
def test_the_warm_start_of_a_bf16_policy_trains_fp32_master_weights(param_dtype, master, moved, tmp_path, fvqa_samples):
    """``SFTModule`` had no ``param_dtype``: a policy loaded in bf16 (as the 7B recipes load Qwen) trained its bf16
    weights and bf16 AdamW state under ``bf16-mixed``, and 5 updates at lr 2e-6 changed 4% of them (99.9% now)."""
    policy = TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], hidden_size=32, num_layers=1, vision_depth=1,
                            seed=0).build()  # fmt: skip
    policy.model.to(torch.bfloat16)
    save_policy(policy, tmp_path / "bf16")
    module = SFTModule(PretrainedPolicy(str(tmp_path / "bf16"), dtype="bfloat16"), Answers(), lr=2e-6, param_dtype=param_dtype)
    initial = {k: v.detach().float().clone() for k, v in module.model.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(fvqa_samples[:10], batch_size=2, collate_fn=list))
    assert {p.dtype for p in module.model.parameters()} == {master}
    assert {s["exp_avg"].dtype for s in module.optimizers().optimizer.state.values()} == {master}
    assert (changed_share(module, initial) > 0.9) is moved  # bf16 on purpose: most updates below half a rounding step


def test_the_reference_of_an_fp32_policy_computes_in_the_compute_dtype_frozen_in_eval_mode():
    """The reference runs only forwards: it is held in ``compute_dtype`` (bf16 under ``bf16-mixed``), not the fp32
    master weights' dtype (twice the memory for the same bf16 matmuls), and in eval mode (dropout off: its
    log-probs are the KL's fixed target)."""
    module = GRPOModule(policy=TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], hidden_size=32, num_layers=1,
                                              vision_depth=1, seed=0),
                        engine=ScriptedEngine(script), kl_coef=0.001, compute_dtype="bfloat16")  # fmt: skip
    module.setup("fit")
    module.configure_model()
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}
    assert {p.dtype for p in module._ref.model.parameters()} == {torch.bfloat16}
    assert not any(m.training for m in module._ref.model.modules())
