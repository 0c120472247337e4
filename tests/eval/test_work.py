"""The resumable evaluation's work file (``mmsr.eval.work``) read back as it was written."""

from mmsr.eval.report import EvalRecord
from mmsr.eval.work import EvalWork


def _record(question: str) -> EvalRecord:
    return EvalRecord(set="s", workflow="w", sample_id="a", data_source="d", category=None, question=question,
                      ground_truth="x", candidate_answers=[], answer="x", em=True, subem=True, reward=1.0,
                      format_ok=True, image_searches=0, text_searches=0, allowed_calls=3, finish_reason="stop",
                      num_tokens=5)  # fmt: skip


def test_a_batch_whose_text_holds_a_unicode_line_separator_is_done_after_a_restart(tmp_path):
    """Records are written with ``ensure_ascii=False``, so U+2028 / U+2029 / U+0085 in a question stay raw;
    ``str.splitlines`` cut the batch's line there: the batch read as not done and ran again (and paid the
    judge again), and the rewrite dropped it from the file."""
    path, question = tmp_path / "episodes.partial.jsonl", "Who built this?\u2028(one name)\u2029\u0085"
    EvalWork(path, {"limit": 1}).add(("s", "w", 0), ["a"], [_record(question)])
    written = path.read_text(encoding="utf-8")
    assert EvalWork(path, {"limit": 1}).done(("s", "w", 0), ["a"]) == [_record(question)]
    assert path.read_text(encoding="utf-8") == written  # nothing was cut, so nothing rewritten
