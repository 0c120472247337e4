"""Turn text -> ``Action``: which action one assistant turn ends in, under the configured tools' grammar.

The rollout parser is deliberately more lenient than the format reward (``mmsr.reward.format``):
it decides what to *execute* (multi-line queries, whitespace inside the image tag, trailing text
after the tag are all fine), while the reward decides whether the turn was *well formed*.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from mmsr.rollout.actions import Action, Answer, Invalid, tool_use
from mmsr.tools.spec import MMSEARCH_R1_TOOLS, ToolSpec


class ActionParser:
    """The action grammar of a set of tools: ``<answer>`` plus each tool's ``<tag>``.

    A tag's content may not contain another action tag (opening or closing), so for nested tags the
    innermost complete one is the match, and a stray closing tag can't be swallowed into a query.
    """

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        tags = "|".join(sorted({re.escape(t.tag) for t in tools} | {"answer"}, key=len, reverse=True))
        no_tag = rf"(?:(?!</?(?:{tags})>).)*"
        self.answer = re.compile(rf"<answer>({no_tag})</answer>", re.DOTALL)
        self.patterns = {t.name: re.compile(_tag_pattern(t, no_tag), re.DOTALL) for t in tools}
        self.tools = {t.name: t for t in tools}
        self.by_tag = {t.tag: t for t in tools}
        self.opening = re.compile(rf"<({tags})>")

    def __call__(self, text: str) -> Action:
        """Parse the action one assistant turn ends in. Pure; never raises (see ``parse_action``)."""
        match, name = self._last_complete_tag(text)
        if match is None:
            return self._invalid_without_tag(text)
        if name is None:
            return Answer(match.group(1).strip())
        spec = self.tools[name]
        if spec.argument == "image":
            return tool_use(spec, "")
        arg = " ".join(match.group(1).split())
        return tool_use(spec, arg) if arg else Invalid(f"empty {spec.tag} query")

    def _last_complete_tag(self, text: str) -> tuple[re.Match[str] | None, str | None]:
        """The complete action tag that ends last and its tool's name (None: the answer), or (None, None)."""
        best, best_name = None, None
        for name, pattern in ((None, self.answer), *self.patterns.items()):
            last = None
            for last in pattern.finditer(text):  # noqa: B007 - only the last match is kept (no list of them all)
                pass
            if last is not None and (best is None or last.end() > best.end()):
                best, best_name = last, name
        return best, best_name

    def _invalid_without_tag(self, text: str) -> Invalid:
        """Why a text with no complete action tag is invalid (judged by its last opening tag)."""
        openings = self.opening.findall(text)
        if not openings:
            return Invalid("no action tag")
        spec = self.by_tag.get(openings[-1])
        if spec is not None and spec.argument == "image":
            return Invalid(f"malformed <{spec.tag}> (expected <{spec.tag}><img></{spec.tag}>)")
        return Invalid(f"unclosed <{openings[-1]}>")


def _tag_pattern(spec: ToolSpec, no_tag: str) -> str:
    tag = re.escape(spec.tag)
    return rf"<{tag}>\s*<img>\s*</{tag}>" if spec.argument == "image" else rf"<{tag}>({no_tag})</{tag}>"


@functools.lru_cache(maxsize=32)
def parser_for(tools: tuple[ToolSpec, ...]) -> ActionParser:
    """The (cached) parser of a set of tools."""
    return ActionParser(tools)


def parse_action(text: str, tools: Sequence[ToolSpec] = MMSEARCH_R1_TOOLS) -> Action:
    """Parse the action one assistant turn ends in. Pure; never raises.

    Semantics (shown for the default tools, MMSearch-R1's; any configured tool parses the same way by its
    argument kind):
      * The action is the LAST complete action tag in ``text`` (the one whose closing tag ends
        last); text after it (trailing chars, whitespace) is ignored.
      * ``<search><img></search>`` (whitespace allowed between the parts) -> ``ImageSearch()``.
        ``<search>`` without ``<img>`` is not an image search.
      * ``<text_search>q</text_search>`` (q may span lines) -> ``TextSearch(q)`` with q stripped and
        inner whitespace runs collapsed to one space; a blank q -> ``Invalid("empty text_search
        query")``. Any other tool -> ``ToolUse(name, arg)``.
      * ``<answer>x</answer>`` (x may span lines) -> ``Answer(x.strip())`` (x may be empty).
      * Tags do not nest: a tag's content may not contain another action tag, so in
        ``<text_search>a <text_search>b</text_search>`` the query is ``b``, and in
        ``<text_search>a <answer>b</answer></text_search>`` the action is ``Answer("b")`` (the
        outer text_search is not a complete tag). Of duplicated tags the last one wins.
      * No complete tag: the last opening tag decides the reason, ``Invalid("unclosed <answer>")``
        / ``"unclosed <text_search>"`` / ``"malformed <search> (expected <search><img></search>)"``;
        no tag at all -> ``Invalid("no action tag")``.
    """
    return parser_for(tuple(tools))(text)
