"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

Each function maps the schedule's step (0 for the first) to a multiplier of the base learning
rate. ``GRPOModule`` steps the schedule once per training step (``update_policy``), so its
``ppo_epochs x mini_batches`` optimizer updates share one rate and ``warmup_steps`` / ``total_steps``
count training steps, not updates (``trainer.max_steps`` counts those); ``SFTModule`` steps it once per
optimizer update. ``make_lr_lambda`` binds the keyword arguments with ``functools.partial`` (not a
closure) so the result pickles for spawned workers and LambdaLR can checkpoint it.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Literal

ScheduleName = Literal["constant", "cosine", "sigmoid"]


def constant(step: int) -> float:
    """Multiplier 1.0 at every step."""
    return 1.0


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1, then half a cosine down to ``min_ratio`` at ``total_steps``.

    Warmup gives (step + 1) / warmup_steps, so step 0 is 1/warmup_steps and step
    warmup_steps - 1 reaches 1.0. LambdaLR uses the step-0 value for the first step's updates;
    starting from exactly 0 would waste a whole rollout batch on an update of size zero.
    From warmup_steps on, the multiplier is min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2
    with p = (step - warmup_steps) / (total_steps - warmup_steps), held at min_ratio after.
    """
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps; got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1]; got {min_ratio}")
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sigmoid_decay(step: int, ratio: float = 0.95, center: float = 45, scale: float = 4.5) -> float:
    """MMSearch-R1's schedule: ratio / (1 + exp((step - center) / scale)) + (1 - ratio).

    With the defaults: ~1.0 until step ~30, 0.525 at step 45, ~0.08 at step 60, then 0.05.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0; got {scale}")
    x = (step - center) / scale
    # math.exp overflows past ~709; evaluate the logistic on the side where exp(-|x|) <= 1.
    sig = 1.0 / (1.0 + math.exp(x)) if x <= 0 else math.exp(-x) / (1.0 + math.exp(-x))
    return ratio * sig + (1.0 - ratio)


_SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "cosine": cosine_with_warmup,
    "sigmoid": sigmoid_decay,
}


def make_lr_lambda(name: ScheduleName, **kwargs: float) -> Callable[[int], float]:
    """``step -> multiplier`` for LambdaLR; kwargs go to the schedule ("cosine": warmup_steps,
    total_steps, min_ratio; "sigmoid": ratio, center, scale; "constant": none).

    Bad names, unknown or missing kwargs and invalid values raise ValueError here, at
    configuration time, rather than at the first scheduler step.
    """
    if name not in _SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; expected one of {tuple(_SCHEDULES)}")
    fn = _SCHEDULES[name]
    try:
        inspect.signature(fn).bind(0, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for lr schedule {name!r}: {err}") from None
    lr_lambda = functools.partial(fn, **kwargs)
    lr_lambda(0)
    return lr_lambda
