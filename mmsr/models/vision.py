"""``VisionInput``: one image as the policy sees it (made by ``Policy.process_image``, carried by
trajectories, fed back to the model by the trainer and the engines)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass(frozen=True)
class VisionInput:
    """One image as the policy sees it.

    Attributes:
        image: the PIL image (for logs and for engines that process images themselves).
        pixel_values: ``[P, D]`` flattened patches (P = grid_t * grid_h * grid_w).
        grid_thw: ``(t, h, w)`` patch grid; the image occupies ``t*h*w // merge**2`` tokens.
        num_tokens: number of image-pad tokens it expands to in the sequence.
    """

    image: Image.Image
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    num_tokens: int
