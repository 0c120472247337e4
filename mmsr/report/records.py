"""What a run keeps of its rollouts: one ``TrajectoryRecord`` per sampled episode, as JSON lines.

The ``TrajectoryLogger`` callback writes these records to ``trajectories.jsonl`` in the run
directory; ``mmsr report`` and the wandb table read them back. Images are stored inline as small
JPEG thumbnails (``data:image/jpeg;base64,...``), so the JSONL file alone is a complete, portable
record of what the policy saw and did (no side files to lose when a run directory is copied).
JPEG, not PNG: photo thumbnails are 5-10x smaller, which matters when every step is logged.
"""

from __future__ import annotations

import base64
import io
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from mmsr.data.sample import Sample
from mmsr.reward.answer import episode_answer
from mmsr.rollout.actions import Action, Answer, Invalid
from mmsr.rollout.trajectory import ToolCall, Trajectory, Turn

TRAJECTORIES_FILE = "trajectories.jsonl"  # in the run directory
# Greedy episodes on held-out questions at evaluation points of a run (the demo's before / after GRPO),
# in the run directory; ``mmsr report`` shows them side by side per question kind.
HELD_OUT_FILE = "held_out.jsonl"
ActionKind = str  # "answer", "invalid" or a tool's name ("image_search", "text_search", ...)
_DATA_URI = re.compile(r"data:image/(?:jpeg|png);base64,")


def image_to_data_uri(image: Image.Image, max_px: int) -> str:
    """A JPEG thumbnail (longest side at most ``max_px``) as a ``data:`` URI."""
    thumb = image.convert("RGB")
    thumb.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def data_uri_to_image(uri: str) -> Image.Image:
    """The image of a JPEG or PNG ``data:`` URI."""
    prefix = _DATA_URI.match(uri)
    if prefix is None:
        raise ValueError(f"not a JPEG/PNG data URI: {uri[:40]!r}")
    return Image.open(io.BytesIO(base64.b64decode(uri[prefix.end() :]))).convert("RGB")


@dataclass(frozen=True)
class ToolCallRecord:
    """One executed search: the request, and what came back (``text`` keeps its image markers)."""

    kind: str  # the tool's name
    query: str
    ok: bool
    latency_s: float
    cost: float
    titles: list[str]
    text: str
    images: list[str]
    partial: bool = False  # a transient failure cut the result short (``ToolResult.partial``: not cached)


@dataclass(frozen=True)
class TurnRecord:
    """One assistant turn.

    Attributes:
        action, argument: the parsed action and its argument (answer text, query, or why invalid).
        span: ``(start, end)`` token positions of the turn's sampled tokens: the loss-mask span.
    """

    index: int
    text: str
    action: ActionKind
    argument: str
    span: tuple[int, int]
    truncated: bool
    tool: ToolCallRecord | None


@dataclass(frozen=True)
class TrajectoryRecord:
    """One episode with its prompt and score.

    Attributes:
        step: training step (counted in steps, not optimizer updates); global_step: optimizer updates.
        index: position of the trajectory in the step's batch (``group_id`` is its GRPO group).
        image: the question image as a JPEG data URI (``None`` for text-only rows).
        correct: the reward's ``correct`` term (``None`` when the reward reports no details).
        length, sampled_tokens: tokens in the episode, and those sampled by the policy (loss mask 1).
        category: the question's kind (``Sample.category``), which the report groups episodes by;
            ``None`` for rows without one (and in files written before it was recorded).
        context: what the context budget cut or dropped (``Trajectory.context``), one line each.
    """

    step: int
    global_step: int
    index: int
    sample_id: str
    group_id: int
    data_source: str
    question: str
    answers: list[str]
    image: str | None
    reward: float
    advantage: float
    correct: bool | None
    reward_terms: dict[str, float]
    finish_reason: str
    answer: str | None
    length: int
    sampled_tokens: int
    turns: list[TurnRecord]
    category: str | None = None
    context: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # text, as ``Sample.category`` is: a number (a file written before loaders made it text, or a record built
        # in Python) reached the page, whose kinds test it for truth, and ``0`` was shown as no category, "none"
        if self.category is not None and not isinstance(self.category, str):
            object.__setattr__(self, "category", str(self.category))

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, row: dict) -> TrajectoryRecord:
        turns = [_turn_from_dict(t) for t in row["turns"]]
        return cls(**{**row, "turns": turns})


def _turn_from_dict(row: dict) -> TurnRecord:
    tool = ToolCallRecord(**row["tool"]) if row.get("tool") else None
    return TurnRecord(**{**row, "span": tuple(row["span"]), "tool": tool})


def _action(action: Action) -> tuple[ActionKind, str]:
    if isinstance(action, Answer):
        return "answer", action.text
    if isinstance(action, Invalid):
        return "invalid", action.reason
    return action.tool, action.arg


def _tool(call: ToolCall | None, max_px: int) -> ToolCallRecord | None:
    if call is None:
        return None
    r = call.result
    images = [image_to_data_uri(im, max_px) for im in r.images]
    return ToolCallRecord(call.kind, call.query, r.ok, r.latency_s, r.cost, list(r.titles), r.text, images, r.partial)


def _turn(i: int, turn: Turn, max_px: int) -> TurnRecord:
    kind, argument = _action(turn.action)
    return TurnRecord(i, turn.text, kind, argument, turn.span, turn.truncated, _tool(turn.tool_call, max_px))


def trajectory_record(
    traj: Trajectory,
    sample: Sample,
    *,
    step: int,
    global_step: int,
    index: int,
    reward: float,
    advantage: float,
    reward_terms: dict[str, float],
    max_px: int = 128,
) -> TrajectoryRecord:
    """The record of one scored trajectory; images become ``max_px`` JPEG thumbnails."""
    image = image_to_data_uri(sample.image, max_px) if sample.image is not None else None
    correct = bool(reward_terms["correct"]) if "correct" in reward_terms else None
    return TrajectoryRecord(
        step, global_step, index, traj.sample_id, traj.group_id, sample.data_source, sample.question,
        list(sample.answers), image, float(reward), float(advantage), correct,
        {k: float(v) for k, v in reward_terms.items()}, traj.finish_reason, episode_answer(traj.assistant_texts), len(traj),
        traj.num_sampled_tokens, [_turn(i, t, max_px) for i, t in enumerate(traj.turns)], sample.category,
        list(traj.context),
    )  # fmt: skip


def write_records(path: str | Path, records: Iterable[TrajectoryRecord]) -> None:
    """The records as a JSON-lines file (replacing it), as ``read_records`` reads them back."""
    Path(path).write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")


def read_records(path: str | Path) -> Iterator[TrajectoryRecord]:
    """The records of a ``trajectories.jsonl`` file; a bad line raises naming the file and line, except a bad
    last line without its newline: a kill mid-write tore it, it is skipped with a warning."""
    with open(path, "rb") as f:  # bytes: a kill can also cut a character short
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = TrajectoryRecord.from_dict(json.loads(line))
            except (ValueError, TypeError, KeyError) as exc:
                if line.endswith(b"\n"):
                    raise ValueError(f"{path}:{lineno}: not a trajectory record ({type(exc).__name__}: {exc})") from exc
                warnings.warn(f"{path}:{lineno}: skipped its last line, torn by a kill mid-write", stacklevel=2)
                return
            yield record
