"""AdamW plus an LR schedule from ``mmsr.algo.schedule``, shared by the GRPO and SFT modules, and the guard that
skips an update whose gradient norm is not finite (``NonfiniteGuard``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from mmsr.algo import make_lr_lambda
from mmsr.checks import Limit

Schedule = Literal["constant", "cosine", "sigmoid"]


def check_schedule(schedule: Schedule, warmup_steps: int, total_steps: int) -> None:
    """Refuse a warmup the schedule would ignore: only ``cosine`` warms up (``make_lr_lambda`` refuses one for
    the others too), and a ``warmup_steps`` that silently does nothing is a run that is not the one configured.
    A cosine warmup longer than the schedule is refused here too: ``make_lr_lambda`` refused it only in
    ``configure_optimizers``, after the policy was built (and, under ``mmsr fit``, the trainer)."""
    if warmup_steps > 0 and schedule != "cosine":
        raise ValueError(f"warmup_steps={warmup_steps} needs lr_schedule: cosine; the {schedule!r} schedule has no warmup")
    if schedule == "cosine" and 0 < total_steps < warmup_steps:  # a total_steps < 1 is refused as out of range
        raise ValueError(f"model.warmup_steps={warmup_steps} > model.total_steps={total_steps}: the cosine lr schedule "
                         "warms up over warmup_steps training steps and decays to 0 by total_steps; set "
                         f"model.warmup_steps <= model.total_steps")  # fmt: skip


def optimizer_limits(lr: float, weight_decay: float, warmup_steps: int, total_steps: int) -> list[Limit]:
    """The ranges of ``adamw_with_schedule``'s arguments, checked by the modules before the policy is built."""
    return [("lr", lr, lr > 0, "> 0"), ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
            ("warmup_steps", warmup_steps, warmup_steps >= 0, ">= 0"),
            ("total_steps", total_steps, total_steps >= 1, ">= 1")]  # fmt: skip


def adamw_with_schedule(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, schedule: Schedule,
                        warmup_steps: int, total_steps: int):  # fmt: skip
    """Lightning's ``configure_optimizers`` return value; the schedule steps once per training step."""
    check_schedule(schedule, warmup_steps, total_steps)
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


class NonfiniteGuard:
    """Skips an optimizer update whose gradient norm is not finite, as veRL's ``dp_actor`` does; stops the run
    after ``limit`` in a row.

    One inf or NaN gradient element (a bf16 overflow, an outlier in the loss) makes the norm non-finite, and
    ``clip_grad_norm_`` then scales every gradient by 0 or NaN: AdamW wrote NaN into every weight and the run
    trained on, logging nan. The norm is the global one (FSDP2's ``clip_grad_norm_`` reduces it over the ranks;
    DDP's gradients are averaged before it), so every rank skips the same updates.

    Args:
        owner: the module named in warnings and the error.
        outlier: the outlier that can cause it, in words (GRPO: a reward or advantage).
    """

    def __init__(self, owner: str, outlier: str, limit: int = 5) -> None:
        self.owner, self.outlier, self.limit = owner, outlier, limit
        self.in_a_row = 0  # non-finite norms since the last applied update

    def state_dict(self) -> dict[str, int]:
        """The count a resume continues: a run stopped in the middle of a streak restarted it at 0 and ran on for up
        to ``limit`` more skipped updates (the same on every rank: the norm is the global one)."""
        return {"in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        """Absent from checkpoints written before the count was saved: it starts at 0, as it did."""
        self.in_a_row = int((state or {}).get("in_a_row", 0))

    def step(self, optimizer: Any, grad_norm: float, global_step: int) -> bool:
        """``optimizer.step()`` if ``grad_norm`` is finite (nothing else: the finite path is unchanged); else drop
        the gradients and warn, naming ``global_step``. Returns whether the update was skipped.

        A skipped update still calls ``optimizer.step()`` with no gradient: AdamW changes no weight and no state
        (moments, step count) for a parameter without one, and Lightning's wrapper counts it, so ``global_step``
        and ``trainer.max_steps`` go on counting updates as in a run without it.

        Raises:
            FloatingPointError: the ``limit``-th skipped update in a row.
        """
        if math.isfinite(grad_norm):
            self.in_a_row = 0
            optimizer.step()
            return False
        self.in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.owner}: the gradient norm was not finite ({grad_norm}) for {self.in_a_row} optimizer updates "
                f"in a row, the last at global_step {global_step}; they were skipped (the weights are as before them). "
                f"Check model.lr (too high?), bf16 precision (trainer.precision: bf16-mixed or model.compute_dtype; "
                f"32-true to compare) and {self.outlier}")  # fmt: skip
        rank_zero_warn(f"{self.owner}: the gradient norm at global_step {global_step} is {grad_norm}: update skipped "
                       f"({self.in_a_row} in a row; {self.limit} stop the run)")  # fmt: skip
        optimizer.step()  # no gradients: counts the update and changes nothing
        return True
