"""Rows on disk -> ``Sample`` records, validated, with errors that name the file, row and field.

Formats:
- MMSearch-R1 / verl parquet (``prompt``, ``images``, ``reward_model``, ``data_source``,
  ``image_urls``, ``extra_info``; spec §8), e.g. the official ``mini_data.pq`` unchanged;
- jsonl with an image folder (one object per line: ``data_id``/``id``, ``question``, ``ground_truth``,
  ``candidate_answers``, ``image`` as a path relative to the jsonl file, optional ``data_source``,
  ``category``, ``image_url``), e.g. ``data/fvqa_dev_20``;
- a Hugging Face ``datasets`` directory written by ``save_to_disk`` (either schema; images may be
  decoded ``PIL`` images), and in Python any ``datasets.Dataset`` via ``mmsr.data.hf``.

The row schemas and their validation are ``mmsr.data.rows``; this module reads the files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from mmsr.data.jsonl import jsonl_lines
from mmsr.data.paths import require_file
from mmsr.data.errors import DataError, data_text, row_error, unreadable
from mmsr.data.rows import RowMaker, collect, default_id_stem, jsonl_sample, parquet_sample
from mmsr.data.sample import Sample

__all__ = ["DataError", "load_samples"]


def _parquet_rows(path: Path, batch_rows: int = 256) -> Iterator[dict]:
    """The rows, read ``batch_rows`` at a time: only a batch is ever held as Python objects (a whole
    file's rows as a list would be a second copy of its images beside the table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = batch = None
    try:  # a file that is no parquet fails on opening, a damaged one in a batch: pyarrow names neither
        file = pq.ParquetFile(path)
        for batch in file.iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise unreadable(path, exc) from None
    del file, batch  # they hold the last row group's buffers
    # Arrow's allocator keeps freed buffers for reuse: ~400 MB after the CPU demo's train.parquet
    pa.default_memory_pool().release_unused()


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line. Errors name the line, as an editor numbers
    it: a row index would skip blank lines, and two numberings in one file's messages mislead."""
    for line_no, line in enumerate(jsonl_lines(data_text(path)), start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as exc:
            raise row_error(path, f"line {line_no}", "<line>", f"invalid JSON ({exc.msg})") from None


def _jsonl_line_sample(numbered: tuple[int, dict], path: Path, i: int, id_stem: str | None = None) -> Sample:
    """``jsonl_sample`` of a (line number, object) pair: errors name the line, the default id keeps the
    row index ``i``."""
    line_no, r = numbered
    return jsonl_sample(r, path, i, line_no, id_stem)


def _not_empty(rows: Iterator, path: Path) -> Iterator:
    """``rows``, then a ``ValueError`` if there was none: an empty file (a failed export, the wrong file) is
    a mistake, not a set of no questions (an empty held-out file validated nothing, without a word)."""
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise ValueError(f"{path}: no rows (an empty data file)")


def load_samples(path: str | Path, skip_invalid: bool = False) -> list[Sample]:
    """Read and validate every row of a parquet or jsonl file; a row without an id is ``{folder}/{stem}-{row}``
    (``mmsr.data.rows.default_id_stem``).

    Args:
        skip_invalid: drop bad rows (with one warning saying how many and why) instead of raising.

    Raises:
        ValueError: the file holds no rows.
    """
    path = Path(path)
    if path.is_dir():
        from mmsr.data.hf import load_dataset_dir

        return load_dataset_dir(path, skip_invalid)
    require_file(path, "data file")
    rows, make = _reader(path)
    return collect(_not_empty(rows, path), partial(make, id_stem=default_id_stem(path)), path, skip_invalid)


def _reader(path: Path) -> tuple[Iterator, RowMaker]:
    if path.suffix in (".parquet", ".pq"):
        return _parquet_rows(path), parquet_sample
    if path.suffix == ".jsonl":
        return _jsonl_rows(path), _jsonl_line_sample
    raise ValueError(f"{path}: unknown data format {path.suffix!r} (use .parquet, .pq or .jsonl)")
