"""Replay the real tool outputs recorded with the FVQA dev rows, so real MMSearch-R1 conversations run offline.

``data/fvqa_dev_20/fvqa_dev.jsonl`` holds, per row, what MMSearch-R1-7B was shown: Google-Lens titles for its
image search, and the top-5 results with LLM page summaries for each text search. ``recorded_results`` turns
them into ``ToolResult`` records keyed like the cache (image search by the row image's pixel hash, text
search by the normalized query); ``ReplaySearch`` serves them directly, and ``record_into_cache`` writes them
into a ``ToolCache`` for ``CachedTool(mode="replay_only", provider="fvqa_recorded")`` or the search server.

Thumbnails: the recording has only Google thumbnail URLs, which cannot be fetched offline (and many are
gone). A replayed image search returns the question's own image, shrunk to ``thumbnail_size``, once per
recorded title. Lens matches are look-alikes of that image, so it is the closest stand-in we have; no image
is invented, and the observation keeps the recorded layout (one image per title, recorded titles in
recorded order). Titles whose thumbnails failed at recording time were never shown and are not replayed.

Crop-then-search (``mmsr.tools.crop.CropSearch``) is recorded as a round ``{"action": "crop_search", "tool":
{"box": [x1, y1, x2, y2], "image_size": [w, h], "titles": [...]}}``: the box in the pixels of the image as
the policy saw it (``image_size``, the request's ``image_size``; default the image's own size). The region is
cut from the row's image as ``CropSearch`` cuts it and keyed by its pixels, so the same box replays and any
other region is a miss; its thumbnails are the region, shrunk, for the reason above.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from mmsr.data.jsonl import jsonl_lines
from mmsr.data.loaders import load_samples
from mmsr.data.rows import default_id_stem
from mmsr.tools.base import ToolRequest, ToolResult, failure
from mmsr.tools.cache import CacheKey, ReplayMiss, ToolCache, image_key, request_key
from mmsr.tools.crop import Crop, crop
from mmsr.tools.format import WEB_TEXT_HEADER, image_results, page_entry, text_results

PROVIDER = "fvqa_recorded"


def _image_result(tool: dict[str, Any], image: Image.Image, thumbnail_size: int, where: str) -> ToolResult:
    titles = tool.get("titles")
    if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
        raise ValueError(f"{where}: tool.titles must be a list of strings")
    thumbnail = image.copy()
    thumbnail.thumbnail((thumbnail_size, thumbnail_size))
    return ToolResult(image_results(titles), tuple(thumbnail.copy() for _ in titles), titles=tuple(titles))


def _region(tool: dict[str, Any], image: Image.Image, where: str) -> Image.Image:
    """The recorded box's region of the row's ``image``, cut as ``CropSearch`` cuts it (module docstring)."""
    box, size = tool.get("box"), tool.get("image_size") or image.size
    try:
        w, h = (int(v) for v in size)
        text = ", ".join(str(v) for v in box) if isinstance(box, list | tuple) else str(box)
        return crop(image, Crop(min_size=0).box(text, (w, h)), (w, h))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: tool.box {box!r} / tool.image_size {size!r}: {exc}") from None


def _text_result(tool: dict[str, Any], where: str) -> ToolResult:
    results, summaries = tool.get("results"), tool.get("summaries")
    if not isinstance(results, list) or not isinstance(summaries, list):
        raise ValueError(f"{where}: tool.results and tool.summaries must be lists")
    by_rank = {r.get("rank"): r for r in results if isinstance(r, dict)}
    pages = []
    for s in summaries:  # results without a summary were never shown to the model
        page = by_rank.get(s.get("rank")) if isinstance(s, dict) else None
        if page is None or not isinstance(s.get("summary"), str):
            raise ValueError(f"{where}: summary {s!r:.60} has no matching result rank")
        pages.append((page, s["summary"]))
    if not pages:
        return failure("text_search", "none of the result pages could be read")
    entries = [page_entry(str(p.get("title", "")), str(p.get("url", "")), summary) for p, summary in pages]
    return ToolResult(text_results(entries, WEB_TEXT_HEADER), titles=tuple(str(p.get("title", "")) for p, _ in pages))


def recorded_results(path: str | Path, thumbnail_size: int = 64,
                     images: dict[str, Image.Image] | None = None) -> dict[tuple[str, str], ToolResult]:  # fmt: skip
    """``(kind, request key) -> ToolResult`` for every recorded tool call of the jsonl at ``path``.

    Rows are read with ``load_samples`` (the same image decoding as training), so keys match the requests a
    rollout over the same file makes (``images``: those rows' images by id, if already loaded). A repeated
    query keeps its first recording.
    """
    path = Path(path)
    images = images if images is not None else {s.id: s.image for s in load_samples(path)}
    out: dict[tuple[str, str], ToolResult] = {}
    lines = [(n, line) for n, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8")), start=1) if line.strip()]
    for index, (line_no, line) in enumerate(lines):
        try:
            row = json.loads(line)
            image = images.get(_row_id(row, index, path))
            _record_row(row, image, thumbnail_size, f"{path}:{line_no}", out)
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:  # name the row, not a bare key
            raise ValueError(f"{path}:{line_no}: malformed recording ({type(exc).__name__}: {exc})") from None
    return out


def _row_id(row: dict[str, Any], index: int, path: Path) -> str:
    """The row's id as ``load_samples`` gives it (``mmsr.data.rows``): ``data_id``, else ``id``, as a string
    (``None`` and ``""`` unset), else ``default_id_stem`` and the row's index among the non-blank lines."""
    set_ids = (v for v in (row.get("data_id"), row.get("id")) if v is not None and v != "")
    return str(next(set_ids, f"{default_id_stem(path)}-{index}"))


def _record_row(row: dict[str, Any], image: Image.Image | None, thumbnail_size: int, where: str,
                out: dict[tuple[str, str], ToolResult]) -> None:  # fmt: skip
    """Add the recorded tool calls of ``row`` (its image: ``image``) to ``out``; a repeat keeps the first."""
    for r in (row.get("mmsearch_r1_7b_run") or {}).get("rounds") or []:
        tool, action, at = r.get("tool"), r.get("action"), f"{where} round {r.get('round')}"
        if action in ("image_search", "crop_search") and tool and image is None:
            raise ValueError(f"{at}: a recorded {action} but the row has no image")
        if action == "image_search" and tool:
            out.setdefault(("image_search", image_key(image)), _image_result(tool, image, thumbnail_size, at))
        elif action == "crop_search" and tool:  # CropSearch asks image search about the region
            region = _region(tool, image, at)
            out.setdefault(("image_search", image_key(region)), _image_result(tool, region, thumbnail_size, at))
        elif action == "text_search" and tool:
            query = ToolRequest("text_search", str(tool.get("query", "")))
            out.setdefault(("text_search", request_key(query)), _text_result(tool, at))


class ReplaySearch:
    """``SearchTool`` serving recorded results (image and text search alike; use one instance for both).

    Args:
        path: the jsonl with recorded runs (``data/fvqa_dev_20/fvqa_dev.jsonl``).
        thumbnail_size: longest side of the replayed thumbnails (see the module docstring).
        on_miss: ``error`` raises ``ReplayMiss`` (faithful replay); ``failure`` answers with a failure
            observation (training on the recorded rows, where the policy may ask new queries).
    """

    provider_name = PROVIDER

    def __init__(self, path: str = "data/fvqa_dev_20/fvqa_dev.jsonl", thumbnail_size: int = 64,
                 on_miss: Literal["error", "failure"] = "error") -> None:  # fmt: skip
        self.path, self.on_miss = Path(path), on_miss
        images = {s.id: s.image for s in load_samples(self.path)}
        self.results = recorded_results(self.path, thumbnail_size, images)
        self._by_row = {row_id: image_key(image) for row_id, image in images.items()}

    def _key(self, request: ToolRequest) -> str:
        if request.kind == "image_search" and request.image is None and request.sample_id in self._by_row:
            return self._by_row[request.sample_id]
        return request_key(request)

    async def __call__(self, request: ToolRequest) -> ToolResult:
        start = time.perf_counter()
        key = self._key(request)
        hit = self.results.get((request.kind, key))
        if hit is None:
            if self.on_miss == "failure":
                return failure(request.kind, "no recorded result for this search", time.perf_counter() - start)
            raise ReplayMiss(
                f"{self.path} has no recorded {request.kind} for row {request.sample_id!r} (key {key[:80]!r})"
            )
        return ToolResult(hit.text, tuple(im.copy() for im in hit.images), hit.ok, time.perf_counter() - start,
                          0.0, hit.titles)  # fmt: skip


def record_into_cache(src: str | Path, cache: str | Path, version: str = "1", thumbnail_size: int = 64) -> int:
    """Write the recorded results of ``src`` into the cache file ``cache``; returns how many were written."""
    store = ToolCache(cache)
    n = 0
    for (kind, key), result in recorded_results(src, thumbnail_size).items():
        if result.ok:
            store.put(CacheKey(kind, PROVIDER, key, version), result)
            n += 1
    store.close()
    return n


def main(argv: list[str] | None = None) -> None:
    """``python -m mmsr.tools.replay --src data/fvqa_dev_20/fvqa_dev.jsonl --cache runs/tool_cache.sqlite``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default="data/fvqa_dev_20/fvqa_dev.jsonl")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--version", default="1")
    parser.add_argument("--thumbnail-size", type=int, default=64)
    args = parser.parse_args(argv)
    n = record_into_cache(args.src, args.cache, args.version, args.thumbnail_size)
    print(f"wrote {n} recorded results from {args.src} into {args.cache} (provider {PROVIDER!r})")


if __name__ == "__main__":
    main()
