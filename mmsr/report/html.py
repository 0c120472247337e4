"""Trajectory records + plots -> one self-contained HTML page (every image inline, no network).

The page is rendered with Jinja2 (autoescaped: model text is untrusted and must never become
markup) from ``templates/report.html``. A tool observation is shown as the policy read it: its
text with each image marker replaced by the returned thumbnail. Held-out episodes (the same
questions evaluated at several steps, e.g. before and after GRPO) are laid out per question kind,
one row per question and one column per step, with the same renderer as the sampled ones. What the
context budget cut or dropped (the trajectory's ``context`` notes) is shown with the episode, and an
observation the budget dropped is marked as one the policy never read.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from pathlib import Path

import jinja2

from mmsr.report.records import ToolCallRecord, TrajectoryRecord
from mmsr.tools.base import IMAGE_MARKER

TEMPLATES = Path(__file__).with_name("templates")


def observation(tool: ToolCallRecord) -> list[tuple[str, str]]:
    """``("text", chunk)`` and ``("image", data URI)`` parts of the observation, in reading order."""
    chunks = tool.text.split(IMAGE_MARKER)
    parts: list[tuple[str, str]] = []
    for i, chunk in enumerate(chunks):
        if chunk.strip():
            parts.append(("text", chunk))
        if i < len(chunks) - 1 and i < len(tool.images):
            parts.append(("image", tool.images[i]))
    return parts


# ``mmsr.rollout.context.describe``'s line for an observation that did not fit at all: ``turn N`` is the turn (from 1)
# whose tool call it answers. Its record still holds the whole result, which the policy never read.
_DROPPED = re.compile(r"turn (\d+): \S+ observation of \d+ tokens, -?\d+ left for it: dropped, the episode ends")


def dropped_turns(record: TrajectoryRecord) -> set[int]:
    """The ``TurnRecord.index`` of each turn whose observation the context budget dropped (``record.context``)."""
    return {int(m.group(1)) - 1 for note in record.context if (m := _DROPPED.match(note))}


HeldOutRows = dict[str, list[list[TrajectoryRecord | None]]]


def held_out_rows(records: Sequence[TrajectoryRecord]) -> tuple[list[int], HeldOutRows]:
    """The evaluated steps, and per question kind one row per question: its episode at each step
    (``None`` where it was not evaluated then), kinds and questions in the order first seen."""
    steps = sorted({r.step for r in records})
    by_kind: dict[str, dict[str, dict[int, TrajectoryRecord]]] = {}
    for r in records:
        by_kind.setdefault(r.category or "none", {}).setdefault(r.sample_id, {})[r.step] = r
    return steps, {kind: [[eps.get(s) for s in steps] for eps in qs.values()] for kind, qs in by_kind.items()}


def stage_names(steps: Sequence[int]) -> list[str]:
    """Column headings of the held-out steps: the first is before GRPO, the last after it."""
    names = [f"step {s}" for s in steps]
    if len(names) > 1:
        names[0], names[-1] = "before GRPO", "after GRPO"
    return names


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(
    title: str,
    records: Sequence[TrajectoryRecord],
    plots: dict[str, Path],
    config: str | None = None,
    omitted: int = 0,
    held_out: Sequence[TrajectoryRecord] = (),
    found: Sequence[str] = (),
) -> str:
    """The report page.

    Args:
        title: shown in the heading (the run directory).
        records: the trajectories to show, grouped by step in the page.
        plots: PNG files by plot name, inlined as data URIs.
        config: the run's resolved config text, shown collapsed.
        omitted: how many earlier records were left out (said on the page).
        held_out: episodes on held-out questions (``HELD_OUT_FILE``); their section appears when given.
        found: the run directory's files that exist (``metrics.csv``, ``trajectories.jsonl``): where a section is
            empty, the page says whether its file is missing or holds nothing to show.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    steps = sorted({r.step for r in records})
    held_steps, held_rows = held_out_rows(held_out)
    return env.get_template("report.html").render(
        title=title, records=records, steps=steps, omitted=omitted, config=config,
        plots={name: png_data_uri(p) for name, p in plots.items()}, observation=observation, found=set(found),
        dropped_turns=dropped_turns,
        held_out=held_rows, held_steps=held_steps, held_stages=stage_names(held_steps), n_held_out=len(held_out),
    )  # fmt: skip
