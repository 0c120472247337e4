"""JSON-lines files of objects (search indexes, corpora, reading pages), read with errors that name the
file and line."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from mmsr.data.paths import require_file


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; ValueError naming file and line otherwise."""
    text = require_file(path, "JSON-lines file").read_text(encoding="utf-8")
    rows = []
    for line_no, row in json_values(path, text):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object")
        rows.append((line_no, row))
    if not rows:
        raise ValueError(f"{path}: no entries")
    return rows


def json_values(path: Path | str, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of JSON-lines ``text`` read from ``path`` (split by
    ``jsonl_lines``); ValueError naming file and line for one that is not JSON."""
    for line_no, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
        yield line_no, value


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSON-lines ``text`` as ``Path.read_text`` returns it (CRLF and CR endings already read as
    LF), split at LF alone: ``str.splitlines`` also splits at U+2028, U+2029 and U+0085, which
    ``json.dumps(ensure_ascii=False)`` writes unescaped inside strings, and so cut valid lines in two. A final
    LF ends the last line rather than starting an empty one, as with ``splitlines``: line numbers stay."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def required_field(row: dict[str, Any], key: str, where: str, types: type | tuple[type, ...] = str) -> Any:
    """``row[key]``, checked for presence and type."""
    if key not in row:
        raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], types):
        raise ValueError(f"{where}: field {key!r} has type {type(row[key]).__name__}")
    return row[key]
