"""``mmsr eval --suite``: the Table-1 table worked by hand on scripted episodes, a set that fails to load
as an error row, and the command end to end on the tiny model."""

import csv
import json

import pytest
import yaml

from mmsr.data.columns import EvalSet
from mmsr.eval.run import Evaluator
from mmsr.eval.work import WORK_FILE, EvalWork
from mmsr.cli import cause
from mmsr.eval.suite import read_suite, run_suite
from mmsr.rollout.engine import ScriptedEngine
from tests.conftest import FVQA
from tests.eval.test_cli import TINY, TOOLS

R = "<reason>r</reason>"


class Given(EvalSet):
    """A set held in memory (``samples``), or one whose loading fails with ``error``."""

    def __init__(self, samples=(), error: str | None = None) -> None:
        self.samples, self.error = list(samples), error

    def load(self):
        if self.error:
            raise FileNotFoundError(self.error)
        return self.samples


def test_table_by_hand_and_a_set_that_does_not_load(tmp_path, tiny_policy, fvqa_samples):
    a, b = fvqa_samples[:2], fvqa_samples[2:5]
    answer = {s.id: f"{R}<answer>{s.ground_truth}</answer>" for s in fvqa_samples}
    script = {a[0].id: [answer[a[0].id]],  # a: 1 of 2 right, 1 of 2 searched
              a[1].id: [f"{R}<search><img></search>", f"{R}<answer>no</answer>"],
              b[0].id: [f"{R}<text_search>q</text_search>", answer[b[0].id]],  # b: 3 of 3 right, 1 of 3 searched
              b[1].id: [answer[b[1].id]], b[2].id: [answer[b[2].id]]}  # fmt: skip
    evaluator = Evaluator(tiny_policy, ScriptedEngine(script, tiny_policy.tokenizer), {})
    sets = {"a": Given(a), "gone": Given(error="gone.parquet not found"), "b": Given(b)}
    table = run_suite(evaluator, sets, ["on-demand"], tmp_path, accuracy="em")
    rows = {r["set"]: r for r in table["rows"]}
    assert (rows["a"]["accuracy"], rows["a"]["search_ratio"], rows["b"]["accuracy"]) == (0.5, 0.5, 1.0)
    assert rows["b"]["search_ratio"] == pytest.approx(1 / 3) and rows["gone"]["error"] == "FileNotFoundError: gone.parquet not found"
    avg = table["average"]["on-demand"]
    assert (avg["sets"], avg["n"]) == (2, 5) and avg["accuracy"] == 0.75 and avg["search_ratio"] == pytest.approx((0.5 + 1 / 3) / 2)
    md = (tmp_path / "suite.md").read_text()
    assert "| workflow | metric | Avg | a (n=2) | gone (n=0) | b (n=3) |" in md
    assert "| on-demand | Acc | 75.0 | 50.0 | error | 100.0 |" in md and "| on-demand | SR | 41.7 | 50.0 | error | 33.3 |" in md
    assert "- gone: FileNotFoundError: gone.parquet not found" in md and "Judge unparsed" not in md  # no judge, no count
    lines = list(csv.DictReader((tmp_path / "suite.csv").open()))
    assert [(r["set"], r["accuracy"]) for r in lines] == [("a", "0.5"), ("gone", ""), ("b", "1.0"), ("average", "0.75")]
    # the average's n counts questions, as every row's (a script weighting by n); its sets, the sets that ran
    assert [(r["n"], r["sets"]) for r in lines] == [("2", ""), ("0", ""), ("3", ""), ("5", "2")]
    assert json.loads((tmp_path / "suite.json").read_text())["rows"][1]["error"].startswith("FileNotFoundError")
    per_set = json.loads((tmp_path / "b" / "summary.json").read_text())  # each set's outputs as mmsr eval writes them
    assert per_set["b"]["on-demand"]["all"]["n"] == 3 and len((tmp_path / "a" / "trajectories.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "gone").exists()


class BreaksOn(Evaluator):
    """Raises when ``workflow`` runs on set ``name`` (say, a tool or the judge failing for good)."""

    def __init__(self, *args, breaks=("", ""), **kwargs):
        super().__init__(*args, **kwargs)
        self.breaks = breaks

    def run(self, samples, workflow, name, work=None):
        if (name, workflow) == self.breaks:
            raise RuntimeError("judge unreachable")
        return super().run(samples, workflow, name, work)


def test_a_set_whose_evaluation_fails_is_an_error_row_and_the_suite_goes_on(tmp_path, tiny_policy, fvqa_samples, capfd):
    a, b = fvqa_samples[:2], fvqa_samples[2:4]
    script = {s.id: [f"{R}<answer>{s.ground_truth}</answer>"] for s in fvqa_samples}
    evaluator = BreaksOn(tiny_policy, ScriptedEngine(script, tiny_policy.tokenizer), {}, breaks=("a", "rag"))
    sets, work = {"a": Given(a), "b": Given(b)}, EvalWork(tmp_path / WORK_FILE, {"suite": "s.yaml"})
    table = run_suite(evaluator, sets, ["direct", "rag"], tmp_path, accuracy="em", work=work)
    rows = {(r["set"], r["workflow"]): r for r in table["rows"]}
    assert rows["a", "direct"]["error"] is None and rows["a", "direct"]["n"] == 2  # finished before: kept
    assert rows["a", "rag"]["error"] == "evaluation failed in rag: RuntimeError: judge unreachable"
    assert rows["b", "rag"]["error"] is None and rows["b", "rag"]["n"] == 2  # the next set still ran
    assert table["average"]["rag"]["sets"] == 1 and table["average"]["direct"]["sets"] == 2
    assert len((tmp_path / "a" / "trajectories.jsonl").read_text().splitlines()) == 2
    assert "- a: evaluation failed in rag: RuntimeError: judge unreachable" in (tmp_path / "suite.md").read_text()
    assert "RuntimeError: judge unreachable" in capfd.readouterr().err  # the traceback is not lost
    # a rerun once the judge is back runs only what is missing (a's rag), and the work file then goes
    engine = ScriptedEngine(script, tiny_policy.tokenizer)
    table = run_suite(Evaluator(tiny_policy, engine, {}), sets, ["direct", "rag"], tmp_path, accuracy="em",
                      work=EvalWork(tmp_path / WORK_FILE, {"suite": "s.yaml"}))  # fmt: skip
    assert all(r["error"] is None for r in table["rows"]) and table["average"]["rag"]["sets"] == 2
    assert sorted({r.key.split("#")[0] for r in engine.requests}) == sorted(s.id for s in a)
    assert not (tmp_path / WORK_FILE).exists()


def test_suite_file_errors_name_the_set(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"sets": {"x": {"class_path": "mmsr.data.benchmarks.NoSuchSet"}}}))
    with pytest.raises(ValueError, match="s.yaml: set 'x'"):
        read_suite(tmp_path / "s.yaml")
    # a misspelt argument: the line mmsr fit shows (cli.cause) names the file, the set and the key (it named the key alone)
    typo = {"class_path": "mmsr.data.benchmarks.MMSearchR1Parquet", "init_args": {"data_sorce": "x"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"sets": {"a": typo}}))
    with pytest.raises(ValueError) as error:
        read_suite(tmp_path / "s.yaml")
    shown = cause(error.value)
    assert shown.startswith(f"ValueError: {tmp_path / 's.yaml'}: set 'a': ") and "data_sorce" in shown, shown
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"data": ["x.parquet"]}))
    with pytest.raises(ValueError, match="expected one key 'sets'"):
        read_suite(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"sets": {"../up": {"class_path": "mmsr.data.benchmarks.MMSearch"}}}))
    with pytest.raises(ValueError, match="set name '../up' is a folder of the output"):
        read_suite(tmp_path / "s.yaml")


