"""Crop: the policy zooms into a region of the question image, which comes back as a new image in context
(DeepMMSearch-R1 crops before searching; OpenSearch-VL trains a crop tool)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from typing import Literal

from PIL import Image

from mmsr.tools.base import IMAGE_MARKER, SearchTool, ToolRequest, ToolResult, failure
from mmsr.tools.cache import ReplayMiss
from mmsr.tools.spec import Tool, ToolSpec

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(rf"\[?{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}\]?")
BoxUnits = Literal["pixels", "relative_1000"]
RELATIVE = 1000  # the side of the coordinate space of "relative_1000" boxes


class Crop(Tool):
    """``<crop>[x1, y1, x2, y2]</crop>``: the box of the question image comes back as a new image, cut from the
    image's own pixels and shown within the question image's pixel bounds (``ToolSpec.region_images``), not as a
    thumbnail. A box that does not parse, is empty, leaves the image or is smaller than ``min_size`` on a side is
    a failure observation saying why.

    The box is in ``box_units``: ``"pixels"`` of the image as the policy sees it (``ToolRequest.image_size``:
    Qwen2.5-VL grounds in the resized image's absolute pixels), or ``"relative_1000"``, 0 to 1000 on each axis
    whatever the image's size (Qwen3-VL grounds in these); the round-1 description says which.

    ``metrics()``: ``tools/crop/cropped``, ``tools/crop/bad_box`` (a box refused) and ``tools/crop/no_image`` (a
    question without an image), since the tool was built.

    Args:
        limit: overrides the spec's per-episode limit (2).
        format_max: overrides the spec's most crops in a well-formed trajectory (the format reward; default: the
            limit, given or the spec's 2).
        min_size: smallest side of a box, in the policy's pixels (a vision patch is 14 or 16).
        penalized: whether a crop counts as a search for the reward's search penalty (``ToolSpec.penalized``).
        box_units: ``"pixels"`` or ``"relative_1000"`` (above): match the policy's grounding, else its boxes
            land elsewhere (a Qwen3-VL box [500, 500, 1000, 1000] in pixels is off a 640x480 image).
    """

    # format_max = limit: a well-formed trajectory may crop as often as the rollout lets it (with format_max 1 a
    # policy that used both allowed crops got format reward 0).
    spec = ToolSpec("crop", "crop", "text", limit=2, instruction="after_crop.txt", metric="crop", with_image=True,
                    format_max=2, description="describe_crop.txt", placeholder="[x1, y1, x2, y2]",
                    region_images=True)  # fmt: skip
    relative_description = "describe_crop_relative.txt"

    # Penalized by default: crops were penalized before this flag existed, and none of the successors we
    # follow (DeepMMSearch-R1's crop-then-search, SenseNova-MARS and OpenSearch-VL's crop tools) is recorded
    # exempting them. The penalty prices API calls (MMSearch-R1 #8) and a crop makes none, but it also stops
    # calls made by habit (without it MMSearch-R1's search ratio went to ~100%) and a crop still costs a
    # round and an image's tokens: `penalized: false` is the researcher's choice.
    def __init__(self, limit: int | None = None, min_size: int = 14, penalized: bool = True,
                 box_units: BoxUnits = "pixels", format_max: int | None = None) -> None:  # fmt: skip
        if box_units not in ("pixels", "relative_1000"):
            raise ValueError(f"{type(self).__name__}: box_units must be 'pixels' or 'relative_1000', got {box_units!r}")
        # a crop's format_max follows a given limit: with limit 1 a second crop is no well-formed turn either
        format_max = limit if format_max is None else format_max
        super().__init__(None, limit, format_max)  # the replaces below start from this instance's spec: both survive
        self.min_size, self.box_units = min_size, box_units
        self.counts: Counter[str] = Counter()
        if not penalized:
            self.spec = replace(self.spec, penalized=False)
        if box_units == "relative_1000":  # the round-1 description tells the policy the unit
            self.spec = replace(self.spec, description=self.relative_description)

    async def __call__(self, request: ToolRequest) -> ToolResult:
        try:
            box, region = self.counted_region(request)
        except ValueError as exc:
            return failure(request.kind, str(exc))
        self.counts["cropped"] += 1
        text = f"[Crop Results] region [{', '.join(f'{v:g}' for v in box)}]: {IMAGE_MARKER}"
        return ToolResult(text, (region,), titles=("crop",))

    def counted_region(self, request: ToolRequest) -> tuple[tuple[float, float, float, float], Image.Image]:
        """``region``, its ValueError counted (``no_image`` or ``bad_box``: how often the policy's boxes miss)."""
        try:
            return self.region(request)
        except ValueError:
            self.counts["no_image" if request.image is None else "bad_box"] += 1
            raise

    def metrics(self) -> dict[str, float]:
        """This tool's counters, ``tools/<its name>/<counter>`` (class docstring)."""
        return {f"tools/{self.spec.name}/{k}": float(v) for k, v in sorted(self.counts.items())}

    def region(self, request: ToolRequest) -> tuple[tuple[float, float, float, float], Image.Image]:
        """The request's box and that region of its image; ValueError says why there is none."""
        if request.image is None:
            raise ValueError("the question has no image to crop")
        size = request.image_size or request.image.size
        box = self.box(request.query, size)
        return box, crop(request.image, box, (RELATIVE, RELATIVE) if self.box_units == "relative_1000" else size)

    def box(self, query: str, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The validated box ``(x1, y1, x2, y2)``, in ``box_units``, of an image the policy sees at ``size =
        (width, height)`` pixels; ValueError says why not (``min_size`` is checked in those pixels)."""
        match = _BOX.fullmatch(query.strip())
        if match is None:
            raise ValueError(f"the box {query!r} is not [x1, y1, x2, y2]")
        x1, y1, x2, y2 = (float(v) for v in match.groups())
        relative = self.box_units == "relative_1000"
        w, h = (RELATIVE, RELATIVE) if relative else size
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            where = f"0..{RELATIVE} (coordinates relative to the image)" if relative else f"the {w}x{h} image"
            raise ValueError(f"the box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is not inside {where} with x1 < x2, y1 < y2")
        if min((x2 - x1) * size[0] / w, (y2 - y1) * size[1] / h) < self.min_size:
            raise ValueError(f"the box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is smaller than {self.min_size} pixels on a side"
                             + (f" of the {size[0]}x{size[1]} image" if relative else ""))  # fmt: skip
        return x1, y1, x2, y2


def crop(image: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int]) -> Image.Image:
    """The region ``box`` (in a ``size`` image's pixels) of ``image``, cut from its own, larger or smaller,
    pixels."""
    sx, sy = image.width / size[0], image.height / size[1]
    x1, y1, x2, y2 = box
    pixels = (round(x1 * sx), round(y1 * sy), max(round(x2 * sx), round(x1 * sx) + 1), max(round(y2 * sy), round(y1 * sy) + 1))
    return image.convert("RGB").crop(pixels)


class CropSearch(Crop):
    """``<crop_search>[x1, y1, x2, y2]</crop_search>``: image search on a region of the question image
    (DeepMMSearch-R1's crop-then-search), the box read and checked as ``Crop``'s.

    ``backend`` gets an ``image_search`` request whose image is the region, with no row id and no image URL,
    so nothing keyed on the row answers for the whole image: local search matches the region, caches key on
    its pixels, replay answers only regions it recorded (a miss, ``ReplayMiss``, is a failure observation here,
    not an error), and web search needs an ``image_host`` that publishes ``request.image`` (without one it is a
    failure). Any other ``FatalToolError`` of the backend (an unreadable cache file, a refused server) stops
    the run as it would for image search.

    ``metrics()``: ``tools/crop_search/`` ``bad_box`` and ``no_image`` (as ``Crop``'s), ``searched`` (regions sent to
    the backend), ``search_failed`` (its answer was a failure) and ``unrecorded_region`` (a replay miss); then the
    backend's own, its image search counters under ``crop_search`` (``tools/crop_search/cache_hits``,
    ``tools/crop_search/api_calls``, ``tools/crop_search/thumbnail_bad_image``): every request it gets is a crop's
    (but ``run_api_calls``/``run_api_cost``, a cache's run budget of image search, which crops spend too). Give it a
    backend of its own (a config does: each entry builds its own); one shared with the ``image_search`` entry
    reports the same counters under both.

    Args:
        backend: the image search (``LocalImageSearch``, ``CachedTool``, ``ReplaySearch``, ``WebImageSearch``).
        limit, min_size, box_units: as ``Crop``'s. It takes no ``penalized``: a crop that searches is a search,
            penalized as image search is.
        format_max: overrides the spec's most crop searches in a well-formed trajectory (default: the limit).

    Its result images are the backend's thumbnails, not the region: its spec leaves ``region_images`` False.
    """

    spec = ToolSpec("crop_search", "crop_search", "text", limit=1, instruction="after_crop_search.txt",
                    metric="crop_search", with_image=True, description="describe_crop_search.txt",
                    placeholder="[x1, y1, x2, y2]")  # fmt: skip
    relative_description = "describe_crop_search_relative.txt"

    def __init__(self, backend: SearchTool, limit: int | None = None, min_size: int = 14,
                 box_units: BoxUnits = "pixels", format_max: int | None = None) -> None:  # fmt: skip
        super().__init__(limit, min_size, box_units=box_units, format_max=format_max)
        self.backend = backend

    async def __call__(self, request: ToolRequest) -> ToolResult:
        try:
            _, region = self.counted_region(request)
        except ValueError as exc:
            return failure(request.kind, str(exc))
        search = replace(request, kind="image_search", query="", image=region, image_url=None, sample_id="",
                         image_size=None)  # fmt: skip
        self.counts["searched"] += 1
        try:
            result = await self.backend(search)
        except ReplayMiss as exc:  # a box nobody recorded (the policy picks them freely); other fatal errors stop
            self.counts["unrecorded_region"] += 1
            return failure(request.kind, f"no results for this region ({exc})")
        if not result.ok:
            self.counts["search_failed"] += 1
        return result

    def metrics(self) -> dict[str, float]:
        """Its own counters, then the backend's, those of image search renamed to this tool's (class docstring)."""
        out = super().metrics()
        for key, value in (self.backend.metrics() if hasattr(self.backend, "metrics") else {}).items():
            searched = key.removeprefix("tools/image_search/")
            out[key if searched == key else f"tools/{self.spec.name}/{searched}"] = value
        return out
