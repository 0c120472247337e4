"""List the rows of an FVQA image-search cache whose thumbnails are gone.

Reads the cache pickle(s) as training does (``mmsr.tools.fvqa_cache``: the restricted unpickler, the same
thumbnail fetching with the SSRF guard and caps), tries every thumbnail of every row (or of ``--ids``), and
writes one JSON line per row with a thumbnail that is gone (``dead``: a 404, a file that is no image) or that a
transient failure kept (``unreachable``: a 429 or 5xx, a timeout; worth another try later)::

    {"data_id": "fvqa_train_17", "dead": [{"rank": 5, "url": "https://...", "reason": "HTTP 404 ..."}], "unreachable": [], "kept": 4}

then a summary line ``{"rows": ..., "rows_with_dead_thumbnails": ..., "dead_thumbnails": ...,
"rows_with_unreachable_thumbnails": ..., "rows_empty": ...}`` (``rows_empty``: rows where no thumbnail could be
had, which training sees as a failed search). Nothing is written to the tool cache.

Usage: ``python tools/check_fvqa_cache.py data/fvqa/fvqa_train_image_search_results_cache.pkl [--ids a b]
[--out dead.jsonl]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TextIO

from mmsr.tools.budget import Deadline
from mmsr.tools.fvqa_cache import FVQACacheSearch


async def check(tool: FVQACacheSearch, ids: Sequence[str], batch: int = 64) -> list[str]:
    """Look every row of ``ids`` up (``batch`` rows at a time); ``tool.dead`` then holds the dead thumbnails.
    Returns the rows that came back with no thumbnail at all."""
    empty: list[str] = []
    for i in range(0, len(ids), batch):
        chunk = ids[i : i + batch]
        results = await asyncio.gather(*(tool.lookup(d, tool.rows[d], Deadline(), time.perf_counter()) for d in chunk))
        empty += [d for d, r in zip(chunk, results) if not r.images]
    return empty


def report(tool: FVQACacheSearch, ids: Sequence[str], empty: list[str], out: TextIO) -> dict[str, int]:
    """Write the dead rows and the summary (module docstring) to ``out``; returns the summary."""
    dead, unreachable = tool.dead_thumbnails(), tool.dead_thumbnails(unreachable=True)
    for data_id in sorted(dead.keys() | unreachable.keys()):
        lost = {"dead": dead.get(data_id, []), "unreachable": unreachable.get(data_id, [])}
        kept = len(tool.rows[data_id].thumbnails) - sum(len(t) for t in lost.values())
        out.write(json.dumps({"data_id": data_id} | {k: [asdict(t) for t in v] for k, v in lost.items()} | {"kept": kept}) + "\n")
    summary = {"rows": len(ids), "rows_with_dead_thumbnails": len(dead), "dead_thumbnails": sum(len(t) for t in dead.values()),
               "rows_with_unreachable_thumbnails": len(unreachable), "rows_empty": len(empty)}  # fmt: skip
    out.write(json.dumps(summary) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="the cache pickle(s)")
    parser.add_argument("--ids", nargs="*", help="only these data_ids (default: every row)")
    parser.add_argument("--out", help="write the JSON lines here (default: stdout)")
    parser.add_argument("--allow-private", action="store_true", help="let thumbnail URLs reach private addresses")
    args = parser.parse_args(argv)
    tool = FVQACacheSearch(args.paths, tool_cache=None, allow_private=args.allow_private)
    ids = args.ids if args.ids else sorted(tool.rows)
    unknown = [d for d in ids if d not in tool.rows]
    if unknown:
        parser.error(f"not in the cache: {', '.join(unknown[:10])}")
    empty = asyncio.run(check(tool, ids))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            return report(tool, ids, empty, f)
    return report(tool, ids, empty, sys.stdout)


if __name__ == "__main__":
    main()
