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

    One prompt takes one set of kwargs for all its images: its own are these widened to its images'
    grids (``covering_bounds``).
    """
    pairs = [_bounds(p) for p in image_processors if p is not None]
    lows, highs = [lo for lo, _ in pairs if lo], [hi for _, hi in pairs if hi]
    return {k: int(v) for k, v in (("min_pixels", min(lows, default=None)), ("max_pixels", max(highs, default=None))) if v}


def require_pixels(bounds: dict[str, object], where: str = "") -> None:
    """Refuse a pixel bound (``bounds``: argument name -> value, ``where``: what holds them) that is not a whole number
    >= 1: transformers reads a 0 bound as a missing one, so every image search failed at run time."""
    for name, value in bounds.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}{name} must be a whole number of pixels >= 1, got {value!r}")


def covering_bounds(bounds: dict[str, int], vision: Sequence[VisionInput], patch_size: int) -> dict[str, int]:
    """``bounds`` (``pixel_bounds``) widened so each image of one prompt lies within them at its training grid.

    Every image reaches vLLM already resized to its training grid (``grid_image``: sides multiples of the
    merged patch), which vLLM's resize keeps as it is only when its pixel count lies within the bounds. The
    trainer's grid can lie outside its own processor's bounds (``smart_resize`` rounds each side up to a whole
    merged patch: a 1000x10 banner under 56*56 .. 112*112 trains as 28x560, 15,680 pixels and 20 tokens),
    and vLLM then resized it again to another grid (17 tokens) and the prompt no longer matched the training ids.
    Images within the bounds leave them as they are: vLLM hashes an image with its prompt's processor kwargs
    (encoder and prefix caches), so an ordinary image keeps its cache entries from turn to turn.

    Args:
        bounds: ``{"min_pixels", "max_pixels"}``, either may be missing (then the images' own).
        vision: the prompt's images; none: ``bounds`` as given.
        patch_size: the vision tower's patch side in pixels.
    """
    if not vision:
        return bounds
    pixels = [h * w * patch_size**2 for _, h, w in (v.grid_thw for v in vision)]
    lows = pixels + [bounds["min_pixels"]] if "min_pixels" in bounds else pixels
    highs = pixels + [bounds["max_pixels"]] if "max_pixels" in bounds else pixels
    return {"min_pixels": min(lows), "max_pixels": max(highs)}
