"""Resumable evaluation: every finished batch of episodes (judged, when a judge is configured) is appended
to a work file in the output directory, ``episodes.partial.jsonl``, one line a batch; a rerun of the same
evaluation into the same ``--out`` takes those batches from it instead of running them again.

A batch is the same slice of a set's questions in every run (``--batch-size`` is part of the run), so a
resumed evaluation gives the episodes an uninterrupted one gives, and a line cut by a crash is not valid
JSON: that batch runs again. The file's first line names the arguments that decide the episodes, with a
fingerprint of the files and folders they name (``fingerprint``: a checkpoint overwritten by training is
another model); a rerun with other ones is refused, naming the file, rather than mixing two evaluations. Under
``--suite`` each batch also records its set's identity (``EvalWork``'s ``sets``: the set's suite entry and the
fingerprint of its data): a set fixed or re-annotated since runs again alone, its old batches dropped (said in
one line), while the other sets resume, and the suite file itself is not fingerprinted. The
command removes the file once everything it wrote is complete (``trajectories.jsonl`` holds the same
records) and the judge gave a reply for every episode it was asked about: after an outage the file stays,
and the rerun asks again only for those verdicts. It stays too while it holds batches the run did not take
(a rerun with a smaller ``--limit`` or fewer workflows), which are written nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from mmsr.data.jsonl import jsonl_lines
from mmsr.eval.report import EvalRecord
from mmsr.tools.secrets import redact_all

WORK_FILE = "episodes.partial.jsonl"
CONTENTS = "contents"  # the run's key for the fingerprints of the files it reads (``fingerprint``)
# the run's key saying each batch records its set's identity (``--suite``): a file without it predates that
SETS = "set_identity"

BatchKey = tuple[str, str, int]  # (set, workflow, index of the batch's first question)


class EvalWork:
    """The work file ``path`` of the evaluation described by ``run`` (JSON-able arguments); ``sets``: each set's
    identity (``--suite``: ``mmsr.eval.suite.set_identities``), recorded with its batches. A set whose identity
    changed since has its batches dropped from the file (one line on stderr names it) and runs again.

    Raises:
        ValueError: ``path`` holds the batches of an evaluation with other arguments.
    """

    def __init__(self, path: str | Path, run: Mapping[str, object], sets: Mapping[str, object] | None = None) -> None:
        self.path, self.run, self.sets = Path(path), as_json(run), as_json(sets or {})
        self._done: dict[BatchKey, tuple[list[str], list[EvalRecord]]] = {}
        self._used: set[BatchKey] = set()  # the batches this run took or added (another --limit leaves some out)
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        rows = read_rows(self.path)
        if not rows or "run" not in rows[0]:  # the header itself was cut: nothing in the file counts
            self.path.unlink()
            return
        same_run(self.path, rows[0]["run"], self.run, "the episodes of another evaluation", "choose another --out")
        for row in self._unchanged(rows)[1:]:
            self._done[(row["set"], row["workflow"], row["start"])] = (row["ids"], [EvalRecord(**r) for r in row["records"]])

    def _unchanged(self, rows: list[dict]) -> list[dict]:
        """``rows`` without the batches of the sets whose identity changed (``self.sets``), which go from the file
        too, each such set named on stderr: its entry or data differs, so its old episodes must not be mixed in."""
        changed = {row["set"]: row.get("identity") for row in rows[1:]
                   if row["set"] in self.sets and row.get("identity") != self.sets[row["set"]]}  # fmt: skip
        if not changed:
            return rows
        kept = [row for row in rows if row.get("set") not in changed]
        rewrite(self.path, [json.dumps(row, ensure_ascii=False) for row in kept])
        for name, before in changed.items():
            dropped = sum(row.get("set") == name for row in rows)
            print(f"mmsr eval: set {name}: {what_changed(before, self.sets[name])} since {self.path} was written: its "
                  f"{dropped} finished batch{'es' * (dropped > 1)} there {'are' if dropped > 1 else 'is'} dropped, "
                  "and it is evaluated again", file=sys.stderr)  # fmt: skip
        return kept

    def done(self, key: BatchKey, ids: Sequence[str]) -> list[EvalRecord] | None:
        """The records of batch ``key`` if it was finished on these questions (``ids``, in order), else None."""
        found = self._done.get(key)
        if found is None or found[0] != list(ids):
            return None
        self._used.add(key)
        return found[1]

    def add(self, key: BatchKey, ids: Sequence[str], records: Sequence[EvalRecord]) -> None:
        """Append a finished batch (one line, flushed to disk before the next batch starts), its records masked
        (``redact_all``: a page or a reply may quote an API key)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        masked = [asdict(redact_all(r)) for r in records]
        row = {"set": key[0], "workflow": key[1], "start": key[2], "ids": list(ids)}
        row |= {"identity": self.sets[key[0]]} if key[0] in self.sets else {}
        row["records"] = masked
        with self.path.open("a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"run": self.run}) + "\n")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._done[key] = (list(ids), list(records))
        self._used.add(key)

    def taken(self) -> list[EvalRecord]:
        """The records of the batches this run took from the file or added to it."""
        return [record for key in sorted(self._used) for record in self._done[key][1]]

    def finish(self) -> None:
        """Everything this run took is written elsewhere: the work file goes (not after a judge outage:
        ``run.judge_failed``), unless it holds finished batches this run did not take (a rerun with a smaller
        ``--limit`` or fewer workflows: they are written nowhere else), which it keeps, saying so on stderr."""
        unused = len(self._done.keys() - self._used)
        if not unused:
            self.path.unlink(missing_ok=True)
            return
        print(f"mmsr eval: {self.path} is kept: it holds {unused} finished batch{'es' * (unused > 1)} this run did not "
              "take (another --limit or --workflow, a suite without their set), which a rerun with them takes from "
              "it; delete it if they are not needed", file=sys.stderr)  # fmt: skip


def read_rows(path: Path) -> list[dict]:
    """The objects of work file ``path``, one a line. A line cut by a crash (not JSON) is dropped, and the file
    rewritten without it, ending with a newline: the next line appended must not join the cut one."""
    text = path.read_text(encoding="utf-8")
    lines = jsonl_lines(text)
    kept = [(line, row) for line in lines if (row := parse_line(line)) is not None]
    if len(kept) < len(lines) or (text and not text.endswith("\n")):
        rewrite(path, [line for line, _ in kept])
    return [row for _, row in kept]


def rewrite(path: Path, lines: Sequence[str]) -> None:
    """Replace work file ``path`` by ``lines`` (one object each), whole or not at all (a crash mid-write leaves
    the old file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)


IDENTITY_PARTS = {"entry": "its suite entry", "data": "the file or folder its path names"}


def what_changed(before: object, now: Mapping[str, object]) -> str:
    """Which part of a set's identity (``mmsr.eval.suite.set_identities``) differs, in words."""
    if not isinstance(before, dict):
        return "its batches record no identity"
    parts = [words for part, words in IDENTITY_PARTS.items() if before.get(part) != now.get(part)]
    return (" and ".join(parts) or "its identity") + " changed"


def fingerprint(path: str | Path | None, outputs: Sequence[str | Path] = ()) -> dict | None:
    """A cheap stand-in for the contents of file or folder ``path``: a file's size and ``sampled_digest``, or a
    digest of a folder's files' (relative path, size, sampled digest); None when nothing is there. Not the
    modification time: a checkpoint or data set copied afresh to a node's disk at each job start is the same
    model. Files within ``outputs`` (the command's own output folder or files) are left out: an ``--out`` inside
    a named folder changes as the command writes, and every rerun would be refused."""
    if path is None or not (path := Path(path)).exists():
        return None
    if path.is_file():
        return {"size": path.stat().st_size, "digest": sampled_digest(path)}
    skip = [Path(o).resolve() for o in outputs]
    files = sorted(f for f in path.rglob("*") if f.is_file() and not any(f.resolve().is_relative_to(o) for o in skip))
    listing = [(f.relative_to(path).as_posix(), f.stat().st_size, sampled_digest(f)) for f in files]
    return {"files": len(files), "digest": hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}


SAMPLE_BYTES = 1 << 20


def sampled_digest(file: Path) -> str:
    """A digest of a file's first, middle and last MiB (all of a file up to 3 MiB): reading a 15 GB checkpoint
    whole at every start would take minutes, and training moves nearly every weight, so an overwritten checkpoint
    differs in each of them."""
    size, digest = file.stat().st_size, hashlib.blake2b(digest_size=8)
    with file.open("rb") as f:
        for start in sorted({0, max(size // 2 - SAMPLE_BYTES // 2, 0), max(size - SAMPLE_BYTES, 0)}):
            f.seek(start)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


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
    """The first argument whose value differs, in words; then the first whose file or folder changed."""
    for name in sorted((set(before) | set(now)) - {CONTENTS}):
        if name not in before:  # an argument added since (its limits, say, may have changed with it)
            recorded = "each suite set's identity with its batches" if name == SETS else f"--{name.replace('_', '-')}"
            return f"an older mmsr wrote it: it does not record {recorded}"
        if before.get(name) != now.get(name):
            return f"--{name.replace('_', '-')} was {before.get(name)!r}, now {now.get(name)!r}"
    if CONTENTS not in before:
        return "it records no fingerprint of the files it read: an older mmsr wrote it"
    was, new = before[CONTENTS], now.get(CONTENTS) or {}
    for name in sorted(set(was) | set(new)):
        if was.get(name) != new.get(name):
            flag = "--" + name.replace("_", "-")
            return f"the file or folder {flag} names has changed since: its size, sampled bytes or files differ"
    return "the same arguments"
