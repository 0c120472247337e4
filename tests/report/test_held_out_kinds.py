"""The held-out section's question kinds: a category is a kind whatever its value, ``0`` too."""

import json

import pytest

from mmsr.report.html import render_html
from mmsr.report.records import TrajectoryRecord, TurnRecord
from tests.report.browser import Page


def _record(sample_id: str, category) -> TrajectoryRecord:
    turn = TurnRecord(0, "<answer>x</answer>", "answer", "x", (0, 5), False, None)
    return TrajectoryRecord(step=0, global_step=0, index=0, sample_id=sample_id, group_id=0, data_source="src",
                            question="q?", answers=["x"], image=None, reward=1.0, advantage=0.0, correct=True,
                            reward_terms={}, finish_reason="answer", answer="x", length=5, sampled_tokens=5,
                            turns=[turn], category=category)  # fmt: skip


@pytest.mark.parametrize("category", [0, "0"])
def test_a_category_0_is_a_kind_not_none(category):
    """A set numbering its kinds from 0 (a jsonl column of ints; a ``held_out.jsonl`` written with one) had its
    kind-0 questions shown under "none", with the rows that have no category, and headed by their data source:
    the page tested the category for truth. The record read back from its JSON line, as ``mmsr report`` reads it."""
    records = [_record("a", category), _record("b", None), _record("c", 1)]
    records = [TrajectoryRecord.from_dict(json.loads(r.to_json())) for r in records]
    page = Page(render_html("run", [], {}, held_out=records))
    kinds = [(e.attrs["data-sample-id"], e.attrs["data-kind"]) for e in page.episodes]
    assert kinds == [("a", "0"), ("b", "none"), ("c", "1")]
    shown = [" ".join(e.text) for e in page.episodes]
    assert "(0)" in shown[0] and "(src)" in shown[1] and "(1)" in shown[2]
    assert [r.category for r in records] == ["0", None, "1"]  # as ``Sample.category`` holds it: text
