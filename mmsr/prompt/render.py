"""Sample and tool results -> chat text. Text only: tokens are made in ``encode.py``.

Every text this module returns may contain ``IMAGE_MARKER`` once per image, in context order.
"""

from __future__ import annotations

import copy
import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmsr.data.sample import Sample
from mmsr.tools.base import IMAGE_MARKER, ToolResult
from mmsr.tools.spec import MMSEARCH_R1_TOOLS, ToolSpec

TEMPLATES = Path(__file__).parent / "templates"
TOOLS_SLOT = "{tools}"  # a round-1 template line that becomes the configured tools' descriptions
ACTIONS_SLOT = "{actions}"  # in any template: the configured tools' calls, continuing a list (``list_actions``)
COUNT_SLOT = "{tool_count}"  # in any template: how many tools are configured, e.g. "two search tools" (``count_tools``)
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAIR_NAMES = frozenset(s.name for s in MMSEARCH_R1_TOOLS)


@dataclass(frozen=True)
class ChatFormat:
    """ChatML as Qwen2.5-VL writes it, split into the pieces a multi-turn loop appends.

    ``first_prompt(u) + reply + end_of_turn + observation(o) + reply2 ...`` equals the model's chat
    template rendered over the same messages (tested), including the ``\\n`` after ``<|im_end|>``
    that upstream MMSearch-R1 drops (spec §12.5).
    """

    system: str | None = "You are a helpful assistant."
    end_of_turn: str = "<|im_end|>"

    def first_prompt(self, user_text: str) -> str:
        system = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system is not None else ""
        return f"{system}<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"

    def observation(self, user_text: str) -> str:
        """The user turn that follows an assistant turn already closed by ``end_of_turn``."""
        return f"\n<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"


def template_path(name: str) -> Path:
    """Where template ``name`` is: a file path, a file under ``mmsr/prompt/templates``, or
    ``package:relative/path`` for a template shipped inside another package (found wherever that package
    is installed, e.g. ``mmsr.demo:templates/round1.txt``)."""
    path = Path(name)
    if path.is_file():
        return path
    package, sep, inner = name.partition(":")
    hint = "a template inside another package is written 'package:path', e.g. 'mmsr.demo:templates/round1.txt'"
    try:
        path = Path(str(importlib.resources.files(package).joinpath(inner))) if sep else TEMPLATES / name
    except ModuleNotFoundError:
        path = TEMPLATES / name
    except (TypeError, ValueError) as exc:  # a module that is no package ('mmsr.export:x'), none at all (':x')
        why = exc if package else "nothing before the ':' names a package"
        raise FileNotFoundError(f"prompt template {name!r} not found: {why}; {hint}") from None
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {name!r} not found ({path}); {hint}")
    return path


def _read(name_or_path: str) -> str:
    return template_path(name_or_path).read_text(encoding="utf-8").rstrip("\n")


def describe(spec: ToolSpec) -> str:
    """``spec``'s round-1 description (its ``description`` template); ValueError names the tool."""
    if spec.description is None:
        raise ValueError(f"tool {spec.name!r} has no round-1 description: set its ToolSpec.description to a template "
                         f"telling the policy when and how to write <{spec.tag}>...</{spec.tag}>")  # fmt: skip
    try:
        text = _read(spec.description)
    except FileNotFoundError as exc:
        raise ValueError(f"tool {spec.name!r}: description template not found: {exc}") from None
    if _slots(text):
        raise ValueError(f"tool {spec.name!r}: description {spec.description!r} may not contain {IMAGE_MARKER!r}, "
                         f"'{{question}}' or {TOOLS_SLOT!r}")  # fmt: skip
    return text


def _slots(text: str) -> list[str]:
    """The round-1 placeholders in ``text``: only a round-1 template may hold them."""
    return [slot for slot in (IMAGE_MARKER, "{question}", TOOLS_SLOT) if slot in text]


