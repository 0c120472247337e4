"""``StepRollout``: the record of one GRPO training step, for observers (logging callbacks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmsr.data.sample import Sample
from mmsr.rollout.trajectory import Trajectory


@dataclass
class StepRollout:
    """What one training step rolled out and how it was scored (read by logging callbacks).

    Attributes:
        trajectories: N episodes; ``samples[t.group_id]`` is each one's prompt.
        rewards: ``[N]``; advantages: ``[N]``; details: per-trajectory reward terms.
    """

    trajectories: list[Trajectory]
    samples: list[Sample]
    rewards: torch.Tensor
    advantages: torch.Tensor
    details: list[dict[str, float]]
