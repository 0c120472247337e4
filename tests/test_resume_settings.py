"""A resumed run trains at the config's lr and weight decay, not the checkpoint's: Lightning restores the optimizer's
param groups (``lr``, ``initial_lr``, ``weight_decay``) and the schedule's ``base_lrs`` after ``configure_optimizers``,
so a run resumed with ``--model.lr 0.5`` kept training at the checkpoint's 1e-3 while its config.yaml said 0.5.
The schedule keeps its position: step k trains at ``lr * lambda(k)``."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from mmsr.algo import make_lr_lambda
from mmsr.demo.teacher import RAGTeacher
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.rollout.loop import RolloutSettings
from mmsr.sft import SFTModule
from tests.callbacks.scripted_run import run
from tests.conftest import FVQA

STEPS, RESUME_AT = 4, 2
COSINE = make_lr_lambda("cosine", warmup_steps=0, total_steps=STEPS)  # lambda(2) = 0.5, lambda(3) ~ 0.15


def logged_lr(root: Path) -> dict[int, float]:
    """step -> ``train/lr`` of the run's metrics.csv."""
    (version,) = (root / "csv").iterdir()
    with (version / "metrics.csv").open(newline="") as f:
        return {int(row["step"]): float(row["train/lr"]) for row in csv.DictReader(f) if row.get("train/lr")}


def test_a_grpo_run_resumed_with_another_lr_trains_at_it(tmp_path):
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}"}}  # fmt: skip
    schedule = ["--model.lr_schedule", "cosine", "--model.total_steps", str(STEPS)]
    run(tmp_path / "a", "--trainer.callbacks", json.dumps([ckpt]), "--trainer.enable_checkpointing", "true",
        "--trainer.max_steps", str(RESUME_AT), *schedule)  # fmt: skip
    cli = run(tmp_path / "b", "--trainer.max_steps", str(STEPS), *schedule, "--model.lr", "0.5", "--model.weight_decay",
              "0.1", "--ckpt_path", str(tmp_path / "ckpt" / f"step={RESUME_AT}.ckpt"))  # fmt: skip
    assert logged_lr(tmp_path / "a") == pytest.approx({k: 1e-3 * COSINE(k) for k in range(RESUME_AT)}, rel=1e-6)
    # was 1e-3 * lambda(k): the checkpoint's lr, at the schedule's position
    assert logged_lr(tmp_path / "b") == pytest.approx({k: 0.5 * COSINE(k) for k in range(RESUME_AT, STEPS)}, rel=1e-6)
    (group,) = cli.trainer.optimizers[0].param_groups
    assert (group["initial_lr"], group["weight_decay"]) == (0.5, 0.1)
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [0.5]


class RecordOptimizer(Callback):
    """Each step's lr and weight_decay, as its optimizer step will use them."""

    def __init__(self) -> None:
        self.lr: list[float] = []
        self.weight_decay: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        (group,) = trainer.optimizers[0].param_groups
        self.lr.append(group["lr"])
        self.weight_decay.append(group["weight_decay"])


def warm_start(tmp_path: Path, samples, lr: float, weight_decay: float, ckpt_path: Path | None = None) -> RecordOptimizer:
    """A tiny warm start of ``STEPS`` steps on a cosine schedule, checkpointed every step into ``tmp_path``;
    returns each step's lr and weight_decay."""
    policy = TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], scaffold=Scaffold(), hidden_size=32,
                            num_layers=1, vision_depth=1, seed=0)  # fmt: skip
    module = SFTModule(policy, RAGTeacher(seed=0), lr=lr, weight_decay=weight_decay, lr_schedule="cosine",
                       total_steps=STEPS, rollout=RolloutSettings(max_rounds=2, max_tokens_per_turn=16, max_context_tokens=512))  # fmt: skip
    record = RecordOptimizer()
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record, ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1)])  # fmt: skip
    # one batch an epoch: a checkpoint ends an epoch, so the resumed run starts on the next batch
    trainer.fit(module, DataLoader(samples[:2], batch_size=2, collate_fn=list), ckpt_path=ckpt_path)
    return record


def test_a_warm_start_resumed_with_another_lr_trains_at_it(tmp_path, fvqa_samples):
    first = warm_start(tmp_path / "a", fvqa_samples, lr=1e-3, weight_decay=0.0)
    resumed = warm_start(tmp_path / "b", fvqa_samples, lr=0.5, weight_decay=0.1, ckpt_path=tmp_path / "a" / f"step={RESUME_AT}.ckpt")
    assert first.lr == pytest.approx([1e-3 * COSINE(k) for k in range(STEPS)]) and first.weight_decay == [0.0] * STEPS
    # were the checkpoint's: 1e-3 * lambda(k) and 0
    assert resumed.lr == pytest.approx([0.5 * COSINE(k) for k in range(RESUME_AT, STEPS)])
    assert resumed.weight_decay == [0.1] * (STEPS - RESUME_AT)
