"""The 7B recipes' precision under FSDP2 (``ModelParallelStrategy``), on one gloo rank: a policy loaded in bf16 under
``bf16-mixed`` trains fp32 master shards (parameters and AdamW state) that FSDP2 gathers in bf16, and an RL learning
rate moves them. Every other FSDP2 test trains the smoke config's fp32 model at ``32-true``, and the single-device
precision tests return before ``configure_model`` shards: sharded in bf16 instead, 10 updates at lr 2e-6 moved ~4%
of the weights (the rest rounded away) and the run finished without a word."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FVQA, ROOT, subprocess_env


def run(out: Path) -> None:
    """Save a bf16 tiny policy, fit 10 updates on one FSDP2 rank under bf16-mixed, write what was trained."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    from mmsr.data.loaders import load_samples
    from mmsr.models.build import PretrainedPolicy, TinyQwen2_5_VL, save_policy
    from mmsr.module import GRPOModule
    from mmsr.rollout.engine import ScriptedEngine
    from mmsr.rollout.loop import RolloutSettings
    from tests.rollout.test_loop import FakeImageSearch
    from tests.test_module import script

    policy = TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], hidden_size=32, num_layers=1, vision_depth=1).build()
    policy.model.to(torch.bfloat16)  # as a checkpoint saved in bf16 (Qwen2.5-VL-7B-Instruct's)
    save_policy(policy, out / "bf16_policy")
    module = GRPOModule(policy=PretrainedPolicy(str(out / "bf16_policy"), dtype="bfloat16"), engine=ScriptedEngine(script),
                        image_search=FakeImageSearch(), num_generations=4, lr=2e-6, kl_coef=0.001,
                        rollout=RolloutSettings(max_tokens_per_turn=64))  # fmt: skip
    start = {n: p.detach().float().clone() for n, p in module.model.named_parameters()}
    samples = [s for s in load_samples(FVQA / "fvqa_dev.jsonl") if s.ground_truth == "musketeers"][:1] * 10
    trainer = L.Trainer(max_steps=10, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(samples, batch_size=1, collate_fn=list))
    params = dict(module.model.named_parameters())
    mp = module.model._get_fsdp_state()._mp_policy
    (out / "trained.json").write_text(json.dumps({
        "sharded": all(isinstance(p, DTensor) for p in params.values()),
        "shards": sorted({str(p.to_local().dtype) for p in params.values()}),
        "adamw": sorted({str(s["exp_avg"].dtype) for s in module.optimizers().optimizer.state.values()}),
        "gathered_in": str(mp.param_dtype), "reduced_in": str(mp.reduce_dtype),
        "changed": sum(int((p.full_tensor().float() != start[n]).sum()) for n, p in params.items())
                   / sum(p.numel() for p in params.values()),
    }))  # fmt: skip


@pytest.mark.slow
def test_a_bf16_policy_under_bf16_mixed_trains_fp32_master_shards_gathered_in_bf16(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tests.distributed.test_fsdp2_precision", str(tmp_path)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "trained.json").read_text())
    assert got["sharded"] and got["shards"] == ["torch.float32"] and got["adamw"] == ["torch.float32"]
    assert (got["gathered_in"], got["reduced_in"]) == ("torch.bfloat16", "torch.float32")
    assert got["changed"] > 0.99, got  # bf16 shards: ~0.04 at this lr


if __name__ == "__main__":
    run(Path(sys.argv[1]))
