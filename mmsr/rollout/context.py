"""The context budget of long episodes: an observation that does not fit is cut to fit (its images dropped,
then its text shortened to the longest prefix that fits), and every cut is written down in words for the
trajectory log (``Trajectory.context``).

Only the newest observation is ever cut; earlier turns are never rewritten or dropped. An episode trains as
one sequence whose sampled tokens are scored in exactly the context they were sampled in; dropping an old
observation to make room would give later turns a context the trainer's forward never sees (their log-probs
and the loss would then belong to different sequences), or force one training sequence per turn."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from mmsr.tools.base import IMAGE_MARKER, ToolResult

DROPPED_IMAGE = "[image dropped: context budget]"
CUT = " [cut: context budget]"


def _with_text(result: ToolResult, text: str, images: tuple = ()) -> ToolResult:
    return replace(result, text=text, images=images)


def fit(result: ToolResult, tokens: Callable[[ToolResult], int], limit: int) -> ToolResult | None:
    """The fullest version of ``result`` whose observation takes at most ``limit`` tokens (``tokens`` counts
    them): all of it; else without its images (each marker says so); else with its text cut to the longest
    prefix that fits, ending in ``CUT``. ``None`` when not even an empty text fits."""
    if tokens(result) <= limit:
        return result
    bare = _with_text(result, result.text.replace(IMAGE_MARKER, DROPPED_IMAGE)) if result.images else result
    if tokens(bare) <= limit:
        return bare

    def cut(k: int) -> ToolResult:
        return _with_text(bare, bare.text[:k] + CUT)

    if tokens(cut(0)) > limit:
        return None
    fits, too_long = 0, len(bare.text)  # cut(fits) fits, cut(too_long) does not
    while too_long - fits > 1:
        mid = (fits + too_long) // 2
        fits, too_long = (mid, too_long) if tokens(cut(mid)) <= limit else (fits, mid)
    return cut(fits)


def describe(turn: int, kind: str, needed: int, limit: int, original: ToolResult, fitted: ToolResult | None) -> str:
    """One line for the trajectory log: what the budget did to turn ``turn``'s ``kind`` observation."""
    head = f"turn {turn}: {kind} observation of {needed} tokens, {limit} left for it:"
    if fitted is None:
        return f"{head} dropped, the episode ends (truncated)"
    parts = [f"dropped {len(original.images)} images"] if len(fitted.images) < len(original.images) else []
    if fitted.text.endswith(CUT) and not original.text.endswith(CUT):
        kept = len(fitted.text) - len(CUT)
        parts.append(f"text cut from {len(original.text)} to {kept} characters")
    return f"{head} {', '.join(parts)}"
