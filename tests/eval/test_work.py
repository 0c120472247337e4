"""The resumable evaluation's work file (``mmsr.eval.work``) read back as it was written."""

import os

import pytest

from mmsr.eval.cli import parse_args, run_arguments
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


def test_a_crashed_suite_resumes_under_another_accuracy_but_not_another_batch_size(tmp_path):
    """``--accuracy`` only picks the suite table's column (every record holds EM, SubEM and the verdict): a rerun
    choosing another was refused, its finished batches lost. ``--batch-size`` decides the batches: still refused."""
    path = tmp_path / "episodes.partial.jsonl"
    base = ["--policy", "p.yaml", "--tools", "t.yaml", "--suite", "suite.yaml", "--out", str(tmp_path)]
    EvalWork(path, run_arguments(parse_args([*base, "--accuracy", "em"]))).add(("s", "w", 0), ["a"], [_record("q")])
    resumed = EvalWork(path, run_arguments(parse_args([*base, "--accuracy", "subem"])))
    assert resumed.done(("s", "w", 0), ["a"]) == [_record("q")]
    with pytest.raises(ValueError, match=r"--batch-size was 16, now 8"):
        EvalWork(path, run_arguments(parse_args([*base, "--accuracy", "subem", "--batch-size", "8"])))


def test_a_crashed_evaluation_resumes_with_the_judge_key_in_another_variable(tmp_path, monkeypatch):
    """``--judge-key-env`` names where the key is read from, not the judge (its URL and model): a rerun reading
    the same judge's key from another variable was refused. Another judge model is still refused, and neither
    key is in the work file."""
    path = tmp_path / "episodes.partial.jsonl"
    base = ["--policy", "p.yaml", "--tools", "t.yaml", "--data", "d.jsonl", "--judge-url", "http://judge/v1"]
    monkeypatch.setenv("OLD_KEY", "sk-old-secret")
    monkeypatch.setenv("NEW_KEY", "sk-new-secret")
    first = EvalWork(path, run_arguments(parse_args([*base, "--judge-key-env", "OLD_KEY"])))
    first.add(("s", "w", 0), ["a"], [_record("q")])
    resumed = EvalWork(path, run_arguments(parse_args([*base, "--judge-key-env", "NEW_KEY"])))
    assert resumed.done(("s", "w", 0), ["a"]) == [_record("q")]
    with pytest.raises(ValueError, match=r"--judge-model was 'gpt-4o-2024-11-20', now 'other'"):
        EvalWork(path, run_arguments(parse_args([*base, "--judge-key-env", "NEW_KEY", "--judge-model", "other"])))
    assert "secret" not in path.read_text(encoding="utf-8")


def test_a_rerun_after_a_named_file_or_folder_changed_is_refused_naming_the_argument(tmp_path):
    """The work file held only the paths: a ``--weights`` file overwritten since the crash (training rewrites
    ``last.ckpt``) resumed with the old model's episodes. Unchanged files still resume; a folder counts its files."""
    path, weights, model = tmp_path / "episodes.partial.jsonl", tmp_path / "w.pt", tmp_path / "hf"
    weights.write_bytes(b"old weights")
    model.mkdir()
    (model / "config.json").write_text("{}")
    policy = ["--policy", "p.yaml", "--weights", str(weights), "--data", f"dev={tmp_path / 'd.jsonl'}"]
    run = lambda argv: run_arguments(parse_args([*argv, "--workflow", "direct"]))  # noqa: E731
    EvalWork(path, run(policy)).add(("s", "w", 0), ["a"], [_record("q")])
    assert EvalWork(path, run(policy)).done(("s", "w", 0), ["a"]) == [_record("q")]
    weights.write_bytes(b"newer weights")
    with pytest.raises(ValueError, match=r"another evaluation \(the file or folder --weights names has changed since"):
        EvalWork(path, run(policy))
    path.unlink()
    EvalWork(path, run(["--model-dir", str(model), "--data", "d.jsonl"])).add(("s", "w", 0), ["a"], [_record("q")])
    (model / "model.safetensors").write_bytes(b"w")  # a file added to the folder
    with pytest.raises(ValueError, match=r"the file or folder --model-dir names has changed since"):
        EvalWork(path, run(["--model-dir", str(model), "--data", "d.jsonl"]))
    path.unlink()
    (tmp_path / "d.jsonl").write_text("{}\n")
    EvalWork(path, run(policy)).add(("s", "w", 0), ["a"], [_record("q")])
    (tmp_path / "d.jsonl").write_text("{}\n{}\n")  # the eval set's file rewritten
    with pytest.raises(ValueError, match=r"the file or folder --data names has changed since"):
        EvalWork(path, run(policy))


def test_an_out_folder_inside_a_named_folder_does_not_change_its_fingerprint(tmp_path):
    """``--out`` inside ``--model-dir`` (an evaluation kept beside its model): the command's own writes must not
    count as the model changing, or every rerun after a crash would be refused."""
    path, model = tmp_path / "hf" / "eval" / "episodes.partial.jsonl", tmp_path / "hf"
    (model / "eval").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    argv = ["--model-dir", str(model), "--data", "d.jsonl", "--out", str(model / "eval"), "--workflow", "direct"]
    EvalWork(path, run_arguments(parse_args(argv))).add(("s", "w", 0), ["a"], [_record("q")])
    (model / "eval" / "summary.md").write_text("written by the command")
    assert EvalWork(path, run_arguments(parse_args(argv))).done(("s", "w", 0), ["a"]) == [_record("q")]


def test_a_fresh_copy_of_the_same_files_resumes_and_a_rewrite_of_one_size_does_not(tmp_path):
    """A checkpoint copied afresh at each job start (new modification times, same bytes) is the same model; a
    checkpoint overwritten by training with one of the same size is not."""
    path, weights = tmp_path / "episodes.partial.jsonl", tmp_path / "w.pt"
    weights.write_bytes(b"a" * 3_000_000)
    argv = ["--policy", "p.yaml", "--weights", str(weights), "--data", "d.jsonl", "--workflow", "direct"]
    EvalWork(path, run_arguments(parse_args(argv))).add(("s", "w", 0), ["a"], [_record("q")])
    os.utime(weights, (1, 1))  # copied: other times, the same bytes
    assert EvalWork(path, run_arguments(parse_args(argv))).done(("s", "w", 0), ["a"]) == [_record("q")]
    weights.write_bytes(b"a" * 1_500_000 + b"b" + b"a" * 1_499_999)  # same size, a middle byte moved by training
    with pytest.raises(ValueError, match=r"the file or folder --weights names has changed since"):
        EvalWork(path, run_arguments(parse_args(argv)))


def test_a_work_file_without_an_argument_added_since_is_refused_saying_an_older_mmsr_wrote_it(tmp_path):
    """A work file from before ``--rollout`` existed holds no ``rollout`` key: the rerun is refused (its episodes
    may have run under other limits), and the message said ``--rollout was None, now None``."""
    path = tmp_path / "episodes.partial.jsonl"
    EvalWork(path, {"limit": 1}).add(("s", "w", 0), ["a"], [_record("q")])
    with pytest.raises(ValueError, match=r"an older mmsr wrote it: it does not record --rollout"):
        EvalWork(path, {"limit": 1, "rollout": None})
