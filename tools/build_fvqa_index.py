"""Build offline search indexes for ``data/fvqa_dev_20`` from its recorded real tool outputs.

Every FVQA dev row carries ``mmsearch_r1_7b_run.rounds[].tool``: what MMSearch-R1-7B actually got back from
Google Lens (image search) and from web search + page summaries (text search). This script turns those
recordings into the two files the local backends in :mod:`mmsr.tools.local` read:

``image_index.jsonl`` (for :class:`~mmsr.tools.local.LocalImageSearch`), one row per FVQA image that has a
recorded image search::

    {"image": "../images/<data_id>.jpg",   # relative to the index file's folder
     "title": <first title the model was shown>, "titles": [<all titles shown, in rank order>],
     "failed_titles": [<Lens titles whose thumbnail failed, so the model never saw them>],
     "data_id": <row id>}

Rows without a recorded image search get no entry: the recording holds no other real title for them, and
we never invent titles from the ground truth. If a row's titles all failed, the failed ones stand in.

``corpus.jsonl`` (for :class:`~mmsr.tools.local.LocalTextSearch`), one passage per recorded text-search
result::

    {"id": "<data_id>/round<r>/rank<k>", "title": ..., "text": <LLM page summary, else the search snippet>,
     "url": ..., "data_id": ..., "text_source": "summary" | "snippet"}

Output is deterministic: rows follow the source file order and JSON is written with fixed key order.

Usage: ``python tools/build_fvqa_index.py --src data/fvqa_dev_20 --out data/fvqa_dev_20/search``
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

IMAGE_INDEX = "image_index.jsonl"
CORPUS = "corpus.jsonl"
SOURCE_FILE = "fvqa_dev.jsonl"


def load_rows(src: Path) -> list[dict]:
    """The FVQA dev rows, in file order."""
    with open(src / SOURCE_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _tool_calls(row: dict, action: str) -> Iterator[tuple[int, dict]]:
    """(round number, tool record) for each recorded call of ``action`` in the row's run."""
    for turn in row["mmsearch_r1_7b_run"]["rounds"]:
        if turn["action"] == action and turn.get("tool"):
            yield turn["round"], turn["tool"]


def _unique(items: list[str]) -> list[str]:
    """``items`` without repeats, first occurrence kept (several image searches may return the same page)."""
    return list(dict.fromkeys(items))


def image_entry(row: dict, src: Path, out: Path) -> dict | None:
    """The image-index row for one FVQA row, or None if its recording holds no image-search title."""
    shown: list[str] = []
    failed: list[str] = []
    for _, tool in _tool_calls(row, "image_search"):
        shown += tool["titles"]
        failed += [f["title"] for f in sorted(tool["failures"], key=lambda f: f["index"])]
    shown, failed = _unique(shown), _unique(failed)
    if not shown and not failed:
        return None
    # as_posix + relpath keep the file identical on every machine that builds into the same layout.
    image = Path(os.path.relpath(src / row["image"], out)).as_posix()
    top = (shown or failed)[0]
    return {"image": image, "title": top, "titles": shown, "failed_titles": failed, "data_id": row["data_id"]}


def corpus_entries(row: dict) -> list[dict]:
    """One passage per recorded text-search result of the row: the page summary if any, else the snippet."""
    passages = []
    for round_no, tool in _tool_calls(row, "text_search"):
        summaries = {s["rank"]: (s.get("summary") or "").strip() for s in tool.get("summaries", [])}
        for result in tool["results"]:
            summary = summaries.get(result["rank"], "")
            passages.append({
                "id": f"{row['data_id']}/round{round_no}/rank{result['rank']}",
                "title": result["title"],
                "text": summary or result.get("snippet") or "",
                "url": result["url"],
                "data_id": row["data_id"],
                "text_source": "summary" if summary else "snippet",
            })
    return passages


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def render(src: Path, out: Path) -> dict[str, str]:
    """The content of each output file (by file name), without writing anything."""
    rows = load_rows(src)
    images = [e for e in (image_entry(r, src, out) for r in rows) if e is not None]
    passages = [p for r in rows for p in corpus_entries(r)]
    return {IMAGE_INDEX: _jsonl(images), CORPUS: _jsonl(passages)}


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: build both index files from ``--src`` into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path("data/fvqa_dev_20"), help="dataset folder")
    parser.add_argument("--out", type=Path, default=Path("data/fvqa_dev_20/search"), help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in render(args.src, args.out).items():
        # newline="\n": byte-identical files on every OS.
        (args.out / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {args.out / name} ({text.count(chr(10))} rows)")


if __name__ == "__main__":
    main()
