"""The tool result record: what it cleans on construction, and what it refuses."""

from __future__ import annotations

import json
import math

import pytest

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


@pytest.mark.parametrize(("field", "value"), [("cost", math.nan), ("cost", math.inf), ("cost", -0.01),
                                              ("latency_s", math.nan), ("latency_s", -1.0)])  # fmt: skip
def test_a_cost_or_latency_that_is_not_a_finite_number_from_zero_up_is_refused(field, value):
    # NaN dollars were stored as NULL (an IntegrityError for a good result) and inf used the budget up at once:
    # the tool that computed one fails its call instead (an observation in the rollout, charged by a budget).
    with pytest.raises(ValueError, match=f"ToolResult {field} must be a finite number >= 0, got {value}"):
        ToolResult("[Text Search Results] x", **{field: value})
    assert ToolResult("[Text Search Results] x", cost=0.0, latency_s=0.0).cost == 0.0
