"""Resumable evaluation: every finished batch of episodes (judged, when a judge is configured) is appended
to a work file in the output directory, ``episodes.partial.jsonl``, one line a batch; a rerun of the same
evaluation into the same ``--out`` takes those batches from it instead of running them again.

A batch is the same slice of a set's questions in every run (``--batch-size`` is part of the run), so a
resumed evaluation gives the episodes an uninterrupted one gives, and a line cut by a crash is not valid
JSON: that batch runs again. The file's first line names the arguments that decide the episodes; a rerun
with other ones is refused, naming the file, rather than mixing two evaluations. The command removes the
file once everything it wrote is complete (``trajectories.jsonl`` holds the same records).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from mmsr.data.jsonl import jsonl_lines
from mmsr.eval.report import EvalRecord

WORK_FILE = "episodes.partial.jsonl"

BatchKey = tuple[str, str, int]  # (set, workflow, index of the batch's first question)


class EvalWork:
    """The work file ``path`` of the evaluation described by ``run`` (JSON-able arguments).

    Raises:
        ValueError: ``path`` holds the batches of an evaluation with other arguments.
    """

    def __init__(self, path: str | Path, run: Mapping[str, object]) -> None:
        self.path, self.run = Path(path), as_json(run)
        self._done: dict[BatchKey, tuple[list[str], list[EvalRecord]]] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        lines = jsonl_lines(text)
        header = parse_line(lines[0]) if lines else None
        if header is None or "run" not in header:  # the header itself was cut: nothing in the file counts
            self.path.unlink()
            return
        same_run(self.path, header["run"], self.run, "the episodes of another evaluation", "choose another --out")
        kept = [lines[0]]
        for line in lines[1:]:
            if (row := parse_line(line)) is not None:
                kept.append(line)
                self._done[(row["set"], row["workflow"], row["start"])] = (row["ids"], [EvalRecord(**r) for r in row["records"]])
        if len(kept) < len(lines) or not text.endswith("\n"):  # a cut line: the next batch must start a line of its own
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            tmp.replace(self.path)

    def done(self, key: BatchKey, ids: Sequence[str]) -> list[EvalRecord] | None:
        """The records of batch ``key`` if it was finished on these questions (``ids``, in order), else None."""
        found = self._done.get(key)
        return found[1] if found is not None and found[0] == list(ids) else None

    def add(self, key: BatchKey, ids: Sequence[str], records: Sequence[EvalRecord]) -> None:
        """Append a finished batch (one line, flushed to disk before the next batch starts)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        row = {"set": key[0], "workflow": key[1], "start": key[2], "ids": list(ids), "records": [asdict(r) for r in records]}
        with self.path.open("a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"run": self.run}) + "\n")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._done[key] = (list(ids), list(records))

    def finish(self) -> None:
        """Everything is written elsewhere: the work file goes."""
        self.path.unlink(missing_ok=True)


def as_json(run: Mapping[str, object]) -> dict:
    """``run`` as it reads back from a work file (tuples become lists), so the two compare equal."""
    return json.loads(json.dumps(dict(run)))


def same_run(path: Path, before: Mapping[str, object], now: Mapping[str, object], holds: str, other: str) -> None:
    """Refuse a work file written with other arguments (``holds``: what it holds; ``other``: the way out).

    Raises:
        ValueError: naming the file and the first argument that differs.
    """
    if before != as_json(now):
        raise ValueError(f"{path} holds {holds} ({difference(before, now)}): delete it to start over, or {other}")


def parse_line(line: str) -> dict | None:
    """A work file's line as an object; None for a line cut by a crash (not JSON) or not an object."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def difference(before: Mapping[str, object], now: Mapping[str, object]) -> str:
    """The first argument whose value differs, in words."""
    for name in sorted(set(before) | set(now)):
        if before.get(name) != now.get(name):
            return f"--{name.replace('_', '-')} was {before.get(name)!r}, now {now.get(name)!r}"
    return "the same arguments"
