"""Web reverse image search: SerpAPI Google Lens -> top-k (thumbnail, title), thumbnails fetched concurrently.

Lens needs a public URL of the question's image: the row's ``image_url`` when it has one, else an
``ImageHost`` hook that returns one (FVQA rows have none, spec §8; a cropped region never has one):
``URLTemplateHost`` for images already published under their row id, ``mmsr.tools.web.host.UploadHost`` to
upload the image (or region) itself. A host that fails is a failure observation, like a failed search.
Thumbnails come from third-party URLs, so they are fetched through the SSRF guard with byte and pixel caps;
a match whose thumbnail fails is skipped and the next one takes its place (as upstream: up to k *valid*
pairs, spec §6). The call runs against
the caller's deadline (``ToolRequest.budget_s``, see ``mmsr.tools.budget``): the Lens call may use what is
left after one thumbnail attempt, and the thumbnails not loaded by the deadline are skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from functools import partial
from typing import Any, Protocol

from PIL import Image

from mmsr.tools.base import ToolRequest, ToolResult, changed_settings, failure, part_settings
from mmsr.tools.budget import Deadline, Stage, check_stages
from mmsr.tools.format import image_results
from mmsr.tools.web import guard
from mmsr.tools.web.http import HTTPClient, Limits, ToolError
from mmsr.tools.web.images import cut_short, fetch_image
from mmsr.tools.web.providers import SerpAPILens, VisualMatch


class ImageHost(Protocol):
    """Gives the question's image a public URL (upload, or a known location); ``None`` if it has none,
    ``ToolError`` if publishing failed. Optional: ``stages()`` (its HTTP stage, for the time budget) and
    ``metrics()``."""

    async def __call__(self, request: ToolRequest) -> str | None: ...


class URLTemplateHost:
    """Images already published under their row id, e.g. ``https://bucket.example/fvqa/{sample_id}.jpg``.

    Args:
        template: a URL with ``{sample_id}``.
    """

    def __init__(self, template: str) -> None:
        if "{sample_id}" not in template:
            raise ValueError(f"URLTemplateHost template {template!r} has no '{{sample_id}}'")
        self.template = template

    async def __call__(self, request: ToolRequest) -> str | None:
        return self.template.replace("{sample_id}", request.sample_id) if request.sample_id else None


class WebImageSearch:
    """``SearchTool`` for ``<search><img></search>`` over a Lens provider.

    Args:
        provider: a ``SerpAPILens``.
        image_host: gives rows without ``image_url`` a public URL; ``None``: such rows get a failure observation.
        top_k: results wanted (MMSearch-R1: 5).
        max_candidates: matches whose thumbnails are tried at most.
        max_pixels: thumbnails with more pixels are skipped (checked before decoding).
        max_side: thumbnails are shrunk to this longest side (aspect kept).
        allow_private: let thumbnail URLs point at loopback/private addresses (tests only).
        thumbnail_limits: timeouts, retries, concurrency and byte cap of thumbnail downloads.
        reserve_s: seconds of the caller's budget kept back to build the answer and return it in time.
    """

    def __init__(self, provider: SerpAPILens, image_host: ImageHost | None = None, top_k: int = 5,
                 max_candidates: int = 10, max_pixels: int = 4_000_000, max_side: int = 512,
                 allow_private: bool = False,
                 thumbnail_limits: Limits = Limits(timeout_s=15.0, retries=1, concurrency=16, breaker_failures=0,
                                                   max_bytes=2_000_000),
                 reserve_s: float = 1.0) -> None:  # fmt: skip
        if top_k < 1 or max_candidates < top_k:
            raise ValueError(f"need 1 <= top_k <= max_candidates, got top_k={top_k}, max_candidates={max_candidates}")
        self.provider, self.image_host, self.top_k, self.max_candidates = provider, image_host, top_k, max_candidates
        self.max_pixels, self.max_side, self.allow_private = max_pixels, max_side, allow_private
        self.provider_name, self.reserve_s = provider.name, reserve_s
        self.thumbnails = HTTPClient("thumbnails", thumbnail_limits, connector=partial(guard.connector, allow_private))
        self.counts: Counter[str] = Counter()

    def stages(self) -> list[Stage]:
        """The nested steps of one call, in order, with their limits."""
        host = self.image_host.stages() if hasattr(self.image_host, "stages") else []
        lens = Stage(self.provider.name, self.provider.client.limits)
        return [*host, lens, Stage("thumbnails", self.thumbnails.limits)]

    def cache_settings(self) -> dict[str, Any]:
        """Its settings and its provider's that shape its answers, where not the default: a ``CachedTool`` keys on
        them (``mmsr.tools.cache.settings_version``). Not the image host: the cache keys on the image itself."""
        return changed_settings(self, top_k=self.top_k, max_candidates=self.max_candidates, max_pixels=self.max_pixels,
                                max_side=self.max_side, provider=part_settings(self.provider))  # fmt: skip

    def check_budget(self, cap_s: float) -> None:
        """``BudgetError`` unless one Lens attempt and one thumbnail attempt fit in ``cap_s``."""
        check_stages("WebImageSearch", self.stages(), self.reserve_s, cap_s)

    async def __call__(self, request: ToolRequest) -> ToolResult:
        start = time.perf_counter()
        deadline = Deadline.after(request.budget_s, self.reserve_s)
        try:
            url = request.image_url or await self._publish(request, deadline)
        except ToolError as exc:
            self.counts["publish_failed"] += 1
            reason = f"the image could not be published: {exc.reason}"
            return failure("image_search", reason, time.perf_counter() - start, sent=False)
        if not url:
            reason = "the image has no public URL to search with"
            return failure("image_search", reason, time.perf_counter() - start, sent=False)
        try:
            found = await deadline.run(self.provider.search(url), "the search", keep_s=self.thumbnails.limits.timeout_s)
            matches = found[: self.max_candidates]
        except ToolError as exc:
            self.counts["search_failed"] += 1
            if exc.kind == "deadline":
                self.counts["search_deadline"] += 1
            # A call that never went out (open circuit, no time left) was not billed: charging it would let a
            # dead provider use up the run's dollar budget.
            return self._failed(exc.reason, start, self.provider.cost_per_call if exc.sent else 0.0, exc.sent)
        fetched = await asyncio.gather(*(self._thumbnail(m, deadline) for m in matches))
        kept = [(m, im) for m, im in zip(matches, fetched) if isinstance(im, Image.Image)][: self.top_k]
        if matches and not kept:
            reason = f"none of the {len(matches)} result images could be loaded"
            return self._failed(reason, start, self.provider.cost_per_call)
        return ToolResult(
            text=image_results([m.title for m, _ in kept]),
            images=tuple(im for _, im in kept),
            titles=tuple(m.title for m, _ in kept),
            cost=self.provider.cost_per_call,
            latency_s=time.perf_counter() - start,
            partial=cut_short(fetched, self.top_k),
        )

    async def _publish(self, request: ToolRequest, deadline: Deadline) -> str | None:
        """The image host's URL for the request's image, leaving one Lens and one thumbnail attempt their time."""
        if self.image_host is None:
            return None
        keep = self.provider.client.limits.timeout_s + self.thumbnails.limits.timeout_s
        return await deadline.run(self.image_host(request), "the image upload", keep_s=keep)

    def _failed(self, reason: str, start: float, cost: float, sent: bool = True) -> ToolResult:
        latency = time.perf_counter() - start
        return ToolResult(failure("image_search", reason).text, ok=False, cost=cost, latency_s=latency, sent=sent)

    async def _thumbnail(self, match: VisualMatch, deadline: Deadline) -> Image.Image | ToolError:
        """The match's thumbnail, or why it was skipped (counted; the caller needs the why for caching)."""
        try:
            return await fetch_image(self.thumbnails, match.thumbnail, self.max_pixels, self.allow_private, deadline,
                                     self.max_side)  # fmt: skip
        except ToolError as exc:
            self.counts[f"thumbnail_{exc.kind}"] += 1
            return exc

    def metrics(self) -> dict[str, float]:
        own = {f"tools/image_search/{k}": float(v) for k, v in sorted(self.counts.items())}
        host = self.image_host.metrics() if hasattr(self.image_host, "metrics") else {}
        return own | self.provider.metrics() | self.thumbnails.metrics() | host
