"""Offline search backends: perceptual-hash reverse image search and BM25 text search over local files.

Both read a JSON-lines file once at construction, validate it (errors name the file and line), and answer
requests in a worker thread so the rollout's event loop never blocks. Result texts come from
:mod:`mmsr.tools.format`, shared with the web and replay backends.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from mmsr.data.jsonl import read_jsonl, required_field
from mmsr.data.paths import require_file
from mmsr.tools.base import ToolRequest, ToolResult, failure
from mmsr.tools.format import IMAGE_NONE, TEXT_NONE, image_results, one_line, text_results


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class _ImageEntry:
    title: str
    thumbnail: Image.Image
    row: int  # index into the hash matrix; entries expanded from one row share it


class LocalImageSearch:
    """Reverse image search over a local index, by perceptual-hash (pHash) Hamming distance.

    pHash (DCT of a 32x32 grey image) survives resizing and JPEG re-encoding, which is what separates a
    question image from its index copy; colour and crops are not modelled (kept simple on purpose).

    Args:
        index: JSON-lines file of ``{"image": path, "title": str}`` (optionally ``"titles": [str, ...]``);
            image paths are relative to the index file's folder; ``index`` itself to the working directory.
        top_k: maximum number of results.
        hash_size: pHash side; the hash has ``hash_size**2`` bits.
        thumbnail_size: longest side of returned thumbnails (aspect kept, never upscaled).
        max_distance: drop entries farther than this many bits; ``None`` keeps the nearest ``top_k``.
        expand_titles: if True, an entry with ``"titles"`` yields one result per title (all showing its image),
            so a question image gets back its recorded page titles rather than neighbouring entries.
    """

    def __init__(
        self,
        index: str,
        top_k: int = 5,
        hash_size: int = 8,
        thumbnail_size: int = 64,
        max_distance: int | None = None,
        expand_titles: bool = False,
    ) -> None:
        _positive(top_k=top_k, hash_size=hash_size, thumbnail_size=thumbnail_size)
        self.index = require_file(index, "image search index").resolve()
        self.top_k, self.hash_size, self.thumbnail_size = top_k, hash_size, thumbnail_size
        self.max_distance, self.expand_titles = max_distance, expand_titles
        self._entries: list[_ImageEntry] = []
        rows = read_jsonl(self.index)
        hashes = [self._load_row(row_id, line_no, row) for row_id, (line_no, row) in enumerate(rows)]
        self._hashes = np.stack(hashes)  # [N, hash_size**2] bool, N = index rows

    def _load_row(self, row_id: int, line_no: int, row: dict[str, Any]) -> np.ndarray:
        """Validate one index row, append its entries and return its hash bits."""
        where = f"{self.index}:{line_no}"
        path = self.index.parent / required_field(row, "image", where)
        titles = [required_field(row, "title", where)]
        if self.expand_titles and "titles" in row:
            titles = required_field(row, "titles", where, list) or titles
            if not all(isinstance(t, str) for t in titles):
                raise ValueError(f"{where}: field 'titles' must be a list of strings")
        try:
            with Image.open(path) as image:
                bits = self._hash(image)
                thumbnail = image.convert("RGB")
        except Exception as exc:  # a corrupt image makes Pillow raise SyntaxError, DecompressionBombError ...
            raise ValueError(f"{where}: cannot read image {path} ({type(exc).__name__}: {exc})") from None
        thumbnail.thumbnail((self.thumbnail_size, self.thumbnail_size))
        # One line per result in the observation, whatever the page title held.
        self._entries += [_ImageEntry(" ".join(t.split()), thumbnail, row_id) for t in titles]
        return bits

    def _hash(self, image: Image.Image) -> np.ndarray:
        return imagehash.phash(image, hash_size=self.hash_size).hash.reshape(-1)

    def search(self, image: Image.Image) -> list[tuple[_ImageEntry, int]]:
        """(entry, Hamming distance) of the nearest entries; ties keep index order."""
        distances = (self._hashes != self._hash(image)).sum(axis=1)  # [N]
        per_entry = distances[[e.row for e in self._entries]]  # [E], E >= N when titles are expanded
        order = np.argsort(per_entry, kind="stable")  # stable: equal distances stay in file order
        hits = [(self._entries[i], int(per_entry[i])) for i in order[: self.top_k]]
        if self.max_distance is not None:
            hits = [(e, d) for e, d in hits if d <= self.max_distance]
        return hits

    async def __call__(self, request: ToolRequest) -> ToolResult:
        """Search ``request.image``; a missing or unreadable image is a failed observation, not an error."""
        start = time.perf_counter()
        if request.image is None:
            return failure("image_search", "no image was given")
        try:
            hits = await asyncio.to_thread(self.search, request.image)
        except (OSError, ValueError) as exc:
            return failure("image_search", f"the image could not be read: {exc}", time.perf_counter() - start)
        if not hits:
            return ToolResult(text=IMAGE_NONE, latency_s=time.perf_counter() - start)
        return ToolResult(
            text=image_results([e.title for e, _ in hits]),
            # copies: callers may draw on or resize what they get without touching the cache.
            images=tuple(e.thumbnail.copy() for e, _ in hits),
            titles=tuple(e.title for e, _ in hits),
            latency_s=time.perf_counter() - start,
        )


@dataclass(frozen=True)
class Passage:
    """One searchable passage."""

    id: str
    title: str
    text: str


def _parse_passage(row: dict[str, Any], where: str) -> Passage:
    """Our ``{"id","title","text"}`` row, or FlashRAG's ``{"id","contents": '"Title"\\ntext'}``."""
    pid = str(required_field(row, "id", where, (str, int)))
    if "contents" in row and "text" not in row:
        title, _, text = required_field(row, "contents", where).partition("\n")
        return Passage(pid, title.strip().strip('"'), text) if text else Passage(pid, "", title)
    return Passage(pid, required_field(row, "title", where), required_field(row, "text", where))


