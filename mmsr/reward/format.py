"""The format score: a trajectory must have one of the shapes upstream MMSearch-R1 allows, read off the
configured tools (``mmsr.tools.spec``; the default tools are MMSearch-R1's pair).

Valid shapes (each turn stripped first): tool turns in the order the tools are declared, each tool at
most ``format_max`` times (once for MMSearch-R1's pair), then the answer. For MMSearch-R1's pair that is exactly four:
  * answer
  * image search -> answer
  * text search -> answer
  * image search -> text search -> answer
Anything else (text -> text -> answer, text -> image -> answer, 4 turns, the "Unable to answer ..."
warning with no ``<answer>``, ...) has format 0.

This is stricter than the rollout parser (``mmsr.rollout.parse``) on purpose: an image-argument tag
must be the literal ``<search><img></search>`` and every tag must end its turn (after stripping,
so only whitespace may follow ``</answer>`` / ``</search>`` / ``</text_search>``).

A turn holds each counted tag (reason, answer and every tool's tag, opening and closing) exactly
as often as its kind says, once or never, as upstream counts them for most tags. Upstream lets a
stray ``<search>`` or ``</search>`` (not the image-search tag) into any turn; here an unbalanced tag
is a malformed turn, whatever the kind.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from mmsr.tools.spec import MMSEARCH_R1_TOOLS, ToolSpec

TurnKind = str  # "answer" or a tool's name

IMAGE_SEARCH_TAG = "<search><img></search>"

VALID_SHAPES: frozenset[tuple[TurnKind, ...]] = frozenset(
    {
        ("answer",),
        ("image_search", "answer"),
        ("text_search", "answer"),
        ("image_search", "text_search", "answer"),
    }
)


class FormatRules:
    """The turn kinds and valid shapes of a set of tools."""

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        self.tools = tuple(tools)
        tags = [tag for t in self.tools for tag in (f"<{t.tag}>", f"</{t.tag}>")]
        self.counted = ("<reason>", "</reason>", "<answer>", "</answer>", *tags)
        # kind -> (its pattern, how often each counted tag occurs in it). The counts come first: with each
        # tag at most once the patterns' `.*` cannot backtrack more than linearly on a huge turn.
        self.kinds: dict[TurnKind, tuple[re.Pattern[str], tuple[int, ...]]] = {
            "answer": (re.compile(r"^<reason>.*</reason>.*<answer>.*</answer>$", re.DOTALL), self._counts(["answer"])),
        }
        for t in self.tools:
            tag, body = re.escape(t.tag), "<img>" if t.argument == "image" else ".*"
            pattern = re.compile(rf"^<reason>.*</reason>.*<{tag}>{body}</{tag}>$", re.DOTALL)
            self.kinds[t.name] = (pattern, self._counts([t.tag]))
        # Lenient on purpose: counts every call the rollout may have executed (whitespace inside an image tag).
        self.call_tag = _any_tag(self.tools)

    def _counts(self, tags: list[str]) -> tuple[int, ...]:
        wanted = {"<reason>", "</reason>", *(f"<{t}>" for t in tags), *(f"</{t}>" for t in tags)}
        return tuple(int(tag in wanted) for tag in self.counted)

    def turn_kind(self, turn: str) -> TurnKind | None:
        t = turn.strip()
        counts = tuple(t.count(tag) for tag in self.counted)
        for kind, (pattern, expected) in self.kinds.items():
            if counts == expected and pattern.match(t):
                return kind
        return None

    def valid(self, kinds: Sequence[TurnKind | None]) -> bool:
        """Tool turns in declaration order, each tool at most its ``format_max`` times, then the answer."""
        if not kinds or kinds[-1] != "answer":
            return False
        order = [t.name for t in self.tools]
        positions = [order.index(k) if k in order else -1 for k in kinds[:-1]]
        in_order = all(p >= 0 for p in positions) and positions == sorted(positions)
        return in_order and all(positions.count(i) <= t.format_max for i, t in enumerate(self.tools))


def _any_tag(tools: Sequence[ToolSpec]) -> re.Pattern[str]:
    """A pattern finding any of ``tools``' call tags (none: a pattern that never matches)."""
    return re.compile("|".join(_lenient_tag(t) for t in tools) or r"(?!)")


def _lenient_tag(t: ToolSpec) -> str:
    tag = re.escape(t.tag)
    return rf"<{tag}>\s*<img>\s*</{tag}>" if t.argument == "image" else rf"<{tag}>"


@functools.lru_cache(maxsize=32)
def rules(tools: tuple[ToolSpec, ...] = MMSEARCH_R1_TOOLS) -> FormatRules:
    """The (cached) format rules of a set of tools."""
    return FormatRules(tools)


def turn_kind(turn: str, tools: Sequence[ToolSpec] = MMSEARCH_R1_TOOLS) -> TurnKind | None:
    """The kind of a well-formed turn (``"answer"`` or a tool's name), or None if the turn is malformed."""
    return rules(tuple(tools)).turn_kind(turn)


def format_ok(turns: list[str], tools: Sequence[ToolSpec] = MMSEARCH_R1_TOOLS) -> bool:
    """Whether the assistant turns form a valid shape (for the default tools, one of ``VALID_SHAPES``)."""
    r = rules(tuple(tools))
    return r.valid([r.turn_kind(t) for t in turns])


def search_count(turns: list[str], tools: Sequence[ToolSpec] = MMSEARCH_R1_TOOLS) -> int:
    """Number of NON-final turns containing a tool's tag (the final turn should be the answer)."""
    call_tag = rules(tuple(tools)).call_tag
    return sum(call_tag.search(t) is not None for t in turns[:-1])


def penalized_count(turns: list[str], tools: Sequence[ToolSpec] = MMSEARCH_R1_TOOLS) -> int:
    """Number of NON-final turns containing the tag of a tool whose calls the search penalty counts
    (``ToolSpec.penalized``). A malformed turn holding a penalized tag and a free one counts: the doubt goes
    against the policy."""
    return search_count(turns, tuple(t for t in tools if t.penalized))
