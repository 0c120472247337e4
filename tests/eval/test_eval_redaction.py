"""What ``mmsr eval`` writes (``trajectories.jsonl``, the work file) is masked of API keys, as training's
``TrajectoryLogger`` output is: a page the model read or a judge's reply may quote one."""

from __future__ import annotations

from mmsr.eval.report import EvalRecord
from mmsr.eval.run import write_outputs
from mmsr.eval.work import EvalWork

KEY_ENV = "MMSR_EVAL_TEST_API_KEY"  # masked by its suffix, like WANDB_API_KEY
KEY = "sk-eval-0123456789abcdefXYZ"


def _leaky_record() -> EvalRecord:
    turn = {"text": f"<reason>the page says key={KEY}</reason>", "action": "Answer", "query": None, "tool_ok": None,
            "titles": [f"leak {KEY}"]}  # fmt: skip
    return EvalRecord(set="s", workflow="w", sample_id="a", data_source="d", category=None, question="q?",
                      ground_truth="x", candidate_answers=[], answer=f"x {KEY}", em=False, subem=True, reward=0.1,
                      format_ok=True, image_searches=0, text_searches=0, allowed_calls=3, finish_reason="stop",
                      num_tokens=5, turns=[turn], judge=True, judge_reply=f"you sent {KEY}")  # fmt: skip


def test_trajectories_jsonl_is_masked(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, KEY)
    record = _leaky_record()
    write_outputs([record], tmp_path)
    written = (tmp_path / "trajectories.jsonl").read_text(encoding="utf-8")
    assert KEY not in written and written.count(f"[redacted {KEY_ENV}]") == 4
    assert record.judge_reply == f"you sent {KEY}"  # the caller's records are left as they were


def test_the_work_file_is_masked(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, KEY)
    path = tmp_path / "episodes.partial.jsonl"
    EvalWork(path, {"limit": 1}).add(("s", "w", 0), ["a"], [_leaky_record()])
    assert KEY not in path.read_text(encoding="utf-8")
    resumed = EvalWork(path, {"limit": 1}).done(("s", "w", 0), ["a"])
    assert resumed[0].judge_reply == f"you sent [redacted {KEY_ENV}]"