def test_the_shipped_suite_config_names_real_loaders():
    from tests.conftest import ROOT

    sets = read_suite(ROOT / "configs" / "eval" / "suite.yaml")
    assert list(sets) == ["fvqa_test", "infoseek", "mmsearch", "simplevqa", "livevqa"]
    assert [type(s).__name__ for s in sets.values()] == ["MMSearchR1Parquet", "MMSearchR1Parquet", "MMSearch", "SimpleVQA", "LiveVQA"]


def test_mmsr_eval_suite_end_to_end_on_the_tiny_model(tmp_path):
    from mmsr.eval.cli import main

    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"policy": TINY}))
    (tmp_path / "tools.yaml").write_text(yaml.safe_dump(TOOLS))
    dev = str(FVQA / "fvqa_dev.jsonl")
    suite = {"sets": {
        "fvqa_dev": {"class_path": "mmsr.data.benchmarks.MMSearchR1Parquet", "init_args": {"path": dev}},
        "mapped": {"class_path": "mmsr.data.columns.ColumnMapping",
                   "init_args": {"path": dev, "answer": "ground_truth", "aliases": "candidate_answers", "id": "data_id"}},
        "missing": {"class_path": "mmsr.data.benchmarks.MMSearch", "init_args": {"path": str(tmp_path / "end2end.parquet")}},
    }}  # fmt: skip
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    argv = ["--policy", str(tmp_path / "policy.yaml"), "--tools", str(tmp_path / "tools.yaml"), "--suite",
            str(tmp_path / "suite.yaml"), "--limit", "2", "--workflow", "direct", "rag", "--max-tokens-per-turn", "3",
            "--out", str(tmp_path / "out")]  # fmt: skip
    table = main(argv)
    rows = {(r["workflow"], r["set"]): r for r in table["rows"]}
    assert rows[("rag", "mapped")]["search_ratio"] == 1.0 and rows[("direct", "fvqa_dev")]["search_ratio"] == 0.0
    assert rows[("direct", "mapped")]["n"] == 2 and "end2end.parquet not found" in rows[("rag", "missing")]["error"]
    assert table["average"]["rag"]["sets"] == 2
    md = (tmp_path / "out" / "suite.md").read_text()
    assert "| rag | SR | 100.0 |" in md and "missing (n=0)" in md
    # a set was missing: the work file stays, and a rerun takes the other sets' episodes from it
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"fvqa_dev", "mapped", "suite.md", "suite.csv", "suite.json", WORK_FILE}
    _tamper(tmp_path / "out" / WORK_FILE, "from the work file")
    main(argv)
    assert json.loads((tmp_path / "out" / "fvqa_dev" / "trajectories.jsonl").read_text().splitlines()[0])["answer"] == "from the work file"


