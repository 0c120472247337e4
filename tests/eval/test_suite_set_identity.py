"""``mmsr eval --suite`` resumes set by set: each batch in the work file records its set's identity (its suite entry
as parsed and the fingerprint of its data file, ``suite.set_identities``). A set whose data file changed since ran
from the old episodes, graded against the old answers; fixing a failed set's entry, as its error advises, got the
whole rerun refused. Now only the changed set runs again (one line on stderr names it), the others resume."""

import json

import pytest
import yaml

from mmsr.eval.cli import main, parse_args, run_arguments
from mmsr.eval.report import EvalRecord
from mmsr.eval.suite import set_identities
from mmsr.eval.work import SETS, WORK_FILE, EvalWork
from tests.conftest import FVQA
from tests.eval.test_cli import TINY

ROWS = [json.loads(line) for line in (FVQA / "fvqa_dev.jsonl").read_text().splitlines()]
FROM_FILE = "from the work file"


def _record(set_name: str) -> EvalRecord:
    return EvalRecord(set=set_name, workflow="w", sample_id="a", data_source="d", category=None, question="q",
                      ground_truth="x", candidate_answers=[], answer="x", em=True, subem=True, reward=1.0,
                      format_ok=True, image_searches=0, text_searches=0, allowed_calls=3, finish_reason="stop",
                      num_tokens=5)  # fmt: skip


def test_only_the_batches_of_a_set_whose_identity_changed_are_dropped_and_said_once(tmp_path, capsys):
    path, run = tmp_path / WORK_FILE, {"limit": 1}
    before = {"a": {"entry": {"class_path": "A"}, "data": None}, "b": {"entry": {"class_path": "B"}, "data": {"size": 1}}}
    work = EvalWork(path, run, before)
    for name, start in (("a", 0), ("b", 0), ("b", 2)):
        work.add((name, "w", start), ["i"], [_record(name)])
    now = before | {"b": {"entry": {"class_path": "B"}, "data": {"size": 2}}}
    resumed = EvalWork(path, run, now)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mmsr eval: set b: the file or folder its path names changed since {path} was written: its 2 finished "
                   "batches there are dropped, and it is evaluated again"]  # fmt: skip
    assert resumed.done(("a", "w", 0), ["i"]) == [_record("a")] and resumed.done(("b", "w", 0), ["i"]) is None
    assert [json.loads(line).get("set") for line in path.read_text().splitlines()] == [None, "a"]  # gone from the file
    EvalWork(path, run, now).add(("b", "w", 0), ["i"], [_record("b")])
    assert capsys.readouterr().err == "" and EvalWork(path, run, now).done(("b", "w", 0), ["i"]) == [_record("b")]


def test_a_set_identity_is_its_parsed_entry_and_its_data_files_fingerprint(tmp_path):
    data = tmp_path / "s.jsonl"
    data.write_text("{}\n")
    entry = {"class_path": "mmsr.data.benchmarks.MMSearchR1Parquet", "init_args": {"path": str(data)}}
    suite = tmp_path / "suite.yaml"
    identity = lambda sets: (suite.write_text(yaml.safe_dump({"sets": sets})), set_identities(suite))[1]  # noqa: E731
    first = identity({"s": entry})["s"]
    spelled_out = {"class_path": "MMSearchR1Parquet", "init_args": {"path": str(data), "skip_invalid": False}}
    assert identity({"s": spelled_out})["s"] == first  # a default written out is the same set
    assert identity({"s": entry | {"init_args": {"path": str(data), "data_source": "x"}}})["s"]["entry"] != first["entry"]
    data.write_text("{}\n{}\n")  # the data file rewritten: same entry, other fingerprint
    rewritten = identity({"s": entry})["s"]
    assert rewritten["entry"] == first["entry"] and (first["data"]["size"], rewritten["data"]["size"]) == (3, 6)


def test_a_suite_work_file_of_an_older_mmsr_is_refused_saying_so(tmp_path):
    """A work file whose batches record no set identity (written before it existed) is not mixed in."""
    path = tmp_path / WORK_FILE
    argv = ["--policy", "p.yaml", "--suite", "suite.yaml", "--workflow", "direct", "--out", str(tmp_path)]
    run = run_arguments(parse_args(argv))
    EvalWork(path, {k: v for k, v in run.items() if k != SETS}).add(("s", "w", 0), ["a"], [_record("s")])
    with pytest.raises(ValueError, match=r"an older mmsr wrote it: it does not record each suite set's identity"):
        EvalWork(path, run, {"s": {"entry": {}, "data": None}})


