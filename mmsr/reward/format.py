"""The format score: a trajectory must have one of exactly four shapes (upstream MMSearch-R1).

Valid shapes (each turn stripped first):
  * answer
  * image search -> answer
  * text search -> answer
  * image search -> text search -> answer
Anything else (text -> text -> answer, text -> image -> answer, 4 turns, the "Unable to answer ..."
warning with no ``<answer>``, ...) has format 0.

This is stricter than the rollout parser (``mmsr.rollout.parse``) on purpose: the image-search tag
must be the literal ``<search><img></search>`` and every tag must end its turn (after stripping,
so only whitespace may follow ``</answer>`` / ``</search>`` / ``</text_search>``).

A turn holds each counted tag (reason, answer, search and text-search, opening and closing) exactly
as often as its kind says, once or never, as upstream counts them for most tags. Upstream lets a
stray ``<search>`` or ``</search>`` (not the image-search tag) into any turn; here an unbalanced tag
is a malformed turn, whatever the kind.
"""

from __future__ import annotations

import re
from typing import Literal

TurnKind = Literal["answer", "image_search", "text_search"]

IMAGE_SEARCH_TAG = "<search><img></search>"
_ANSWER_TURN = re.compile(r"^<reason>.*</reason>.*<answer>.*</answer>$", re.DOTALL)
_IMAGE_SEARCH_TURN = re.compile(r"^<reason>.*</reason>.*<search><img></search>$", re.DOTALL)
_TEXT_SEARCH_TURN = re.compile(r"^<reason>.*</reason>.*<text_search>.*</text_search>$", re.DOTALL)
# Lenient on purpose: counts every search the rollout may have executed (whitespace inside the tag).
_SEARCH_TAG = re.compile(r"<search>\s*<img>\s*</search>|<text_search>")
_COUNTED = ("<reason>", "</reason>", "<answer>", "</answer>", "<search>", "</search>", "<text_search>", "</text_search>")
# kind -> (its pattern, how often each of _COUNTED occurs in it). The counts come first: with each
# tag at most once the patterns' `.*` cannot backtrack more than linearly on a huge turn.
_KINDS: dict[TurnKind, tuple[re.Pattern[str], tuple[int, ...]]] = {
    "answer": (_ANSWER_TURN, (1, 1, 1, 1, 0, 0, 0, 0)),
    "image_search": (_IMAGE_SEARCH_TURN, (1, 1, 0, 0, 1, 1, 0, 0)),
    "text_search": (_TEXT_SEARCH_TURN, (1, 1, 0, 0, 0, 0, 1, 1)),
}

VALID_SHAPES: frozenset[tuple[TurnKind, ...]] = frozenset(
    {
        ("answer",),
        ("image_search", "answer"),
        ("text_search", "answer"),
        ("image_search", "text_search", "answer"),
    }
)


def turn_kind(turn: str) -> TurnKind | None:
    """The kind of a well-formed turn, or None if the turn is malformed."""
    t = turn.strip()
    counts = tuple(t.count(tag) for tag in _COUNTED)
    for kind, (pattern, expected) in _KINDS.items():
        if counts == expected and pattern.match(t):
            return kind
    return None


def format_ok(turns: list[str]) -> bool:
    """Whether the assistant turns form one of the four valid shapes."""
    return tuple(turn_kind(t) for t in turns) in VALID_SHAPES


def search_count(turns: list[str]) -> int:
    """Number of NON-final turns containing a search tag (the final turn should be the answer)."""
    return sum(_SEARCH_TAG.search(t) is not None for t in turns[:-1])
