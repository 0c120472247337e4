"""AdamW plus an LR schedule from ``mmsr.algo.schedule``, shared by the GRPO and SFT modules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from mmsr.algo import make_lr_lambda

Schedule = Literal["constant", "cosine", "sigmoid"]


def adamw_with_schedule(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, schedule: Schedule,
                        warmup_steps: int, total_steps: int):  # fmt: skip
    """Lightning's ``configure_optimizers`` return value; the schedule steps once per training step."""
    # foreach: the single-tensor update's arithmetic, bit for bit, in a few kernel calls per step instead of ~10
    # per tensor (torch chooses it by itself only on GPUs; on the CPU demo's 68 tensors 4.5 ms a step, not 6)
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, foreach=True)
    kwargs = {"cosine": dict(warmup_steps=warmup_steps, total_steps=total_steps)}.get(schedule, {})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(schedule, **kwargs))
    return [opt], [{"scheduler": sched, "interval": "step"}]
