"""Evaluation sets whose rows name their fields differently: ``ColumnMapping`` reads a parquet file (or a
folder of parquet shards, as Hugging Face publishes them), a jsonl file or a JSON list, and builds
``Sample`` records from the columns a config names:

    class_path: mmsr.data.columns.ColumnMapping
    init_args: {path: my_set.parquet, question: prompt_text, answer: label, aliases: synonyms, image: picture}

A cell's image may be image bytes, a ``{"bytes", "path"}`` dict (a ``datasets`` Image column), a PIL
image, a base64 string (with or without a ``data:image/...;base64,`` prefix) or a file path relative to
``image_root`` (default: the data file's folder), or an http(s) URL. URLs are downloaded only when the loader
is given a ``download`` fetcher (``mmsr.tools.web.download.ImageDownloader``: retries, a byte cap, a SQLite
cache); without one they are refused. Downloading is opt-in because a score should not silently depend on
which URLs answer today: with the cache, the first run fetches each image once and every later run reads
the same pictures offline. A downloaded row keeps its URL as ``Sample.image_url`` (web image search then
needs no image host). A URL that cannot be had, after the fetcher's retries, is a ``DataError`` naming the
row, field and URL.
Answer cells may be a string, a number, a list, a JSON string of a list, or InfoSeek's numeric ``{"wikidata": x,
"range": [lo, hi]}`` entries (the value is used), read by ``mmsr.data.answers.answer_list`` as ``load_samples`` reads
them. Bad rows raise ``DataError`` naming the loader, file, row and field.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from mmsr.data.jsonl import jsonl_lines
from mmsr.data.paths import missing
from mmsr.data.answers import answer_list, other_answers
from mmsr.data.errors import DataError, data_text, row_error, unreadable
from mmsr.data.rows import collect, default_id_stem, encoded_image, image_url, label, question_text, text_image
from mmsr.data.sample import EncodedImage, Sample

__all__ = ["ColumnMapping", "DataError", "EvalSet", "Fetched", "ImageFetcher", "answer_list", "read_rows"]


@dataclass(frozen=True)
class Fetched:
    """One downloaded image (RGB), or why there is none (``error``, naming the cause)."""

    image: Image.Image | None = None
    error: str = ""


class ImageFetcher(Protocol):
    """Downloads images by URL; a failed URL is a ``Fetched`` with its ``error``, never an exception."""

    def fetch(self, urls: Sequence[str]) -> dict[str, Fetched]: ...


class EvalSet(ABC):
    """One evaluation set on disk; ``load`` reads and validates it into ``Sample`` records.

    Attributes:
        skip_invalid: drop bad rows (one warning with the count) instead of raising; ``mmsr eval
            --skip-invalid`` sets it on every set of a suite.
    """

    skip_invalid: bool = False

    @abstractmethod
    def load(self) -> list[Sample]:
        """Every valid row as a ``Sample``; a bad row raises ``DataError`` naming the row and field."""


def _json_rows(path: Path) -> list[dict]:
    """A JSON list of objects, or an object holding one under ``data`` / ``samples`` / ``qa``."""
    try:
        data = json.loads(data_text(path))
    except json.JSONDecodeError as exc:  # its message names the line and column, not the file
        raise unreadable(path, exc) from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "samples", "qa") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or an object with a 'data' list)")
    return data


def _jsonl_rows(path: Path) -> list[dict]:
    """The objects of the non-blank lines. A line that is not JSON is named by the row index its row would
    have had, the numbering every other error of this loader uses (blank lines are not rows), and by its
    1-based line."""
    rows = []
    for line_no, line in enumerate(jsonl_lines(data_text(path)), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise row_error(path, len(rows), "<line>", f"invalid JSON at line {line_no} ({exc.msg})") from None
    return rows


def _parquet_rows(path: Path) -> list[dict]:
    """A parquet file's rows; one pyarrow cannot read (not parquet: a Git LFS pointer, a truncated download) is
    a ``DataError`` naming it, as ``load_samples`` names it, and a Git LFS pointer as one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise unreadable(path, exc) from None


