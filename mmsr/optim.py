"""AdamW plus an LR schedule from ``mmsr.algo.schedule``, shared by the GRPO and SFT modules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from mmsr.algo import make_lr_lambda
from mmsr.checks import Limit

Schedule = Literal["constant", "cosine", "sigmoid"]


def check_schedule(schedule: Schedule, warmup_steps: int) -> None:
    """Refuse a warmup the schedule would ignore: only ``cosine`` warms up (``make_lr_lambda`` refuses one for
    the others too), and a ``warmup_steps`` that silently does nothing is a run that is not the one configured."""
    if warmup_steps > 0 and schedule != "cosine":
        raise ValueError(f"warmup_steps={warmup_steps} needs lr_schedule: cosine; the {schedule!r} schedule has no warmup")


def optimizer_limits(lr: float, weight_decay: float, warmup_steps: int, total_steps: int) -> list[Limit]:
    """The ranges of ``adamw_with_schedule``'s arguments, checked by the modules before the policy is built."""
    return [("lr", lr, lr > 0, "> 0"), ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0"),
            ("total_steps", total_steps, total_steps >= 1, ">= 1")]  # fmt: skip


def adamw_with_schedule(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, schedule: Schedule,
                        warmup_steps: int, total_steps: int):  # fmt: skip
    """Lightning's ``configure_optimizers`` return value; the schedule steps once per training step."""
    check_schedule(schedule, warmup_steps)
    # foreach: the single-tensor update's arithmetic, bit for bit, in a few kernel calls per step instead of ~10
    # per tensor (torch chooses it by itself only on GPUs; on the CPU demo's 68 tensors 4.5 ms a step, not 6)
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, foreach=True)
    kwargs = {"cosine": dict(warmup_steps=warmup_steps, total_steps=total_steps)}.get(schedule, {})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(schedule, **kwargs))
    return [opt], [{"scheduler": sched, "interval": "step"}]


def reapply_configured(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float,
                       weight_decay: float) -> None:  # fmt: skip
    """Set the configured ``lr`` and ``weight_decay`` on an optimizer and schedule restored from a checkpoint,
    at the schedule's position: each group's rate becomes ``lr * lambda(last_epoch)``.

    Lightning loads a checkpoint's optimizer state (each group's ``lr``, ``initial_lr``, ``weight_decay``) and
    schedule state (``base_lrs``) after ``configure_optimizers``, so a run resumed with another lr trained at the
    checkpoint's while its config.yaml and loggers showed the new one. The modules call this in ``on_train_start``,
    which runs after the restore (and changes nothing in a fresh run)."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group.update(initial_lr=lr, weight_decay=weight_decay, lr=lr * lr_lambda(scheduler.last_epoch))
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
