"""Failed tool calls are counted and said: an episode whose search failed goes on with the failure as its
observation, so a tool that cannot serve the set (the FVQA training cache asked for FVQA-test rows, a provider
down) looked like a low score: searches made, accuracy down, nothing failed in the summary."""

from __future__ import annotations

import csv

import pytest
import yaml

from mmsr.tools.base import ToolRequest, ToolResult
from tests.conftest import FVQA

R = "<reason>r</reason>"


class MissingRows:
    """A text search that has results for the query ``known`` only, as a cache keyed on other rows."""

    async def __call__(self, request: ToolRequest) -> ToolResult:
        if request.query != "known":
            return ToolResult(f"no results cached for {request.query!r}", ok=False)
        return ToolResult("[Text Search Results]\n1. Paris.")


def test_failed_calls_are_in_both_summaries_and_suite_csv_and_the_cli_warns(monkeypatch, tmp_path, tiny_policy,
                                                                           fvqa_samples, capsys):  # fmt: skip
    from mmsr.eval import cli
    from mmsr.eval.run import Evaluator
    from mmsr.rollout.engine import ScriptedEngine

    s = fvqa_samples[:3]
    answer = [f"{R}<answer>{x.ground_truth}</answer>" for x in s]
    script = {s[0].id: [f"{R}<text_search>other</text_search>", answer[0]],
              s[1].id: [f"{R}<text_search>known</text_search>", answer[1]], s[2].id: [answer[2]]}  # fmt: skip
    dev = str(FVQA / "fvqa_dev.jsonl")
    suite = {"sets": {"dev": {"class_path": "mmsr.data.benchmarks.MMSearchR1Parquet", "init_args": {"path": dev}}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    tools = {"image_search": None, "text_search": MissingRows()}
    monkeypatch.setattr(cli, "build_evaluator",
                        lambda args: Evaluator(tiny_policy, ScriptedEngine(script, tiny_policy.tokenizer), tools))  # fmt: skip
    common = ["--policy", "unused.yaml", "--tools", "unused.yaml", "--limit", "3"]
    summary = cli.main([*common, "--data", f"dev={dev}", "--out", str(tmp_path / "data")])
    data_err = capsys.readouterr().err
    cli.main([*common, "--suite", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "suite")])
    suite_err = capsys.readouterr().err
    m = summary["dev"]["on-demand"]["all"]
    assert (m["tool_calls"], m["failed_calls"], m["search_ratio"]) == (2, 1, pytest.approx(2 / 3))
    md = (tmp_path / "data" / "summary.md").read_text()
    assert md.splitlines()[0].endswith("| mixed | failed calls |") and "| dev | on-demand | all | 3 |" in md
    assert md.splitlines()[2].endswith("| 1 of 2 |")
    [row] = list(csv.DictReader((tmp_path / "suite" / "suite.csv").open()))[:1]
    assert (row["tool_calls"], row["failed_calls"]) == ("2", "1")
    for err, out in ((data_err, "data"), (suite_err, "suite")):
        assert "mmsr eval: warning: 1 of 2 tool calls failed" in err and str(tmp_path / out) in err


def test_no_column_and_no_warning_when_every_call_succeeded(tmp_path, tiny_policy, fvqa_samples, capsys):
    from mmsr.eval.cli import warn_failed_calls
    from mmsr.eval.report import markdown, summarize
    from mmsr.eval.run import Evaluator
    from mmsr.rollout.engine import ScriptedEngine

    s = fvqa_samples[:1]
    script = {s[0].id: [f"{R}<text_search>known</text_search>", f"{R}<answer>x</answer>"]}
    records = Evaluator(tiny_policy, ScriptedEngine(script, tiny_policy.tokenizer),
                        {"image_search": None, "text_search": MissingRows()}).run(s, "on-demand", "d")  # fmt: skip
    summary = summarize(records)
    assert "failed calls" not in markdown(summary) and summary["d"]["on-demand"]["all"]["tool_calls"] == 1
    warn_failed_calls([summary["d"]["on-demand"]["all"]], tmp_path)
    assert capsys.readouterr().err == ""
