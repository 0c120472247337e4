"""Training token ids -> the inputs vLLM takes, with the check that both describe the same images.

The trajectory (and the training forward) holds every image expanded to its ``num_tokens``
``<|image_pad|>`` tokens. vLLM takes the *raw* prompt instead: one ``<|image_pad|>`` per image plus
the PIL images, and expands each pad itself from the grid its own processor computes. If the two
disagree (a missing or reordered image, a run cut by truncation, a pad the model sampled, another
resize), vLLM fails with "Image features and image tokens do not match" (MMSearch-R1 issue #20) or,
worse, silently attends to the wrong image. So the collapse checks every image run against its
``VisionInput`` and fails loudly, and the images handed to vLLM are resized to exactly the trainer's
patch grid so vLLM's processor can only arrive at the same token count.

Pure functions (no vLLM import): tested without vLLM, and through vLLM's CPU build with a tiny
Qwen2.5-VL (``tests/rollout/test_vllm_vision.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from mmsr.models.vision import VisionInput, pixel_bounds  # noqa: F401 - pixel_bounds: vLLM's processor kwargs, imported from here


class ImageTokenMismatch(ValueError):
    """The expanded image tokens of a context disagree with its images."""


@dataclass(frozen=True)
class ImageTokenIds:
    """The ids of the tokens that frame an image: ``<|vision_start|> <|image_pad|>*n <|vision_end|>``."""

    pad: int
    start: int
    end: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ImageTokenIds:
        ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError("tokenizer lacks <|image_pad|>/<|vision_start|>/<|vision_end|>: not a Qwen2.5-VL tokenizer")
        return cls(*(int(i) for i in ids))


@dataclass(frozen=True)
class EngineInput:
    """One context as vLLM takes it.

    Attributes:
        prompt_token_ids: ``[L']`` the context with each image collapsed to one ``<|image_pad|>``.
        images: the images in context order, resized to their training patch grid.
        num_image_tokens: ``[I]`` how many pads each image expands to in the training sequence.
    """

    prompt_token_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)
    num_image_tokens: list[int] = field(default_factory=list)

    def prompt(self, mm_processor_kwargs: dict | None = None) -> dict:
        """A ``vllm.inputs.TokensPrompt`` (a plain dict, so this module needs no vLLM)."""
        out: dict = {"prompt_token_ids": self.prompt_token_ids}
        if self.images:
            out["multi_modal_data"] = {"image": list(self.images)}
            if mm_processor_kwargs:
                out["mm_processor_kwargs"] = dict(mm_processor_kwargs)
        return out


def image_runs(input_ids: Sequence[int], pad_id: int) -> list[tuple[int, int]]:
    """``(start, end)`` of every maximal run of ``pad_id`` in ``input_ids``, in order."""
    runs, start = [], None
    for i, token in enumerate(list(input_ids) + [None]):
        if token == pad_id and start is None:
            start = i
        elif token != pad_id and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _check_run(input_ids: Sequence[int], run: tuple[int, int], i: int, v: VisionInput, ids: ImageTokenIds) -> None:
    start, end = run
    framed = start > 0 and input_ids[start - 1] == ids.start and end < len(input_ids) and input_ids[end] == ids.end
    if not framed:
        raise ImageTokenMismatch(
            f"image {i}: its <|image_pad|> run at tokens {start}..{end} is not framed by "
            "<|vision_start|> ... <|vision_end|> (a sampled pad, or an image cut by truncation)"
        )
    if end - start != v.num_tokens:
        raise ImageTokenMismatch(
            f"image {i} (grid {v.grid_thw}) needs {v.num_tokens} <|image_pad|> tokens but its run at "
            f"tokens {start}..{end} has {end - start}"
        )


def collapse_image_tokens(input_ids: Sequence[int], vision: Sequence[VisionInput], ids: ImageTokenIds) -> list[int]:
    """Replace each image's run of pads by a single pad, checking every run against its image.

    Args:
        input_ids: ``[L]`` a training-side context, images expanded.
        vision: its images in context order.
    Returns:
        ``[L - sum(num_tokens) + I]`` the raw ids vLLM expands again.
    Raises:
        ImageTokenMismatch: runs and images differ in number, framing or length.
    """
    runs = image_runs(input_ids, ids.pad)
    if len(runs) != len(vision):
        raise ImageTokenMismatch(
            f"context has {len(runs)} <|image_pad|> runs but {len(vision)} images; each image must be "
            "one run of pads framed by <|vision_start|>/<|vision_end|>"
        )
    out, prev = [], 0
    for i, (run, v) in enumerate(zip(runs, vision)):
        _check_run(input_ids, run, i, v, ids)
        out += list(input_ids[prev : run[0]]) + [ids.pad]
        prev = run[1]
    return out + list(input_ids[prev:])


def expand_image_tokens(raw_ids: Sequence[int], num_tokens: Sequence[int], pad_id: int) -> list[int]:
    """What vLLM does to raw ids: the i-th pad becomes ``num_tokens[i]`` pads. ``[L']`` -> ``[L]``."""
    pads = [i for i, t in enumerate(raw_ids) if t == pad_id]
    if len(pads) != len(num_tokens):
        raise ImageTokenMismatch(f"{len(pads)} <|image_pad|> tokens in the raw prompt but {len(num_tokens)} images")
    out, prev = [], 0
    for pos, n in zip(pads, num_tokens):
        out += list(raw_ids[prev:pos]) + [pad_id] * n
        prev = pos + 1
    return out + list(raw_ids[prev:])


def grid_image(v: VisionInput, patch_size: int) -> Image.Image:
    """``v.image`` resized to exactly its training patch grid (``grid_w * patch`` x ``grid_h * patch``).

    Resizing is what the trainer's processor did first; handing vLLM the resized image makes its
    own resize an identity, so its grid, and so its pad count, cannot differ from ``v``'s.
    """
    _, h, w = v.grid_thw
    size = (w * patch_size, h * patch_size)
    image = v.image.convert("RGB")
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


class GridImages:
    """``grid_image`` made once per ``VisionInput`` for as long as it lives.

    Every turn of every episode sends vLLM its whole context again, images included, and the ``n``
    episodes of a GRPO group share their question image's ``VisionInput`` (``ProcessedImages``): without
    this, each request converted and resized the question image anew (~10 ms for a 1024x768 picture),
    on the rollout's thread, while the engine waited. An entry goes when its ``VisionInput`` does.

    Args:
        patch_size: the vision tower's patch side in pixels.
    """

    def __init__(self, patch_size: int = 14) -> None:
        self.patch_size = patch_size
        self._made: dict[int, Image.Image] = {}

    def __call__(self, v: VisionInput) -> Image.Image:
        key = id(v)
        if key not in self._made:
            self._made[key] = grid_image(v, self.patch_size)
            # dropped while ``v`` is freed, so a later object given the same id never finds it
            weakref.finalize(v, self._made.pop, key, None)
        return self._made[key]

    def __len__(self) -> int:
        return len(self._made)


def engine_input(input_ids: Sequence[int], vision: Sequence[VisionInput], ids: ImageTokenIds | None,
                 patch_size: int = 14, grids: GridImages | None = None) -> EngineInput:  # fmt: skip
    """Build vLLM's input for one context and check it against the training view.

    ``ids`` is None for a text-only policy, whose contexts must hold no images. ``grids`` (an engine's,
    of the same ``patch_size``) hands out each image resized once; without it every call resizes.
    """
    if ids is None:
        if vision:
            raise ImageTokenMismatch(f"a text-only policy got a context with {len(vision)} images")
        return EngineInput(list(input_ids))
    raw = collapse_image_tokens(input_ids, vision, ids)
    counts = [v.num_tokens for v in vision]
    if expand_image_tokens(raw, counts, ids.pad) != list(input_ids):  # the round trip vLLM will make
        raise ImageTokenMismatch("raw prompt ids do not expand back to the training ids")
    images = [grid_image(v, patch_size) for v in vision] if grids is None else [grids(v) for v in vision]
    return EngineInput(raw, images, counts)
