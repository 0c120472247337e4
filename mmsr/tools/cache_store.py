"""The SQLite store of the tool cache: cached results and the per-run API budget. ``CachedTool``
(``mmsr.tools.cache``) serves tools from it; ``ToolCache``, the keys and the key functions are importable from
there too.

Results live in one SQLite file (WAL journal, busy timeout: several trainer, evaluation and server processes
can share it), keyed by (tool kind, provider, request key, backend version). The request key is the
normalized query for text search (``q:<query>``; ``q:<query>|question:<question>``, the question normalized
too, for a backend whose summaries focus on it: ``mmsr.tools.base.depends_on_question``) and a SHA-256 of the
image's pixels for image search (so the same image re-read from disk hits, whatever its file name), else its
URL. Any other tool (a custom text tool, a crop search) is keyed on both its normalized query and its image
(or URL, and the size the query's coordinates refer to) when it has one: either may change the answer; and, for a
question-focused backend, on the question too, as text search is (``|question:<question>``).

The budget table counts the calls and dollars of one run per tool kind and provider; a call is reserved in one
transaction, so processes sharing the file cannot both take the last one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmsr.tools.base import ToolRequest, ToolResult


def image_key(image: Image.Image) -> str:
    """SHA-256 of the RGB pixels and size: the same picture gives the same key whatever file it came from."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
    return f"sha256:{digest}"


def normalize_query(query: str) -> str:
    return " ".join(query.lower().split())


def _image_part(request: ToolRequest) -> str | None:
    if request.image is not None:
        return image_key(request.image)
    if request.image_url:
        return "url:" + request.image_url
    return None


def request_key(request: ToolRequest, by_question: bool = False) -> str:
    """The cache key of a request (see the module docstring); ``by_question``: the backend's results depend on the
    question (every kind but ``image_search``, whose key is the image alone). The formats of ``image_search`` keys and of question-independent ``text_search`` keys
    never change: caches recorded with them (replayed MMSearch-R1 outputs, the FVQA cache, local search) must keep
    hitting. A question-focused backend's entries written under the query alone (before 2026-12-06) are missed on
    purpose: they may hold another question's summaries."""
    if request.kind == "text_search":
        query = "q:" + normalize_query(request.query)
        # even an empty question: a plain ``q:`` entry may hold summaries written for some other question
        return f"{query}|question:{normalize_query(request.question)}" if by_question else query
    image = _image_part(request)
    if request.kind == "image_search":
        if image is None:
            raise ValueError(
                f"image_search request for row {request.sample_id!r} has neither an image nor an image_url"
            )
        return image
    # Any other tool may read both: one key per (query, image), else every query of a row gets the first answer.
    parts = ["q:" + normalize_query(request.query)] if request.query.strip() or image is None else []
    if image is not None:
        parts.append(image)
    if image is not None and request.image_size is not None:  # a crop's box is in these pixels
        parts.append("size:{}x{}".format(*request.image_size))
    if by_question:  # a question-focused text backend under another tool's name writes for the question too
        parts.append("question:" + normalize_query(request.question))
    return "|".join(parts)


@dataclass(frozen=True)
class CacheKey:
    tool: str
    provider: str
    key: str
    version: str


@dataclass(frozen=True)
class BudgetKey:
    """One budget counter: a run's calls to one tool kind of one provider."""

    run: str
    tool: str
    provider: str


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _unpng(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    tool TEXT, provider TEXT, key TEXT, version TEXT,
    text TEXT NOT NULL, titles TEXT NOT NULL, images TEXT NOT NULL, cost REAL NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (tool, provider, key, version));
CREATE TABLE IF NOT EXISTS tool_budget (
    run TEXT, tool TEXT, provider TEXT, calls INTEGER NOT NULL, cost REAL NOT NULL,
    PRIMARY KEY (run, tool, provider));
