"""Reading a report page as a browser shows it: headless Chromium, and a parser of the page's parts.

The report tests and the demo's report test read the DOM Chromium dumps after rendering the page
(``--dump-dom``), so what they check is what a reader's browser shows, not only the HTML text.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tests.conftest import optional_missing

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str:
    """A headless-capable Chromium on PATH, or skip (fail under ``MMSR_REQUIRE_OPTIONAL=1``)."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        optional_missing("no chromium on PATH (apt-get install -y chromium); CI installs it")
    return browser


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}",
    ]  # fmt: skip
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


@dataclass
class Episode:
    """One rendered trajectory: its element's attributes, and what is inside it."""

    attrs: dict[str, str]
    turn_classes: list[str] = field(default_factory=list)  # e.g. "turn action-image_search"
    images: list[dict[str, str]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    @property
    def held_out(self) -> bool:
        return "held-out" in self.attrs.get("class", "").split()


class Page(HTMLParser):
    """The parts of the report page the tests look at (all images, all text, every episode)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.trajectories: list[dict[str, str]] = []  # attributes of every episode, in page order
        self.episodes: list[Episode] = []
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.text: list[str] = []
        self._open: Episode | None = None
        self._details = 0  # <details> open inside the current episode (its observation folds)
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if "trajectory" in a.get("class", "").split():
            self.trajectories.append(a)
            self._open, self._details = Episode(a), 0
            self.episodes.append(self._open)
        elif tag == "details" and self._open:
            self._details += 1
        if tag == "img":
            self.images.append(a)
        if tag == "li" and self._open and "turn" in a.get("class", "").split():
            self._open.turn_classes.append(a["class"])
        if tag == "img" and self._open:
            self._open.images.append(a)
        self.urls += [v for k, v in a.items() if k in ("src", "href")]

    def handle_endtag(self, tag):
        if tag == "details" and self._open:
            self._details -= 1
            if self._details < 0:
                self._open = None

    def handle_data(self, data):
        self.text.append(data)
        if self._open:
            self._open.text.append(data)