def read_instruction(name: str, what: str) -> str:
    """Template ``name``, an instruction shown after a tool's results (``what`` names it in errors).

    It may not hold a round-1 placeholder, and is checked when read, at start-up: a ``<image>`` would claim
    one more image than the results carry (the rollout would fail at the first result, its error naming
    neither template nor cause), and nothing fills ``{question}`` or ``{tools}`` there, so the model would
    read them as written (``repeat_question`` restates the question).
    """
    text = _read(name)
    if found := _slots(text):
        raise ValueError(f"{what} template {name!r} may not contain {', '.join(map(repr, found))}: the results it "
                         f"follows carry their own images' {IMAGE_MARKER!r} markers, and only the round-1 template's "
                         "'{question}' and '{tools}' are filled (repeat_question restates the question)")  # fmt: skip
    return text


def fill_tools(template: str, specs: Sequence[ToolSpec]) -> str:
    """``template`` with its ``{tools}`` line replaced by the descriptions of the ``specs`` whose ``<tag>`` it
    does not mention (a template that writes out a tool's call describes it itself), one after another;
    with none left the line goes, newline and all. A template without the line is returned as written."""
    if TOOLS_SLOT not in template:
        return template
    lines = [describe(s) for s in specs if f"<{s.tag}>" not in template]
    return "\n".join(line for row in template.split("\n") for line in (lines if row == TOOLS_SLOT else [row]))


def list_actions(specs: Sequence[ToolSpec]) -> str:
    """The calls of ``specs`` (``ToolSpec.call``) continuing a list that names another action first (``an
    answer{actions}``): ``", <a>, <b>, or <c>"``, ``" or <a>"`` for one tool, ``""`` for none."""
    calls = [s.call for s in specs]
    if len(calls) < 2:
        return "".join(f" or {c}" for c in calls)
    return f", {', '.join(calls[:-1])}, or {calls[-1]}"


def count_tools(specs: Sequence[ToolSpec]) -> str:
    """How many tools ``specs`` are, as a prompt says it: ``"two search tools"`` for MMSearch-R1's pair (round1.txt's
    words; ``"one search tool"`` for either alone), else ``"two tools"``, ``"three tools"`` ... (a crop is no search)."""
    number = NUMBERS[len(specs)] if len(specs) < len(NUMBERS) else str(len(specs))
    search = "search " if specs and all(s.name in PAIR_NAMES for s in specs) else ""
    return f"{number} {search}tool{'' if len(specs) == 1 else 's'}"


def fill_actions(template: str, specs: Sequence[ToolSpec]) -> str:
    """``template`` with each ``{actions}`` replaced by ``list_actions(specs)`` and each ``{tool_count}`` by
    ``count_tools(specs)``: a prompt offers only configured tools (a call of another one parses as no action and
    ends the episode) and counts them right."""
    return template.replace(ACTIONS_SLOT, list_actions(specs)).replace(COUNT_SLOT, count_tools(specs))