"""
# Files written before budgets were per tool (ae48d8b) keep their ``budget (run, calls, cost)`` table. Its counts
# cannot be split between the tools that made them, so each tool counter of that run starts from all of them
# (``_spent``): a resumed run never spends its budget again, at worst it stops a little early.
LEGACY_SPENT = "SELECT calls, cost FROM budget WHERE run=?"


class ToolCache:
    """The SQLite store. Thread-safe; every method is blocking (``CachedTool`` runs them in a thread).

    Args:
        path: the database file (created with its folder).
        timeout_s: how long a writer waits for another process's lock.
    """

    def __init__(self, path: str | Path, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not self._set_up(deadline):
                time.sleep(0.05)

    def _set_up(self, deadline: float) -> bool:
        """The WAL journal and the tables; False if another connection held the file. SQLite answers "locked"
        at once, without its busy timeout, when connections open a new file together (ranks, threads) and one
        turns it to WAL, so the attempt is repeated until ``deadline``."""
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            legacy = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='budget'"
            self._legacy = self._db.execute(legacy).fetchone() is not None
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise sqlite3.OperationalError(f"tool cache {self.path}: {e}") from e
            return False
        return True

    def get(self, key: CacheKey) -> ToolResult | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, titles, images, cost FROM results WHERE tool=? AND provider=? AND key=? AND version=?",
                (key.tool, key.provider, key.key, key.version),
            ).fetchone()
        if row is None:
            return None
        text, titles, images, cost = row
        return ToolResult(
            text, tuple(_unpng(i) for i in json.loads(images)), True, 0.0, cost, tuple(json.loads(titles))
        )

    def put(self, key: CacheKey, result: ToolResult) -> None:
        """Store a successful result (failures are transient and are never cached)."""
        if not result.ok:
            raise ValueError("failed results are not cached")
        images = json.dumps([_png(i) for i in result.images])
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key.tool, key.provider, key.key, key.version, result.text, json.dumps(list(result.titles)),
                 images, result.cost, time.time()),
            )  # fmt: skip

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def reserve(self, budget: BudgetKey, max_calls: int | None, max_cost: float | None,
                hold: float = 0.0) -> str | None:  # fmt: skip
        """Count one call, and ``hold`` dollars (its expected price), against ``budget``; the reason it is
        refused (nothing counted) or None. ``spend`` settles the call at its real cost.

        One ``BEGIN IMMEDIATE`` transaction, so concurrent processes cannot both take the last call.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                calls, cost = self._spent(budget)
                if max_calls is not None and calls >= max_calls:
                    return f"the run's search budget is used up ({calls} of {max_calls} API calls)"
                if max_cost is not None and cost >= max_cost:
                    return f"the run's search budget is used up (${cost:.2f} of ${max_cost:.2f})"
                self._add(budget, 1, hold)
                return None
            finally:
                self._db.execute("COMMIT")

    def spend(self, budget: BudgetKey, cost: float, calls: int = 0) -> None:
        """Add ``cost`` dollars and ``calls`` calls (-1 gives a reserved call back) to ``budget``."""
        with self._lock:
            self._add(budget, calls, cost)

    def spent(self, budget: BudgetKey) -> tuple[int, float]:
        """(API calls, dollars) counted for ``budget``, calls in flight included."""
        with self._lock:
            return self._spent(budget)

    def _add(self, budget: BudgetKey, calls: int, cost: float) -> None:
        self._db.execute(
            "INSERT INTO tool_budget VALUES (?, ?, ?, ?, ?) ON CONFLICT(run, tool, provider) "
            "DO UPDATE SET calls = calls + excluded.calls, cost = cost + excluded.cost",
            (budget.run, budget.tool, budget.provider, calls, cost),
        )

    def _spent(self, budget: BudgetKey) -> tuple[int, float]:
        """(calls, dollars) of ``budget``, plus its run's shared count in a file of the old format."""
        rows = "SELECT calls, cost FROM tool_budget WHERE run=? AND tool=? AND provider=?"
        args: tuple[str, ...] = (budget.run, budget.tool, budget.provider)
        if self._legacy:
            rows, args = f"{rows} UNION ALL {LEGACY_SPENT}", (*args, budget.run)
        calls, cost = self._db.execute(f"SELECT TOTAL(calls), TOTAL(cost) FROM ({rows})", args).fetchone()
        return int(calls), cost

    def close(self) -> None:
        with self._lock:
            self._db.close()
