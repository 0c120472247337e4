"""Group-relative advantage estimators (GRPO, Dr. GRPO, RLOO).

Every prompt is rolled out several times; the rollouts of one prompt form a group and each
rollout's advantage is its reward measured against the rest of its group, so no value model
is needed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Estimator = Literal["grpo", "drgrpo", "rloo"]
ESTIMATORS: tuple[str, ...] = ("grpo", "drgrpo", "rloo")


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    estimator: Estimator = "grpo",
    eps: float = 1e-6,
) -> Tensor:
    """Advantage of every trajectory relative to the other trajectories of its group.

    Args:
        rewards: [N] scalar reward per trajectory.
        group_ids: [N] integer id of the group (prompt) each trajectory belongs to. Groups
            need not be contiguous, sorted or of equal size.
        estimator: "grpo": (r - mean) / (std + eps), std with Bessel's correction (as
            torch.std); "drgrpo": r - mean (Dr. GRPO drops the std to avoid favouring
            easy/hard prompts); "rloo": r - mean of the *other* members of the group.
        eps: added to the std in "grpo" so a group of identical rewards gives 0, not NaN.

    Returns:
        [N] advantages in the floating dtype of ``rewards`` (float32 for integer rewards).
        A trajectory alone in its group has nothing to be compared with and gets 0, and so does every
        trajectory of a group whose rewards are all equal: in float32 the mean of eight 0.91s is an ulp
        off 0.91, and GRPO's ``dev / (std + eps)`` turned that rounding into +0.056 for every episode.
    """
    _check_inputs(rewards, group_ids, estimator)
    r = rewards if rewards.is_floating_point() else rewards.float()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(r.dtype)
    mean = _group_sum(r, inverse, n.numel()) / n
    dev = r - mean[inverse]
    singleton = (n == 1)[inverse]
    if estimator == "drgrpo":
        adv = dev
    elif estimator == "rloo":
        # r - (S - r)/(n - 1) rearranges to n/(n - 1) * (r - mean); clamp keeps n = 1 finite.
        adv = dev * (n / (n - 1).clamp(min=1))[inverse]
    else:
        # Two-pass variance (deviations first) stays accurate when rewards share a large offset.
        var = _group_sum(dev * dev, inverse, n.numel()) / (n - 1).clamp(min=1)
        adv = dev / (var.sqrt()[inverse] + eps)
    return torch.where(singleton | _uniform(r, inverse, n.numel())[inverse], torch.zeros_like(adv), adv)


def _uniform(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """[G] whether every value of a group is the same (its min equals its max; exact, unlike the std)."""
    lo = values.new_full((num_groups,), float("inf")).scatter_reduce(0, inverse, values, "amin")
    hi = values.new_full((num_groups,), float("-inf")).scatter_reduce(0, inverse, values, "amax")
    return lo == hi


def _group_sum(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """Sum of ``values`` [N] per group; ``inverse`` [N] maps rows to 0..G-1. Returns [G]."""
    return values.new_zeros(num_groups).index_add(0, inverse, values)


def _check_inputs(rewards: Tensor, group_ids: Tensor, estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ESTIMATORS}")
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be 1-D of shape [N]; got rewards "
            f"{tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor; got dtype {group_ids.dtype}")
