"""``VisionInput``: one image as the policy sees it (made by ``Policy.process_image``, carried by
trajectories, fed back to the model by the trainer and the engines)."""

from __future__ import annotations

from collections.abc import Sequence
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


def distinct_images(vision: Sequence[VisionInput]) -> tuple[list[VisionInput], list[int]]:
    """The distinct images of ``vision`` in order of first appearance, and for each image the index of
    its distinct one. Images are one when their grids and pixels are equal: compared by content, not by
    object, so the answer does not depend on which copies a run happened to share (runs repeat bit for
    bit)."""
    distinct: list[VisionInput] = []
    which: list[int] = []
    seen: dict[tuple, list[int]] = {}
    for v in vision:
        # exact sampled values (a float sum would depend on the memory's alignment)
        bucket = seen.setdefault((v.grid_thw, tuple(v.pixel_values.flatten()[::997].tolist())), [])
        k = next((k for k in bucket if distinct[k] is v or torch.equal(distinct[k].pixel_values, v.pixel_values)), None)
        if k is None:
            k = len(distinct)
            bucket.append(k)
            distinct.append(v)
        which.append(k)
    return distinct, which


def _bounds(image_processor) -> tuple[int | None, int | None]:
    # transformers 5 keeps them in ``size.shortest_edge`` / ``size.longest_edge``; older versions as attributes
    size = getattr(image_processor, "size", None)
    low = getattr(image_processor, "min_pixels", None) or getattr(size, "shortest_edge", None)
    high = getattr(image_processor, "max_pixels", None) or getattr(size, "longest_edge", None)
    return low, high


def pixel_bounds(*image_processors) -> dict[str, int]:
    """``{"min_pixels", "max_pixels"}`` spanning every given Qwen2-VL image processor (question and
    tool images), for vLLM's processor kwargs; empty for text-only policies (``None`` processors).

    One prompt takes one set of kwargs for all its images. Every image reaches vLLM already resized to
    its training grid (``grid_image``: sides multiples of the merged patch), which vLLM's resize keeps
    as it is whenever its pixel count lies within the bounds: so the union of the bounds is safe.
    """
    pairs = [_bounds(p) for p in image_processors if p is not None]
    lows, highs = [lo for lo, _ in pairs if lo], [hi for _, hi in pairs if hi]
    return {k: int(v) for k, v in (("min_pixels", min(lows, default=None)), ("max_pixels", max(highs, default=None))) if v}
