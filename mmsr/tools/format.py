"""The observation texts every search backend writes, in one place.

The layout follows MMSearch-R1 (spec §2.3-2.4): a header line starting with the ``[Image Search Results]`` /
``[Text Search Results]`` sentinel, then numbered entries; an image result carries one ``IMAGE_MARKER`` per
thumbnail. The wording is ours. Offline, web and replay backends all use these helpers, so a policy sees
the same layout whichever backend a config picks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mmsr.tools.base import IMAGE_MARKER, quoted

IMAGE_HEADER = (
    "[Image Search Results] The results below come from a reverse image search of the question's image. "
    "Each result shows the main image of a web page and the page's title, most relevant first."
)
IMAGE_NONE = "[Image Search Results] The reverse image search found no similar images."
TEXT_HEADER = "[Text Search Results] The passages below matched your query best, most relevant first."
WEB_TEXT_HEADER = (
    "[Text Search Results] Below are summaries of the web pages most relevant to your query, most relevant first."
)
TEXT_NONE = "[Text Search Results] The search found nothing relevant to your query."


def one_line(text: str, max_chars: int | None = None) -> str:
    """Whitespace collapsed to single spaces (one result per line), cut to ``max_chars`` with an ellipsis."""
    text = re.sub(r"\s+", " ", text).strip()
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[:max_chars].rstrip() + "…"


def image_results(titles: Sequence[str]) -> str:
    """Header plus one ``i. image: <marker>`` / ``title:`` entry per result; ``IMAGE_NONE`` when empty. A
    marker is written only for each thumbnail (a title quoting one is ``quoted``)."""
    if not titles:
        return IMAGE_NONE
    lines = [f"{i}. image: {IMAGE_MARKER}\ntitle: {quoted(one_line(t))}\n" for i, t in enumerate(titles, start=1)]
    return IMAGE_HEADER + "\n" + "".join(lines)


def text_results(entries: Sequence[tuple[str, str]], header: str = TEXT_HEADER) -> str:
    """Header plus one ``i. (label) body`` line per ``(label, body)`` entry (``quoted``: text results carry no
    image); ``TEXT_NONE`` when empty."""
    if not entries:
        return TEXT_NONE
    lines = [f"{i}. ({quoted(label)}) {quoted(body)}\n" for i, (label, body) in enumerate(entries, start=1)]
    return header + "\n" + "".join(lines)


def page_entry(title: str, url: str, summary: str, max_chars: int | None = None) -> tuple[str, str]:
    """The ``(label, body)`` of one summarized web page, for ``text_results(..., WEB_TEXT_HEADER)``."""
    return f"title: {one_line(title)}; link: {url}", one_line(summary, max_chars)
