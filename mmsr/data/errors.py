"""The error of a data row that cannot become a ``Sample``, naming its file, row and field, or of a data file
that cannot be read at all, naming the file: raised by every loader (``mmsr.data.rows``, ``mmsr.data.answers``,
``mmsr.data.columns``, ``mmsr.data.loaders``)."""

from __future__ import annotations

from pathlib import Path

LFS_POINTER = "version https://git-lfs"  # how a Git LFS pointer file begins (its spec's first line)


class DataError(ValueError):
    """A row that cannot become a ``Sample``, or a data file that cannot be read; the message names file, row
    and field (a file's error: the file)."""


def row_error(path, row: int | str, field, problem) -> DataError:
    """The error for ``field`` of row ``row`` of ``path``: ``row`` is the 0-based row index, or a ready
    label such as ``"line 4"`` (jsonl files, whose readers number lines as editors do)."""
    where = row if isinstance(row, str) else f"row {row}"
    return DataError(f"{path}: {where}, field {field!r}: {problem}")


def unreadable(path: Path, exc: Exception | None = None) -> DataError:
    """The error of a data file its reader failed on (``exc``: pyarrow's, the UTF-8 decoder's, JSON's), naming
    the file: the readers' own messages do not (``Parquet magic bytes not found``). A Git LFS pointer (the file
    cloned without ``git lfs``, as upstream's InfoSeek parquet is) is named as one, with the command that fixes it."""
    message = f"{path}: cannot read the data file" + (f" ({type(exc).__name__}: {exc})" if exc is not None else "")
    if is_lfs_pointer(path):
        message += "; it is a Git LFS pointer, not the data: run `git lfs pull` in its repository"
    return DataError(message)


def is_lfs_pointer(path: Path) -> bool:
    """Whether the file begins as a Git LFS pointer does (one that cannot be opened: no)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER)) == LFS_POINTER.encode()
    except OSError:
        return False


def data_text(path: Path) -> str:
    """A jsonl or JSON data file's text, or ``unreadable``'s error: not UTF-8 (a bare ``UnicodeDecodeError``
    named no file), or a Git LFS pointer (valid text, so the first line's JSON error hid what the file is)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise unreadable(path, exc) from None
    if text.startswith(LFS_POINTER):
        raise unreadable(path)
    return text
