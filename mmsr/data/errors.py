"""The error of a data row that cannot become a ``Sample``, naming its file, row and field: raised by every
loader (``mmsr.data.rows``, ``mmsr.data.answers``, ``mmsr.data.columns``)."""

from __future__ import annotations


class DataError(ValueError):
    """A row that cannot become a ``Sample``; the message names file, row and field."""


def row_error(path, row: int | str, field, problem) -> DataError:
    """The error for ``field`` of row ``row`` of ``path``: ``row`` is the 0-based row index, or a ready
    label such as ``"line 4"`` (jsonl files, whose readers number lines as editors do)."""
    where = row if isinstance(row, str) else f"row {row}"
    return DataError(f"{path}: {where}, field {field!r}: {problem}")
