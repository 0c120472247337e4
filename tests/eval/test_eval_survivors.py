"""Behaviours of ``mmsr.eval`` that a mutation audit found untested: the suite's accuracy column, a
resumed batch's question ids, the curated share of search-free rows, and tool calls besides the searches."""

from mmsr.eval.curate import select
from mmsr.eval.report import EvalRecord, metrics
from mmsr.eval.suite import suite_table
from mmsr.eval.work import EvalWork


def _record(sample_id: str, tool_calls: dict[str, int] | None = None) -> EvalRecord:
    return EvalRecord(set="s", workflow="w", sample_id=sample_id, data_source="d", category=None, question="q?",
                      ground_truth="x", candidate_answers=[], answer="x", em=True, subem=True, reward=1.0,
                      format_ok=True, image_searches=0, text_searches=0, allowed_calls=3, finish_reason="stop",
                      num_tokens=5, tool_calls=tool_calls or {})  # fmt: skip


def _metrics(em: float, judge: float) -> dict:
    return {"n": 4, "em": em, "subem": em, "judge": judge, "judge_unparsed": 0, "search_ratio": 0.5,
            "call_ratio": 0.25, "tool_calls": 2, "failed_calls": 0}  # fmt: skip


def test_the_suite_table_reports_the_chosen_accuracy_metric_not_em():
    """``accuracy="judge"`` fills the row's and the average's accuracy from the judge (0.9), not EM (0.1)."""
    table = suite_table({"dev": {"direct": _metrics(em=0.1, judge=0.9)}}, ["direct"], accuracy="judge")
    (row,) = table["rows"]
    assert (row["accuracy_metric"], row["accuracy"], row["em"]) == ("judge", 0.9, 0.1)
    assert table["average"]["direct"]["accuracy"] == 0.9


def test_a_batch_finished_on_other_questions_is_not_done_after_a_restart(tmp_path):
    """A batch key reused with another question list (here one more question) must run again, not return the
    three records of the old batch."""
    path, key = tmp_path / "episodes.partial.jsonl", ("s", "w", 0)
    EvalWork(path, {"batch_size": 4}).add(key, ["a", "b", "c"], [_record(i) for i in "abc"])
    reopened = EvalWork(path, {"batch_size": 4})
    assert reopened.done(key, ["a", "b", "c", "d"]) is None
    assert [r.sample_id for r in reopened.done(key, ["a", "b", "c"])] == ["a", "b", "c"]


def test_select_rounds_the_search_free_count_to_nearest():
    """10 rows at share 0.35 hold round(3.5) = 4 search-free rows (truncating would give 3)."""
    labels = {f"f{i}": "search_free" for i in range(10)} | {f"r{i}": "text_search_required" for i in range(10)}
    ids = select(labels, 0.35, size=10)
    assert len(ids) == 10
    assert sum(labels[i] == "search_free" for i in ids) == 4


def test_a_call_of_another_tool_counts_as_searching():
    """``tool_calls`` (every configured tool) decides ``calls``: a crop with no search is a tool call."""
    record = _record("a", tool_calls={"crop": 1})
    assert record.calls == 1
    assert metrics([record])["search_ratio"] == 1.0
