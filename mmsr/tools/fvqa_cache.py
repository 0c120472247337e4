"""Image search from the cache published with FVQA: the results MMSearch-R1 saw, looked up by ``data_id``.

FVQA rows have no image URL (``image_urls`` is None in all of ``lmms-lab/FVQA``, MMSearch-R1 issue #14),
so live Lens search cannot run on them; the authors released the Lens results instead, in
``fvqa_train_image_search_results_cache.pkl`` and ``fvqa_test_image_search_results_cache.pkl``
(``lmms-lab/FVQA`` revision ``bb4a4ff``; coverage 4,849/4,856 train and 1,798/1,800 test rows).

Layout, confirmed from public code that reads these files (the released files themselves were not
available here): a pickled ``dict`` ``data_id -> {"tool_returned_web_title_list": [str, ...],
"tool_returned_images_urls": [str | PIL image, ...]}``, titles and thumbnails paired by rank, usually 5;
readers zip the two lists. Thumbnails are Google thumbnail URLs or pickled ``JpegImageFile`` objects
(Pillow 12 readers patch ``JpegImageFile.__setstate__`` to load them, which is why ``fvqa_pickle`` rebuilds
images itself). Not confirmed: whether a row may hold an empty list, other image classes or other fields;
those are accepted if they fit the layout and refused with the row named if they do not. Some thumbnail
URLs now answer 404 (known since the files were released).

``FVQACacheSearch`` reads the files on first use through ``fvqa_pickle.safe_load`` (never ``pickle.load``:
the files hold pickled objects); a missing or refused file is fatal (``FVQACacheError``), not an observation. A request is looked up by ``ToolRequest.sample_id`` (``Sample.id``, the parquet's
``data_id``). URL thumbnails are fetched as the web image search fetches them (``HTTPClient`` behind the
SSRF guard, byte and pixel caps, against the call's deadline); pickled images are used as they are. A
thumbnail that cannot be had is skipped and its row recorded: in ``dead`` when it is gone (a 404, a file that is no
image), in ``unreachable`` while only a transient failure kept it (a 429 or 5xx, a timeout, the call's deadline) until
a later call fetches it (metrics count both; ``tools/check_fvqa_cache.py`` lists them for a whole file). An unknown ``data_id`` is a failure observation.
Results with fetched thumbnails are stored in the tool cache (SQLite, ``mmsr.tools.cache.ToolCache``) under
the row's id, so a row's URLs are fetched once per cache file, whatever process asks; a result cut short by a
transient failure (the call's deadline, a timeout, 429/5xx) is shown but not stored, so a later call tries the
thumbnail again.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image

from mmsr.tools.base import FatalToolError, ToolRequest, ToolResult, failure
from mmsr.tools.budget import Deadline, Stage, check_stages
from mmsr.tools.cache import CacheKey, ToolCache
from mmsr.tools.format import image_results
from mmsr.tools.fvqa_pickle import PickledImage, safe_load
from mmsr.tools.web import guard
from mmsr.tools.web.http import HTTPClient, Limits, ToolError, transient
from mmsr.tools.web.images import cut_short, fetch_image, shrunk

PROVIDER = "fvqa_cache"
TITLES, THUMBNAILS = "tool_returned_web_title_list", "tool_returned_images_urls"
DOWNLOAD = (
    "hf download lmms-lab/FVQA {name} --repo-type dataset --revision bb4a4ff4c9c3fd0382d11f5d7fccd66d0b8428b5 "
    "--local-dir {folder}"
)
Thumbnail = str | Image.Image | PickledImage


class FVQACacheError(FatalToolError):
    """The cache file is missing or unreadable. Fatal (the rollout re-raises it): every image search of the
    run would fail otherwise, and the run would train on failed searches without saying why."""


@dataclass(frozen=True)
class CachedRow:
    """One row of the cache: titles and their thumbnails (URL, image, or an unreadable pickled image), by rank."""

    titles: tuple[str, ...]
    thumbnails: tuple[Thumbnail, ...]


@dataclass(frozen=True)
class DeadThumbnail:
    """A thumbnail that could not be had: its rank (1-based), URL (empty for a pickled image) and why."""

    rank: int
    url: str
    reason: str


def _row(data_id: object, entry: object, source: Path) -> CachedRow:
    where = f"{source}: row {data_id!r}"
    if not isinstance(data_id, str) or not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a str data_id mapped to a dict, got {type(entry).__name__}")
    titles, thumbnails = entry.get(TITLES), entry.get(THUMBNAILS)
    if not isinstance(titles, list | tuple) or not all(isinstance(t, str) for t in titles):
        raise ValueError(f"{where}: {TITLES} must be a list of strings, got {titles!r:.80}")
    if not isinstance(thumbnails, list | tuple):
        raise ValueError(f"{where}: {THUMBNAILS} must be a list, got {thumbnails!r:.80}")
    for t in thumbnails:
        if not isinstance(t, str | Image.Image | PickledImage):
            raise ValueError(f"{where}: {THUMBNAILS} holds a {type(t).__name__}, not a URL or an image")
    return CachedRow(tuple(titles), tuple(thumbnails))


def _paths(paths: str | Path | list[str] | list[Path]) -> list[Path]:
    return [Path(p) for p in (paths if isinstance(paths, list) else [paths])]


def _not_found(path: Path) -> str:
    download = DOWNLOAD.format(name=path.name, folder=path.parent)
    return (f"FVQA image-search cache {path} not found. Download it ({download}) or set the tool's path "
            f"(init_args.path of this FVQACacheSearch entry: model.init_args.image_search.init_args.path in a run config, "
            f"server.image_search.init_args.path for mmsr serve-search, image_search.init_args.path in an eval tools file; "
            f"deeper where it is the backend of a CachedTool or CropSearch).")  # fmt: skip


def load_rows(paths: str | Path | list[str] | list[Path]) -> dict[str, CachedRow]:
    """``data_id -> CachedRow`` from one or more cache pickles (a clear error for a missing file, a bad row or
    a ``data_id`` in two files)."""
    rows: dict[str, CachedRow] = {}
    for path in _paths(paths):
        if not path.is_file():
            raise FileNotFoundError(_not_found(path))
        data = safe_load(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict keyed by data_id, got {type(data).__name__}")
        for data_id, entry in data.items():
            if data_id in rows:
                raise ValueError(f"{path}: row {data_id!r} is also in an earlier cache file")
            rows[data_id] = _row(data_id, entry, path)
    return rows


class FVQACacheSearch:
    """``SearchTool`` for ``<search><img></search>`` from the released FVQA cache (see the module docstring).

    Args:
        path: the cache pickle(s), e.g. ``data/fvqa/fvqa_train_image_search_results_cache.pkl``. Read on first
            use (building a config touches no file); runs check at start-up that they are there
            (``check_ready``). A missing or refused file stops the run (``FVQACacheError``), naming the file
            and how to download it.
        tool_cache: the SQLite tool cache that keeps fetched results (``None``: fetch on every call).
        version: part of the tool-cache key; bump it when ``top_k``/``max_side`` change.
        top_k: results shown at most (MMSearch-R1: 5); later ranks stand in for skipped thumbnails, as live.
        max_pixels: URL thumbnails with more pixels are skipped (checked before decoding).
        max_side: thumbnails are shrunk to this longest side.
        allow_private: let thumbnail URLs reach private addresses (tests' local servers only).
        thumbnail_limits: how thumbnail URLs are fetched.
        reserve_s: seconds of the call's budget kept back to answer in time.
    """

    provider_name = PROVIDER

    def __init__(self, path: str | list[str], tool_cache: str | None = "runs/tool_cache.sqlite", version: str = "1",
                 top_k: int = 5, max_pixels: int = 4_000_000, max_side: int = 512, allow_private: bool = False,
                 thumbnail_limits: Limits = Limits(timeout_s=15.0, retries=1, concurrency=16, breaker_failures=0,
                                                   max_bytes=2_000_000),
                 reserve_s: float = 1.0) -> None:  # fmt: skip
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.path, self._rows, self._load_lock = path, None, threading.Lock()
        self.top_k, self.version, self.max_pixels, self.max_side = top_k, version, max_pixels, max_side
        self.allow_private, self.reserve_s, self.tool_cache_path = allow_private, reserve_s, tool_cache
        self.thumbnails = HTTPClient("thumbnails", thumbnail_limits, connector=partial(guard.connector, allow_private))
        self._store: ToolCache | None = None  # opened on first use
        self.dead: dict[str, dict[int, DeadThumbnail]] = {}  # data_id -> rank -> why: gone
        self.unreachable: dict[str, dict[int, DeadThumbnail]] = {}  # the same, transient: until a call fetches it
        self.counts: Counter[str] = Counter()

    def check_budget(self, cap_s: float) -> None:
        """``BudgetError`` unless one thumbnail attempt and the reserve fit in ``cap_s``."""
        check_stages("FVQACacheSearch", [Stage("thumbnails", self.thumbnails.limits)], self.reserve_s, cap_s)

    def check_ready(self) -> None:
        """``FVQACacheError`` naming the first cache file that is not there (the start-up check,
        ``mmsr.tools.base.check_ready``; the files themselves are read on first use)."""
        missing = [p for p in _paths(self.path) if not p.is_file()]
        if missing:
            raise FVQACacheError(_not_found(missing[0]))

    @property
    def rows(self) -> dict[str, CachedRow]:
        """``data_id -> CachedRow``, read from ``path`` the first time (``FVQACacheError`` if it cannot be)."""
        with self._load_lock:
            if self._rows is None:
                try:
                    self._rows = load_rows(self.path)
                except (OSError, pickle.UnpicklingError, ValueError) as exc:
                    raise FVQACacheError(str(exc)) from exc
        return self._rows

    @property
    def store(self) -> ToolCache | None:
        if self._store is None and self.tool_cache_path is not None:
            self._store = ToolCache(self.tool_cache_path)
        return self._store

    def _key(self, data_id: str) -> CacheKey:
        return CacheKey("image_search", PROVIDER, f"data_id:{data_id}", self.version)

    async def __call__(self, request: ToolRequest) -> ToolResult:
        start = time.perf_counter()
        rows = self._rows if self._rows is not None else await asyncio.to_thread(lambda: self.rows)
        row = rows.get(request.sample_id)
        if row is None:
            self.counts["missing_rows"] += 1
            return failure("image_search", "no cached image search for this image", time.perf_counter() - start)
        fetches = any(isinstance(t, str) for t in row.thumbnails)
        if fetches and self.store is not None:
            hit = await asyncio.to_thread(self.store.get, self._key(request.sample_id))
            self.counts[f"tool_cache_{'hits' if hit else 'misses'}"] += 1
            if hit is not None:
                return ToolResult(hit.text, hit.images, True, time.perf_counter() - start, 0.0, hit.titles)
        result = await self.lookup(request.sample_id, row, Deadline.after(request.budget_s, self.reserve_s), start)
        if fetches and result.ok and not result.partial and self.store is not None:
            await asyncio.to_thread(self.store.put, self._key(request.sample_id), result)
        return result

    async def lookup(self, data_id: str, row: CachedRow, deadline: Deadline, start: float) -> ToolResult:
        """The result of ``row``: up to ``top_k`` (title, thumbnail) pairs whose thumbnail could be had."""
        pairs = list(zip(row.titles, row.thumbnails))  # as the upstream readers: extra titles or images are unused
        images = await asyncio.gather(*(self._thumbnail(data_id, rank, t, deadline)
                                        for rank, (_, t) in enumerate(pairs, start=1)))  # fmt: skip
        kept = [(title, im) for (title, _), im in zip(pairs, images) if isinstance(im, Image.Image)][: self.top_k]
        self.counts["rows_served"] += 1
        if pairs and not kept:
            reason = f"none of the {len(pairs)} result images could be loaded"
            return failure("image_search", reason, time.perf_counter() - start)
        titles = tuple(title for title, _ in kept)
        return ToolResult(image_results(titles), tuple(im for _, im in kept), True, time.perf_counter() - start,
                          0.0, titles, partial=cut_short(images, self.top_k))  # fmt: skip

    async def _thumbnail(self, data_id: str, rank: int, thumbnail: Thumbnail,
                         deadline: Deadline) -> Image.Image | ToolError:  # fmt: skip
        """The thumbnail, or why it was skipped (recorded in ``dead``; the caller needs the why for caching)."""
        try:
            if isinstance(thumbnail, PickledImage):
                if thumbnail.image is None:
                    raise ToolError(thumbnail.error, "bad_pickled_image")
                thumbnail = thumbnail.image
            if isinstance(thumbnail, Image.Image):
                return shrunk(thumbnail, self.max_side)
            image = await fetch_image(self.thumbnails, thumbnail, self.max_pixels, self.allow_private, deadline,
                                      self.max_side)  # fmt: skip
            self.counts["thumbnails_fetched"] += 1
            self._reached(data_id, rank)
            return image
        except ToolError as exc:
            self.counts[f"thumbnail_{exc.kind}"] += 1
            url = thumbnail if isinstance(thumbnail, str) else ""
            # a 503 or a timeout is no gone thumbnail: listed as one, it stayed listed after the next call fetched it
            if transient(exc):
                self.unreachable.setdefault(data_id, {})[rank] = DeadThumbnail(rank, url, exc.reason)
                return exc
            self._reached(data_id, rank)  # gone now: no longer merely unreachable
            self.dead.setdefault(data_id, {})[rank] = DeadThumbnail(rank, url, exc.reason)
            return exc

    def _reached(self, data_id: str, rank: int) -> None:
        """Forget ``rank`` of ``data_id`` among the unreachable thumbnails (fetched since, or found gone)."""
        row = self.unreachable.get(data_id, {})
        row.pop(rank, None)
        if not row:
            self.unreachable.pop(data_id, None)

    def dead_thumbnails(self, unreachable: bool = False) -> dict[str, list[DeadThumbnail]]:
        """``data_id -> thumbnails that are gone`` (``unreachable``: that a transient failure kept, and no later call
        fetched) for the rows looked up so far (tool-cache hits are not re-fetched, so a row is reported by the call
        that fetched it)."""
        rows = self.unreachable if unreachable else self.dead
        return {data_id: [dead[r] for r in sorted(dead)] for data_id, dead in sorted(rows.items())}

    def metrics(self) -> dict[str, float]:
        own = {f"tools/{PROVIDER}/{k}": float(v) for k, v in sorted(self.counts.items())}
        own[f"tools/{PROVIDER}/rows_with_dead_thumbnails"] = float(len(self.dead))
        return own | self.thumbnails.metrics()