def _tamper(path, answer):
    """Rewrite the first record's answer in work file ``path`` (a rerun that reads it shows it)."""
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    row["records"][0]["answer"] = answer
    path.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")


def test_mmsr_eval_resumes_a_crashed_run_from_its_work_file(tmp_path, monkeypatch):
    from mmsr.eval.cli import main
    from mmsr.eval.run import Evaluator

    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"policy": TINY}))
    argv = ["--policy", str(tmp_path / "policy.yaml"), "--data", f"dev={FVQA / 'fvqa_dev.jsonl'}", "--limit", "3",
            "--workflow", "direct", "--max-tokens-per-turn", "3", "--out", str(tmp_path / "out"), "--batch-size", "2"]  # fmt: skip
    record = Evaluator.record

    def dies_on_the_third(self, traj, sample, *args):  # in the second batch
        if sample.id == "fvqa_train_881":
            raise RuntimeError("killed")
        return record(self, traj, sample, *args)

    monkeypatch.setattr(Evaluator, "record", dies_on_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        main(argv)
    monkeypatch.undo()
    _tamper(tmp_path / "out" / WORK_FILE, "from the work file")
    main(argv)
    rows = [json.loads(line) for line in (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines()]
    assert [r["answer"] == "from the work file" for r in rows] == [True, False, False]
    assert not (tmp_path / "out" / WORK_FILE).exists()
    monkeypatch.setattr(Evaluator, "record", dies_on_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        main(argv)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"--batch-size was 2, now 3"):  # the crashed run's file is not mixed in
        main([*argv[:-1], "3"])



def test_a_suite_whose_every_set_failed_exits_with_an_error_after_writing_its_table(tmp_path):
    """The shipped suite before its paths are filled in: every set an error row, and the exit status was 0."""
    from mmsr.eval.cli import main

    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"policy": TINY}))
    suite = {"sets": {"missing": {"class_path": "mmsr.data.benchmarks.MMSearch", "init_args": {"path": str(tmp_path / "x.parquet")}}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    argv = ["--policy", str(tmp_path / "policy.yaml"), "--suite", str(tmp_path / "suite.yaml"), "--workflow", "direct",
            "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit, match=r"no set of the suite could be evaluated \(missing\)"):
        main(argv)
    assert "x.parquet not found" in (tmp_path / "out" / "suite.md").read_text()


def test_accuracy_judge_without_a_judge_url_is_refused_before_anything_loads(tmp_path, capsys):
    """It was accepted, and after the model loaded gave a table of "–" (no judge, no judge accuracy)."""
    from mmsr.eval.cli import main

    argv = ["--model-dir", str(tmp_path / "no-model"), "--tools", str(tmp_path / "no-tools.yaml"), "--suite",
            str(tmp_path / "no-suite.yaml"), "--accuracy", "judge"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "--accuracy judge needs --judge-url" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no-suite.yaml does not exist"):  # with a judge: parsed, then read
        main([*argv, "--judge-url", "http://127.0.0.1:1/v1"])


def test_a_set_whose_sample_id_repeats_is_an_error_row_before_any_of_its_episodes(tmp_path, tiny_policy, fvqa_samples):
    from dataclasses import replace

    twice = [fvqa_samples[0], replace(fvqa_samples[1], id=fvqa_samples[0].id)]
    engine = ScriptedEngine(lambda r: f"{R}<answer>x</answer>", tiny_policy.tokenizer)
    table = run_suite(Evaluator(tiny_policy, engine, {}), {"twice": Given(twice), "ok": Given(fvqa_samples[2:3])},
                      ["direct"], tmp_path)  # fmt: skip
    rows = {r["set"]: r for r in table["rows"]}
    assert rows["twice"]["error"] == f"sample id {twice[0].id!r} repeats: each question needs its own id"
    assert rows["ok"]["error"] is None and len(engine.requests) == 1  # only the other set's question
