"""The actions a policy turn can end in (the parser's output type)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from mmsr.tools.spec import MMSEARCH_R1_TOOLS, ToolSpec

# Generation stops right after one of these, so no tokens are sampled after an action.
STOP_STRINGS: tuple[str, ...] = ("</search>", "</text_search>", "</answer>")


def stop_strings(tools: Sequence[ToolSpec] = MMSEARCH_R1_TOOLS) -> tuple[str, ...]:
    """Every configured tool's closing tag, then ``</answer>`` (the default tools give ``STOP_STRINGS``)."""
    return (*dict.fromkeys(t.stop for t in tools), "</answer>")


@dataclass(frozen=True)
class Answer:
    """``<answer>text</answer>``: the trajectory ends."""

    text: str


@dataclass(frozen=True)
class ToolUse:
    """``<tag>arg</tag>`` of a configured tool: call tool ``tool`` with ``arg`` (empty for an image argument)."""

    tool: str
    arg: str = ""


@dataclass(frozen=True)
class ImageSearch:
    """``<search><img></search>``: reverse image search of the question's image."""

    tool: ClassVar[str] = "image_search"
    arg: ClassVar[str] = ""


@dataclass(frozen=True)
class TextSearch:
    """``<text_search>query</text_search>``: web search for ``query`` (non-empty, stripped)."""

    query: str
    tool: ClassVar[str] = "text_search"

    @property
    def arg(self) -> str:
        return self.query


@dataclass(frozen=True)
class Invalid:
    """No usable action (no tag, unclosed tag, empty query ...); ``reason`` says which."""

    reason: str


Call = ToolUse | ImageSearch | TextSearch
"""A tool call: ``.tool`` (the tool's name) and ``.arg``. The MMSearch-R1 pair keep their own classes."""
Action = Answer | Call | Invalid


def tool_use(spec: ToolSpec, arg: str) -> Call:
    """The action calling ``spec`` with ``arg``."""
    if spec.name == "image_search" and spec.argument == "image":
        return ImageSearch()
    if spec.name == "text_search" and spec.argument == "text":
        return TextSearch(arg)
    return ToolUse(spec.name, arg)