def _suite(tmp_path, sets: dict) -> list[str]:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"policy": TINY}))
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"sets": sets}))
    return ["--policy", str(tmp_path / "policy.yaml"), "--suite", str(tmp_path / "suite.yaml"), "--workflow", "direct",
            "--max-tokens-per-turn", "3", "--out", str(tmp_path / "out"), "--batch-size", "2"]  # fmt: skip


def _tamper(path, name: str) -> None:
    """Every record of set ``name`` in work file ``path`` answers ``FROM_FILE`` (a rerun that takes it shows it)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows[1:]:
        if row["set"] == name:
            row["records"] = [r | {"answer": FROM_FILE} for r in row["records"]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _records(tmp_path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / name / "trajectories.jsonl").read_text().splitlines()]


def _write_set(path, rows, suffix: str = "") -> None:
    path.write_text("".join(json.dumps(r | {"ground_truth": r["ground_truth"] + suffix}) + "\n" for r in rows))


def test_a_set_whose_data_file_changed_runs_again_and_the_others_resume(tmp_path, monkeypatch, capsys):
    from mmsr.eval.run import Evaluator

    s_rows, t_rows = ROWS[:4], ROWS[4:8]
    (tmp_path / "images").symlink_to(FVQA / "images")  # the rows' image paths are relative to their file
    for name, rows in (("s", s_rows), ("t", t_rows)):
        _write_set(tmp_path / f"{name}.jsonl", rows)
    loader = "mmsr.data.benchmarks.MMSearchR1Parquet"
    argv = _suite(tmp_path, {name: {"class_path": loader, "init_args": {"path": str(tmp_path / f"{name}.jsonl"),
                                                                         "data_source": "fvqa"}} for name in "st"})  # fmt: skip
    record = Evaluator.record

    def dies_in_ts_second_batch(self, traj, sample, *args):
        if sample.id == t_rows[2]["data_id"]:
            raise RuntimeError("killed")
        return record(self, traj, sample, *args)

    monkeypatch.setattr(Evaluator, "record", dies_in_ts_second_batch)
    main(argv)  # t is an error row; s is done, and the work file keeps s's batches and t's first
    monkeypatch.undo()
    _tamper(tmp_path / "out" / WORK_FILE, "s")
    _tamper(tmp_path / "out" / WORK_FILE, "t")
    _write_set(tmp_path / "s.jsonl", s_rows, " (re-annotated)")  # same ids, new ground truths
    capsys.readouterr()
    main(argv)
    assert "mmsr eval: set s: the file or folder its path names changed since" in capsys.readouterr().err
    s = _records(tmp_path, "s")
    assert [r["ground_truth"] for r in s] == [r["ground_truth"] + " (re-annotated)" for r in s_rows]
    assert FROM_FILE not in {r["answer"] for r in s}
    assert [r["answer"] == FROM_FILE for r in _records(tmp_path, "t")] == [True, True, False, False]
    assert not (tmp_path / "out" / WORK_FILE).exists()


def test_the_rerun_after_fixing_a_failed_sets_entry_evaluates_only_that_set(tmp_path, capsys):
    """The README's promise: a set that fails to load keeps the work file, and the rerun after the fix (here its
    ``where:``, as its error says) evaluates only what is missing; it was refused, the suite file having changed."""
    dev = str(FVQA / "fvqa_dev.jsonl")
    good = {"class_path": "mmsr.data.benchmarks.MMSearchR1Parquet", "init_args": {"path": dev}}
    bad = {"class_path": "mmsr.data.columns.ColumnMapping",
           "init_args": {"path": dev, "answer": "ground_truth", "id": "data_id", "where": {"category": ["english"]}}}  # fmt: skip
    argv = _suite(tmp_path, {"fvqa_dev": good, "mapped": bad}) + ["--limit", "2"]
    table = main(argv)
    assert "Set `where:`" in {r["set"]: r["error"] for r in table["rows"]}["mapped"]
    _tamper(tmp_path / "out" / WORK_FILE, "fvqa_dev")
    bad["init_args"]["where"] = {"category": ["search_free"]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"sets": {"fvqa_dev": good, "mapped": bad}}))
    capsys.readouterr()
    table = main(argv)
    assert all(r["error"] is None for r in table["rows"]) and "evaluated again" not in capsys.readouterr().err
    assert {r["answer"] for r in _records(tmp_path, "fvqa_dev")} == {FROM_FILE}
    assert len(_records(tmp_path, "mapped")) == 2 and not (tmp_path / "out" / WORK_FILE).exists()
