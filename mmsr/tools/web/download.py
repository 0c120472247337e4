"""Downloading evaluation images that a set gives only as URLs (``ColumnMapping(download=...)``, see
``mmsr.data.columns`` for why this is opt-in).

Each URL is fetched through an ``HTTPClient`` (per-attempt timeout, retries with backoff on 429 / 5xx /
timeouts / broken connections, a concurrency cap, a byte cap) behind the SSRF guard (a data file is third-party
input too), refused before decoding when it has more than ``max_pixels`` pixels, and stored in a SQLite
``ToolCache`` under its URL, as the FVQA cache stores its thumbnails: a set's images are fetched once per
cache file, and reruns read them offline. Failures are not cached (a server may be back tomorrow).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from functools import partial

from mmsr.data.columns import Fetched
from mmsr.tools.base import IMAGE_MARKER, ToolResult
from mmsr.tools.cache import CacheKey, ToolCache
from mmsr.tools.web import guard
from mmsr.tools.web.http import HTTPClient, Limits, ToolError
from mmsr.tools.web.images import fetch_image

KIND, PROVIDER = "image_download", "http"


class ImageDownloader:
    """``ImageFetcher`` over HTTP with a SQLite cache (module docstring).

    Args:
        cache: the cache file (may be the tool cache, ``runs/tool_cache.sqlite``); ``None``: no cache.
        version: part of the cache key; bump it to fetch every image again.
        limits: timeouts, retries, concurrency and byte cap of the downloads.
        max_pixels: images with more pixels are refused (checked before decoding).
        allow_private: let URLs point at loopback/private addresses (tests, a mirror on your own network).
    """

    def __init__(self, cache: str | None = "runs/image_cache.sqlite", version: str = "1",
                 limits: Limits = Limits(timeout_s=30.0, retries=3, concurrency=16, breaker_failures=0,
                                         max_bytes=20_000_000),
                 max_pixels: int = 50_000_000, allow_private: bool = False) -> None:  # fmt: skip
        self.cache_path, self.version, self.max_pixels, self.allow_private = cache, version, max_pixels, allow_private
        self.client = HTTPClient("image_download", limits, connector=partial(guard.connector, allow_private))
        self.counts: Counter[str] = Counter()

    def fetch(self, urls: Sequence[str]) -> dict[str, Fetched]:
        """Every URL's image (from the cache, else downloaded, all at once) or the reason it failed.

        Blocking (it runs its own event loop): call it where loaders run, outside any event loop."""
        cache = ToolCache(self.cache_path) if self.cache_path else None
        try:
            out = {url: self._cached(cache, url) for url in dict.fromkeys(urls)}
            missing = [url for url, got in out.items() if got is None]
            for url, got in zip(missing, asyncio.run(self._download_all(missing))):
                out[url] = got
                if cache is not None and got.image is not None:
                    cache.put(self._key(url), ToolResult(IMAGE_MARKER, (got.image,), titles=(url,)))
        finally:
            if cache is not None:
                cache.close()
        return out

    def _key(self, url: str) -> CacheKey:
        return CacheKey(KIND, PROVIDER, "url:" + url, self.version)

    def _cached(self, cache: ToolCache | None, url: str) -> Fetched | None:
        hit = cache.get(self._key(url)) if cache is not None else None
        if hit is None:
            return None
        self.counts["cached"] += 1
        return Fetched(hit.images[0])

    async def _download_all(self, urls: list[str]) -> list[Fetched]:
        return list(await asyncio.gather(*(self._download(url) for url in urls)))

    async def _download(self, url: str) -> Fetched:
        try:
            image = await fetch_image(self.client, url, self.max_pixels, self.allow_private)
        except ToolError as exc:
            self.counts["failed"] += 1
            return Fetched(error=exc.reason)
        self.counts["downloaded"] += 1
        return Fetched(image)

    def metrics(self) -> dict[str, float]:
        """Downloaded, cached and failed images, and the client's outcomes (retries by kind ...)."""
        own = {f"data/image_download/{k}": float(v) for k, v in sorted(self.counts.items())}
        return own | self.client.metrics()
