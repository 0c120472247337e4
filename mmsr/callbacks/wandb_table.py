"""Trajectory records -> rows of a per-turn ``wandb.Table`` (imported only when wandb logging is on).

One row per assistant turn, so a table filter such as ``action == "text_search"`` shows every
query the policy issued, with its latency and what came back. Trajectory-level columns (reward,
correctness, ground truth) repeat on each of the trajectory's turns. An episode without a turn (its prompt
filled the context) has one row of its own, without a turn, so its finish reason still shows.
"""

from __future__ import annotations

import json

import wandb
from PIL import Image

from mmsr.report.records import ToolCallRecord, TrajectoryRecord, TurnRecord, data_uri_to_image

COLUMNS = [
    "step", "trajectory", "sample_id", "group", "turn", "question", "image", "model_text", "action",
    "tool_args", "tool_ok", "tool_latency_s", "titles", "thumbnails", "loss_mask_span", "sampled_tokens",
    "reward", "advantage", "correct", "answer", "ground_truth", "finish_reason",
]  # fmt: skip


def strip(images: list[Image.Image], gap: int = 4) -> Image.Image:
    """Thumbnails side by side in one image (a table cell holds one image)."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(im.height for im in images)), "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def tool_args(tool: ToolCallRecord | None) -> str:
    """The call's arguments as JSON (a tool with an image argument, image search, has no query)."""
    if tool is None:
        return ""
    return json.dumps({"query": tool.query} if tool.query else {"image": "question image"})


def turn_rows(records: list[TrajectoryRecord]) -> list[list]:
    """Rows in ``COLUMNS`` order, one per turn of every record; one without a turn (``turn`` None) for a record
    without turns, which had no row: the table did not show that the episode ran at all."""
    rows = []
    for r in records:
        image = wandb.Image(data_uri_to_image(r.image)) if r.image else None
        rows += [_row(r, image, turn) for turn in r.turns] or [_row(r, image, None)]
    return rows


def _row(r: TrajectoryRecord, image, turn: TurnRecord | None) -> list:
    """The row of ``turn`` of ``r`` (``image``: its question image's cell); ``None``: the episode's turn-less row."""
    tool = turn.tool if turn else None
    thumbs = [data_uri_to_image(u) for u in tool.images] if tool else []
    index, text, action, (start, end) = (turn.index, turn.text, turn.action, turn.span) if turn else (None, "", "", (0, 0))
    return [
        r.step, r.index, r.sample_id, r.group_id, index, r.question, image, text, action, tool_args(tool),
        tool.ok if tool else None, tool.latency_s if tool else None, " | ".join(tool.titles) if tool else "",
        wandb.Image(strip(thumbs)) if thumbs else None, f"[{start}, {end})" if turn else "", end - start,
        r.reward, r.advantage, r.correct, r.answer, r.answers[0] if r.answers else "", r.finish_reason,
    ]  # fmt: skip
