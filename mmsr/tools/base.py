"""The tool protocol: what the rollout loop may call, and what comes back."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from mmsr.tools.secrets import redact

# Marks where each returned image sits in ``ToolResult.text``; the prompt stage replaces every marker
# with the policy's vision tokens, in order. A tool returns exactly one marker per image.
IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class ToolRequest:
    """One search request, with everything a backend may key on.

    Attributes:
        kind: the tool's name (``ToolSpec.name``), e.g. ``"image_search"`` (search the question's image) or
            ``"text_search"`` (search ``query``).
        query: the text argument (text search); empty for a tool whose argument is the image.
        image: the question's image (image search).
        image_url: the row's image URL if it has one (web image search needs a public URL).
        sample_id: the row's id (replay backends key recorded results on it).
        question: the user's question (summarizers focus page summaries on it, spec §5).
        budget_s: seconds the caller waits for the answer (the rollout's ``tool_timeout_s``); a web tool
            skips stages that would not finish in time and answers with what it has. ``None``: no limit.
        image_size: ``(width, height)`` of ``image`` as the policy sees it (after its processor's resize):
            the pixel space of coordinates the policy writes. ``None``: the image's own size.
    """

    kind: str
    query: str = ""
    image: Image.Image | None = None
    image_url: str | None = None
    sample_id: str = ""
    question: str = ""
    budget_s: float | None = None
    image_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class ToolResult:
    """What a tool returns. Failures are results too (``ok=False``), never exceptions.

    Text and titles are cleaned on construction: a lone UTF-16 surrogate (what ``json.loads`` makes of a
    snippet cut mid-emoji) becomes U+FFFD, since the tokenizer and SQLite refuse it; and they are redacted
    (``mmsr.tools.secrets``): whatever a provider echoed, no configured key reaches the model, the trajectory
    records or the server's answers.

    Attributes:
        text: the observation text shown to the model; contains one ``IMAGE_MARKER`` per image.
        images: returned images (thumbnails), in the order of their markers.
        ok: False when the search failed; ``text`` then says so in words the model can use.
        latency_s: wall-clock seconds the call took.
        cost: money spent (API backends), 0 for local ones. Both are finite and >= 0 (``ValueError`` otherwise:
            a budget cannot count NaN or inf dollars), so a tool that computes a bad one fails its call.
        titles: titles of the returned items, for logs and tables.
        partial: a transient failure (the call's deadline, a timeout, 429/5xx, the network) cut the result
            short: it is shown, but never cached, so the next call may get the whole answer.
        sent: False only where the search certainly never went out (an open circuit, no time left, nothing to
            search with), so it cannot have been billed: a budget gives back the call it reserved for it.
    """

    text: str
    images: tuple[Image.Image, ...] = ()
    ok: bool = True
    latency_s: float = 0.0
    cost: float = 0.0
    titles: tuple[str, ...] = field(default_factory=tuple)
    partial: bool = False
    sent: bool = True

    def __post_init__(self) -> None:
        # frozen: the one sanctioned way to clean a field
        object.__setattr__(self, "text", redact(_valid_utf8(self.text)))
        object.__setattr__(self, "titles", tuple(redact(_valid_utf8(t)) for t in self.titles))
        for name in ("cost", "latency_s"):  # NaN is stored as NULL and refused; inf or < 0 would break a budget
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"ToolResult {name} must be a finite number >= 0, got {value!r}")
        if self.text.count(IMAGE_MARKER) != len(self.images):
            raise ValueError(
                f"ToolResult has {len(self.images)} images but {self.text.count(IMAGE_MARKER)} "
                f"{IMAGE_MARKER!r} markers in its text"
            )


def _valid_utf8(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (a pair left as two code points is joined)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # a round trip through UTF-16 pairs what pairs and marks the rest
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


class FatalToolError(Exception):
    """A misconfiguration the rollout must not hide as an observation (e.g. a replay-only cache
    miss): the loop re-raises it instead of showing the model a failed search."""


def check_ready(tools: Mapping[str, object | None]) -> None:
    """Call ``check_ready()`` of each configured tool that has one (the files it reads on first use are there).

    Building a config touches no file, so a tool finds a missing file at its first call; a run checks at
    start-up instead, before its model loads and its engine starts, and stops with the tool's own error
    (naming the file and how to get it).
    """
    for tool in tools.values():
        check = getattr(tool, "check_ready", None)
        if check is not None:
            check()


@runtime_checkable
class SearchTool(Protocol):
    """An async search backend. Implementations must not raise for ordinary failures.

    Optional: a ``question_focused = True`` attribute, for a backend whose text search results depend on the
    request's question, not on its query alone (``depends_on_question``).
    """

    async def __call__(self, request: ToolRequest) -> ToolResult: ...


def depends_on_question(tool: object) -> bool:
    """Whether ``tool``'s text search results depend on ``ToolRequest.question`` (a web text search summarizes
    each page for it): its ``question_focused`` attribute, else False. A cache keys such a tool's text searches
    on the question too, so one question's summaries are never served to another."""
    return bool(getattr(tool, "question_focused", False))


def quoted(text: str) -> str:
    """``text`` from outside (a page, a title, an error that echoes a query) as a result shows it: an
    ``IMAGE_MARKER`` in it would claim an image that is not there, so it reads ``(image)``."""
    return text.replace(IMAGE_MARKER, "(image)")


def failure(kind: str, reason: str, latency_s: float = 0.0, sent: bool = True) -> ToolResult:
    """The observation for a failed call: the model is told and may answer on its own (``sent``: as
    ``ToolResult.sent``)."""
    header = f"[{kind.replace('_', ' ').title()} Results]"  # image_search -> [Image Search Results]
    return ToolResult(
        text=f"{header} The search failed ({quoted(reason)}). Please answer with your own knowledge.",
        ok=False,
        latency_s=latency_s,
        sent=sent,
    )


def changed_settings(owner: object, **settings: Any) -> dict[str, Any]:
    """Those of ``settings`` (``owner``'s ``__init__`` argument name -> its value) that differ from the argument's
    default, and its parts' settings (dicts, ``part_settings``) that are not empty: what a backend's
    ``cache_settings`` returns, so a backend configured as by default keys as it did before settings were keyed."""
    params = inspect.signature(type(owner).__init__).parameters
    return {name: value for name, value in settings.items()
            if value != {} and (name not in params or value != params[name].default)}  # fmt: skip


def part_settings(part: object) -> dict[str, Any]:
    """``part.cache_settings()`` (a backend, or its provider, reader or summarizer); ``{}`` for one without."""
    return part.cache_settings() if hasattr(part, "cache_settings") else {}