def read_rows(path: Path) -> list[dict]:
    """The rows of a parquet file, a folder of parquet shards (sorted by name), a jsonl or a JSON file; a
    ``ValueError`` if there is none (a failed export or the wrong file, not a set of no questions)."""
    rows = _stored_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows (an empty data file)")
    return rows


def _stored_rows(path: Path) -> list[dict]:
    if path.is_dir():
        shards = sorted(path.rglob("*.parquet"))
        if not shards:
            raise FileNotFoundError(f"{path} is a folder without .parquet files")
        return [row for shard in shards for row in _parquet_rows(shard)]
    if not path.is_file():
        raise missing(path, "data file")
    if path.suffix in (".parquet", ".pq"):
        return _parquet_rows(path)
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".json":
        return _json_rows(path)
    raise ValueError(f"{path}: unknown data format {path.suffix!r} (use .parquet, .pq, .jsonl, .json or a folder)")


class ColumnMapping(EvalSet):
    """Rows -> ``Sample`` records through the columns named here (see the module docstring).

    Args:
        path: a parquet file, a folder of parquet shards, a jsonl file or a JSON list.
        question: the column with the question text.
        answer: the reference answer's column; a list cell gives the ground truth first, then aliases.
        aliases: the column with other accepted answers, if any.
        image: the image's column; ``None`` for a text-only set.
        id: the row id's column; rows without one are ``<folder>/<file stem>-<row>``, as ``load_samples`` and the
            replay tool's recordings name them (``default_id_stem``; ``<stem>-<row>`` gave ``fvqa/test.parquet``
            and ``infoseek/test.parquet`` one set of ids, which key caches, sampling streams and replays).
        category: the column used as the per-category slice of the report, if any.
        data_source: the records' ``data_source`` (default: the loader's class name, lower case).
        image_root: the folder relative image paths resolve against (default: the data file's folder).
        where: keep only rows whose ``column`` value, as text and ignoring case, is one of those listed.
        skip_no_image: drop rows without an image (a set's text-only questions) instead of raising.
        skip_invalid: drop rows that fail validation (one warning with the count) instead of raising.
        download: fetches image cells that are URLs (all of a set's at once, on ``load``); ``None``: such
            rows are refused (see the module docstring for why this is opt-in).
    """

    where_setting = "`where:` to the values to keep"  # what a filter that keeps no row tells to change

    def __init__(self, path: str, question: str = "question", answer: str = "answer", aliases: str | None = None,
                 image: str | None = "image", id: str | None = None, category: str | None = None,
                 data_source: str | None = None, image_root: str | None = None,
                 where: dict[str, list[str]] | None = None, skip_no_image: bool = False,
                 skip_invalid: bool = False, download: ImageFetcher | None = None) -> None:  # fmt: skip
        self.path, self.question, self.answer, self.aliases = Path(path), question, answer, aliases
        self.image, self.id, self.category = image, id, category
        self.data_source = data_source or type(self).__name__.lower()
        self.image_root = Path(image_root) if image_root else None
        self.where = {k: {str(v).lower() for v in vs} for k, vs in (where or {}).items()}
        self.skip_no_image, self.skip_invalid, self.download = skip_no_image, skip_invalid, download
        self.label = f"{type(self).__name__} {self.path}"
        self.id_stem = default_id_stem(self.path)
        self._fetched: dict[str, Fetched] = {}  # this load's downloads, by URL

    def load(self) -> list[Sample]:
        rows = list(enumerate(read_rows(self.path)))
        # The filters keep a row that is not an object: ``sample`` rejects it with an error naming the row,
        # which ``skip_invalid`` can skip (``.get`` here would fail with an AttributeError naming nothing).
        for column, accepted in self.where.items():
            kept = [(i, r) for i, r in rows if not isinstance(r, dict) or str(r.get(column, "")).lower() in accepted]
            if not kept:  # "no rows" named neither the filter nor what the file holds
                raise self.filtered_out(column, rows)
            rows = kept
        if self.skip_no_image and self.image is not None:
            rows = [(i, r) for i, r in rows if not isinstance(r, dict) or not _empty(r.get(self.image))]
        if self.download is not None and self.image is not None:  # one batch: downloads run concurrently
            urls = [u for _, r in rows if isinstance(r, dict) and (u := image_url(r.get(self.image)))]
            self._fetched = self.download.fetch(list(dict.fromkeys(urls))) if urls else {}
        return collect(rows, lambda pair, _where, _i: self.sample(pair[1], pair[0]), self.label, self.skip_invalid)

    def filtered_out(self, column: str, rows: list[tuple[int, dict]]) -> DataError:
        """The error of a ``where`` filter that keeps none of ``rows``: the column, the values it accepts and
        the (most common) values the file holds, and the setting that changes it (``where_setting``)."""
        found = Counter(repr(r[column]) if column in r else "<no such column>" for _, r in rows)
        shown = ", ".join(f"{v} ({n})" for v, n in found.most_common(10))
        return DataError(f"{self.label}: no row's {column!r} is one of {sorted(self.where[column])} (compared "
                         f"ignoring case); values found (rows): {shown}. Set {self.where_setting}")  # fmt: skip

    def sample(self, r: dict, i: int) -> Sample:
        """One row (``i``: its index in the file, for error messages) as a ``Sample``."""
        if not isinstance(r, dict):
            raise row_error(self.label, i, "<row>", f"expected an object, got {type(r).__name__}")
        question = question_text(r.get(self.question), self.label, i, self.question)
        answers = answer_list(r.get(self.answer), self.label, i, self.answer)
        if not answers:
            raise row_error(self.label, i, self.answer, f"no answer ({r.get(self.answer)!r:.40})")
        extra = answer_list(r.get(self.aliases), self.label, i, self.aliases) if self.aliases else []
        category = r.get(self.category) if self.category else None
        url = image_url(r.get(self.image)) if self.image else None
        return Sample(
            id=str(r[self.id]) if self.id and r.get(self.id) not in (None, "") else f"{self.id_stem}-{i}",
            question=question,
            image=self.cell_image(r.get(self.image), i) if self.image else None,
            ground_truth=answers[0],
            candidate_answers=other_answers(answers, extra),
            data_source=self.data_source,
            image_url=url,
            category=label(category),
        )

    def cell_image(self, value, i: int) -> Image.Image | EncodedImage:
        """The image a cell holds (bytes, ``{"bytes", "path"}``, PIL, base64, a file path or a URL). Bytes,
        files and base64 are checked once and kept encoded (decoded when ``Sample.image`` is read: a set of
        thousands of images is not held decoded); a PIL cell or a download is kept as RGB."""
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, Image.Image | bytes) and value:
            return encoded_image(value, self.label, i, self.image)
        if not isinstance(value, str) or not value.strip():
            raise row_error(self.label, i, self.image, f"no image ({value!r:.40})")
        if image_url(value):
            return self.url_image(value.strip(), i)
        return text_image(value, self.image_files(value.strip()), self.label, i, self.image)

    def url_image(self, url: str, i: int) -> Image.Image:
        """The downloaded image at ``url`` (row ``i``), or a ``DataError`` naming the row, field and URL."""
        if self.download is None:
            raise row_error(self.label, i, self.image, f"is a URL ({url:.80}); give the loader a download fetcher "
                            "(mmsr.tools.web.download.ImageDownloader) or download the images and name the files")  # fmt: skip
        got = self._fetched.get(url) or self.download.fetch([url])[url]
        if got.image is None:
            raise row_error(self.label, i, self.image, f"download of {url} failed: {got.error}")
        return got.image

    def image_files(self, name: str) -> list[Path]:
        """Where an image cell's file may be, first the path as written (relative to ``image_root``)."""
        return [(self.image_root or self.path.parent) / name]


def _empty(cell) -> bool:
    if isinstance(cell, dict):
        return not (cell.get("bytes") or cell.get("path"))
    return cell is None or (isinstance(cell, str | bytes) and not cell.strip())