class PromptBuilder:
    """Writes the user-side texts of an MMSearch-R1 episode from plain-text templates.

    Args:
        round1: template of the first user message; must contain ``{question}`` and one ``<image>``, and may
            hold a line ``{tools}`` that ``for_tools`` fills with the configured tools' descriptions, and
            ``{actions}`` that it fills with their calls and ``{tool_count}`` with their number (``fill_actions``;
            any template may hold these two). Unbound,
            a builder speaks of MMSearch-R1's pair (``MMSEARCH_R1_TOOLS``), as its ``after_*`` templates do.
            The default, ``round1_tools.txt``, is our ``round1.txt`` with the pair's lines and calls left to
            those slots: ``round1.txt`` itself stays byte-for-byte as it was, since the tiny tokenizers' BPE
            trains on it (``mmsr.demo.tokenizer``), and a test keeps the two equal, the pair bound, but for the
            space after ``<image>`` (upstream writes ``<image> `` before the question, spec section 5). These
            templates, ``after_*`` included, follow MMSearch-R1's prompts in structure and tags (spec section 5)
            in our own wording, not upstream's text: for GRPO without SFT the wording shapes what the policy does.
        after_image_search: instruction appended after image-search results; like ``after_text_search`` and a
            tool's ``instruction``, it may not hold ``<image>``, ``{question}`` or ``{tools}`` (``read_instruction``).
        after_text_search: instruction appended after text-search results.
        repeat_question: restate the user's question after the results (MMSearch-R1 does).
    Templates are file names under ``mmsr/prompt/templates``, paths, or ``package:path`` (``template_path``).
    """

    def __init__(
        self,
        round1: str = "round1_tools.txt",
        after_image_search: str = "after_image_search.txt",
        after_text_search: str = "after_text_search.txt",
        repeat_question: bool = True,
    ) -> None:
        self.repeat_question = repeat_question
        self.template = _read(round1)
        if "{question}" not in self.template or self.template.count(IMAGE_MARKER) != 1:
            raise ValueError(f"round-1 template {round1!r} needs one '{{question}}' and one {IMAGE_MARKER!r}")
        if self.template.count(TOOLS_SLOT) > (TOOLS_SLOT in self.template.split("\n")):
            raise ValueError(f"round-1 template {round1!r}: {TOOLS_SLOT!r} must be a line of its own, at most once")
        self.specs: tuple[ToolSpec, ...] = MMSEARCH_R1_TOOLS
        self.round1 = fill_actions(fill_tools(self.template, self.specs), self.specs)
        self.after = {"image_search": read_instruction(after_image_search, "after-image-search"),
                      "text_search": read_instruction(after_text_search, "after-text-search")}  # fmt: skip

    def for_tools(self, specs: Sequence[ToolSpec]) -> PromptBuilder:
        """A copy whose round-1 text describes ``specs`` (the loop's configured tools, MMSearch-R1's pair first) in
        its ``{tools}`` line and lists their calls for each ``{actions}`` (so do the instructions), those
        instructions read now, at start-up. ValueError names a tool that needs a description and has none, or
        whose description or instruction template is missing or holds a round-1 placeholder."""
        # MMSearch-R1's pair first: its lines are round1.txt's own, the others' say "You may also ..."
        specs = sorted(specs, key=lambda s: s.name not in PAIR_NAMES)
        bound = copy.copy(self)
        bound.specs, bound.after = tuple(specs), dict(self.after)
        bound.round1 = fill_actions(fill_tools(self.template, specs), specs)
        for spec in specs:
            bound.instruction(spec)
        return bound

    def instruction(self, spec: ToolSpec) -> str:
        """The instruction after ``spec``'s results, its ``{actions}`` the bound tools' calls: this builder's own
        for the MMSearch-R1 pair (its ``after_*`` templates), else the tool's declared template (read once)."""
        if spec.name not in self.after:
            what = f"tool {spec.name!r}: instruction"
            self.after[spec.name] = read_instruction(spec.instruction, what) if spec.instruction else ""
        return fill_actions(self.after[spec.name], self.specs)

    def first_user_text(self, sample: Sample) -> str:
        """The question message; the image marker (and the space after it) is dropped when the sample has no image."""
        text = self.round1.replace("{question}", sample.question.strip())
        return text if sample.image is not None else text.replace(f"{IMAGE_MARKER} ", "").replace(IMAGE_MARKER, "")

    def observation_text(self, sample: Sample, kind: str | ToolSpec, result: ToolResult) -> str:
        """The user message carrying a tool result back to the model (``kind``: the tool's spec, or the name
        of one of the MMSearch-R1 pair).

        A failed call shows the failure text alone, so the model answers on its own.
        """
        if not result.ok:
            return f"<information>{result.text}</information>"
        after = self.instruction(kind) if isinstance(kind, ToolSpec) else fill_actions(self.after[kind], self.specs)
        question = f"Original user's question: {sample.question.strip()}\n" if self.repeat_question else ""
        return f"Searched results: <information>{result.text}</information>\n{question}{after}"
