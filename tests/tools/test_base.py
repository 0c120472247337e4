"""The tool result record: what it cleans on construction."""

from __future__ import annotations

import json

from mmsr.tools import ToolResult


def test_a_lone_surrogate_becomes_a_replacement_character():
    # json.loads of a snippet cut between the halves of an emoji keeps the high half alone: the tokenizer
    # (TypeError) and SQLite (UnicodeEncodeError) refuse such a string, and one result would end the run.
    cut = json.loads('"Paris is lovely \\ud83d"')
    result = ToolResult("[Text Search Results]\n1. " + cut, titles=(cut, "\ud83d\ude00 split pair"))
    assert result.text.endswith("Paris is lovely \ufffd")
    assert result.titles == ("Paris is lovely \ufffd", "\U0001f600 split pair")  # a pair, as two halves, is joined
    result.text.encode("utf-8"), [t.encode("utf-8") for t in result.titles]  # well-formed now: no error
    assert ToolResult("plain \U0001f600 text").text == "plain \U0001f600 text"
