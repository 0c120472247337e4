"""The four valid trajectory shapes, and everything that is not one."""

from __future__ import annotations

import pytest

from mmsr.reward.format import format_ok, search_count, turn_kind

IMG = "<reason>I can't identify the landmark.</reason>\n<search><img></search>"
TXT = "<reason>It is the Eiffel Tower.</reason>\n<text_search>Eiffel Tower height</text_search>"
ANS = "<reason>The results say 330 m.</reason>\n<answer>330 m</answer>"
WARNING = "<reason>Nothing found.</reason>\nUnable to answer due to lack of relevant information"


@pytest.mark.parametrize(
    "turns",
    [
        [ANS],
        [IMG, ANS],
        [TXT, ANS],
        [IMG, TXT, ANS],
        ["  \n" + ANS + " \n"],  # turns are stripped first
        ["<reason>r</reason><answer>x</answer>"],  # nothing between the parts
        ["<reason>a\nb</reason>text between<answer>multi\nline</answer>"],  # DOTALL
        ["<reason>r</reason>\n<text_search>multi\nline</text_search>", ANS],
    ],
)
def test_valid_shapes(turns: list[str]) -> None:
    assert format_ok(turns)


@pytest.mark.parametrize(
    "turns",
    [
        [],
        [IMG],
        [TXT],
        [TXT, TXT, ANS],
        [TXT, IMG, ANS],
        [IMG, IMG, ANS],
        [IMG, TXT, TXT, ANS],
        [ANS, ANS],
        [IMG, TXT, WARNING],
        [TXT, WARNING],
        [WARNING],
    ],
)
def test_invalid_shapes(turns: list[str]) -> None:
    assert not format_ok(turns)


@pytest.mark.parametrize(
    "turn",
    [
        "<answer>x</answer>",  # no reason
        "<reason>r</reason>",  # no answer
        "<answer>x</answer><reason>r</reason>",  # reason after the answer
        "preamble <reason>r</reason><answer>x</answer>",  # must start with <reason>
        "<reason>r</reason><answer>x</answer> and some more words",  # only whitespace may follow
        "<reason>r</reason><reason>s</reason><answer>x</answer>",  # two reason pairs
        "<reason>r</reason><answer>x</answer><answer>y</answer>",  # two answer pairs
        "<reason>r</reason><answer>x",  # unclosed
        "<reason>r</reason><search><img></search><answer>x</answer>",  # search tag in answer turn
        "<reason>r <text_search>q</text_search></reason><answer>x</answer>",
        "<reason>r <search></reason><answer>x</answer>",
        "<REASON>r</REASON><ANSWER>x</ANSWER>",  # case sensitive
    ],
)
def test_malformed_answer_turn(turn: str) -> None:
    assert turn_kind(turn) is None
    assert not format_ok([turn])


@pytest.mark.parametrize(
    ("turn", "kind"),
    [
        (IMG, "image_search"),
        (TXT, "text_search"),
        (ANS, "answer"),
        ("<reason>r</reason><search> <img> </search>", None),  # literal tag only (parser is lenient)
        ("<reason>r</reason><search><img></search> trailing", None),  # tag must end the turn
        ("<reason>r</reason><text_search>q</text_search> trailing", None),
        ("<search><img></search>", None),  # no reason
        ("<reason>r</reason><search><img></search><search><img></search>", None),  # two search tags
        ("<reason>r</reason><search><img></search><text_search>q</text_search>", None),
        ("<reason>r</reason><text_search>a</text_search><text_search>b</text_search>", None),
        ("<reason>r</reason><answer>x</answer><search><img></search>", None),  # answer in search turn
        ("<reason>r</reason><answer><text_search>q</text_search>", None),
        ("<reason>r</reason><reason>s</reason><search><img></search>", None),
        # Found by tests/test_adversarial_outputs.py: a search turn holds its own tags exactly once.
        ("<reason>r</reason></text_search><search><img></search>", None),  # upstream: 0 too
        ("<reason>r</reason><text_search>a</text_search>b</text_search>", None),  # upstream: 0 too
        ("<reason>r</reason><search> <search><img></search>", None),  # unbalanced (upstream lets it pass)
        ("<reason>r </search></reason><search><img></search>", None),
        ("<reason>r <search></reason><text_search>q</text_search>", None),
        ("<reason>the <img> and <|image_pad|></reason><search><img></search>", "image_search"),  # not tags
    ],
)
def test_turn_kind(turn: str, kind: str | None) -> None:
    assert turn_kind(turn) == kind


def test_search_count_counts_non_final_turns_only() -> None:
    assert search_count([]) == 0
    assert search_count([ANS]) == 0
    assert search_count([IMG]) == 0  # final turn never counts
    assert search_count([IMG, ANS]) == 1
    assert search_count([IMG, TXT, ANS]) == 2
    assert search_count([TXT, TXT, TXT, ANS]) == 3
    assert search_count(["<search> <img> </search>", ANS]) == 1  # any executed search counts
    assert search_count(["no tag here", ANS]) == 0