class LocalTextSearch:
    """BM25 text search (``bm25s``, English stopwords, no stemming) over a local passage corpus.

    Args:
        corpus: JSON-lines file of ``{"id", "title", "text"}`` or FlashRAG ``{"id", "contents"}`` rows;
            relative to the working directory. Title and text are indexed together.
        top_k: maximum number of passages returned.
        max_chars: each passage's text is cut to this many characters.
    """

    def __init__(self, corpus: str, top_k: int = 5, max_chars: int = 600) -> None:
        import bm25s  # ~0.1 s to import; only paid by runs that use text search

        _positive(top_k=top_k, max_chars=max_chars)
        self.corpus, self.top_k, self.max_chars = require_file(corpus, "text search corpus").resolve(), top_k, max_chars
        self.passages = [_parse_passage(row, f"{self.corpus}:{n}") for n, row in read_jsonl(self.corpus)]
        self._tokenizer = bm25s.tokenization.Tokenizer(stopwords="en", stemmer=None)
        ids = self._tokenizer.tokenize(
            [f"{p.title}\n{p.text}" for p in self.passages], update_vocab=True, return_as="ids", show_progress=False
        )
        self._bm25 = bm25s.BM25()
        self._bm25.index((ids, self._tokenizer.get_vocab_dict()), show_progress=False)
        # bm25s makes no thread-safety promise for its tokenizer; calls run in worker threads.
        self._lock = threading.Lock()

    def search(self, query: str) -> list[tuple[Passage, float]]:
        """(passage, BM25 score) of the best passages with score > 0; ties keep corpus order."""
        with self._lock:
            # allow_empty=False: a query of no corpus word would otherwise be the empty token, which bm25s
            # keeps in its vocabulary and gives every passage that tokenized to nothing (a blank or all-stopword
            # text), so a query matching nothing returned those passages with a score > 0
            ids = self._tokenizer.tokenize([query], update_vocab=False, return_as="ids", show_progress=False,
                                           allow_empty=False)[0]  # fmt: skip
            if not ids:  # every word unknown to the corpus
                return []
            scores = self._bm25.get_scores(ids)  # [P]
        order = np.argsort(-scores, kind="stable")[: self.top_k]
        return [(self.passages[i], float(scores[i])) for i in order if scores[i] > 0]

    async def __call__(self, request: ToolRequest) -> ToolResult:
        """Search ``request.query``; a blank query is a failed observation, not an error."""
        start = time.perf_counter()
        if not request.query.strip():
            return failure("text_search", "the query was empty")
        hits = await asyncio.to_thread(self.search, request.query)
        if not hits:
            return ToolResult(text=TEXT_NONE, latency_s=time.perf_counter() - start)
        return ToolResult(
            text=text_results([(f"title: {p.title}", one_line(p.text, self.max_chars)) for p, _ in hits]),
            titles=tuple(p.title for p, _ in hits),
            latency_s=time.perf_counter() - start,
        )
