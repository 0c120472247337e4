"""``mmsr eval --suite``: one policy over several evaluation sets in turn, summarized in one table in the
shape of the MMSearch-R1 paper's Table 1 (per workflow, accuracy and search ratio per set, and their
average over the sets).

The suite file names the sets, each a loader ``class_path`` entry (``mmsr.data.benchmarks``,
``mmsr.data.columns.ColumnMapping`` or any ``EvalSet``):

    sets:
      fvqa_test: {class_path: mmsr.data.benchmarks.MMSearchR1Parquet, init_args: {path: fvqa_test.parquet}}
      mmsearch: {class_path: mmsr.data.benchmarks.MMSearch, init_args: {path: end2end.parquet}}

Every set's episodes are written as ``mmsr eval`` writes them (``<out>/<set>/trajectories.jsonl``,
``summary.json``, ``summary.md``) as soon as the set is done, and the suite table (``suite.md``,
``suite.csv``, ``suite.json``) is rewritten after each set; within a set, each finished batch goes to the
work file (``mmsr.eval.work``), so a crash loses nothing computed. A set that cannot be loaded (missing
file, bad row), or whose evaluation raises, is a row marked as an error (the workflows it finished before
are kept); the others still run, and the work file stays for the rerun. Each batch there records its set's
identity (``set_identities``): the rerun after a set's entry or data file was fixed runs that set again and
takes the others' batches.
Accuracy is one metric for the whole table (``judge``: the LLM judge, as the paper; ``em`` / ``subem``
without one). SR is the share of responses that searched (paper §4.1); ``call_ratio`` (calls / allowed,
Table 1's caption) is in the CSV and JSON.
"""

from __future__ import annotations

import csv
import json
import re
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from mmsr.cli_errors import parse_error_line
from mmsr.data.columns import EvalSet
from mmsr.eval.load import _parse, _parsed, _read_yaml
from mmsr.eval.run import Evaluator, judge_failed, repeated_id, write_outputs
from mmsr.eval.work import EvalWork, fingerprint

ACCURACY = ("judge", "em", "subem")
_CSV = ("workflow", "set", "n", "accuracy_metric", "accuracy", "search_ratio", "call_ratio", "em", "subem", "judge",
        "judge_unparsed", "tool_calls", "failed_calls", "error", "sets")  # fmt: skip


def read_suite(path: str | Path) -> dict[str, EvalSet]:
    """The suite file's ``sets`` (name -> loader, built now, read later): a config error stops here,
    before any model is loaded."""
    data = _read_yaml(path)
    if set(data) != {"sets"} or not isinstance(data["sets"], dict) or not data["sets"]:
        raise ValueError(f"{path}: expected one key 'sets' mapping set names to loader entries, got {sorted(data)}")
    sets = {}
    for name, entry in data["sets"].items():
        if not re.fullmatch(r"[\w.-]+", str(name)) or str(name).startswith("suite."):
            raise ValueError(f"{path}: set name {name!r} is a folder of the output: use letters, digits, '_', '-', '.'")
        try:
            sets[str(name)] = _parse({"set": EvalSet}, {"set": entry}, Path(path)).set
        except Exception as exc:  # jsonargparse raises its own types: say which set's entry is wrong
            raise ValueError(f"{path}: set {name!r}: {parse_error_line(str(exc)) or exc}") from exc
    return sets


def set_identities(path: str | Path, outputs: Sequence[str | Path] = ()) -> dict[str, dict]:
    """Each set of suite file ``path`` (read by ``read_suite`` first) by what its episodes depend on besides the
    run (``EvalWork``'s ``sets``): ``entry``, its entry as parsed (defaults filled in, so writing one out changes
    nothing), and ``data``, the ``fingerprint`` of the file or folder its ``path`` names, as ``--data``'s (files
    within ``outputs`` left out)."""
    identities = {}
    for name, entry in _read_yaml(path)["sets"].items():
        parsed = _parsed({"set": EvalSet}, {"set": entry}, Path(path))[1].set.as_dict()
        parsed = json.loads(json.dumps(parsed, default=str))  # as the work file reads it back (a Path argument: text)
        data = (parsed.get("init_args") or {}).get("path")
        identities[str(name)] = {"entry": parsed, "data": fingerprint(data, outputs)}
    return identities


def _load(evalset: EvalSet, limit: int | None) -> tuple[list, str | None]:
    """The set's samples, or the reason it could not be read (a sample id that repeats is one)."""
    try:
        samples = evalset.load()
    except Exception as exc:  # noqa: BLE001 - whatever the cause (file, format, row), the set is reported, the suite goes on
        return [], f"{type(exc).__name__}: {exc}"
    if (sample_id := repeated_id(samples)) is not None:
        return [], f"sample id {sample_id!r} repeats: each question needs its own id"
    return samples[:limit], None if samples else "no rows"


def run_suite(evaluator: Evaluator, sets: Mapping[str, EvalSet], workflows: Sequence[str], out: str | Path,
              limit: int | None = None, accuracy: str = "em", work: EvalWork | None = None) -> dict:  # fmt: skip
    """Evaluate every set under every workflow; returns the suite table (``suite_table``). With ``work``,
    finished batches resume from it, and it goes when every set ran without an error and the judge replied for
    every episode (``judge_failed``)."""
    out = Path(out)
    results: dict[str, dict] = {}
    for name, evalset in sets.items():
        samples, error = _load(evalset, limit)
        results[name] = {"error": error} if error is not None else _evaluate(evaluator, samples, workflows, name, out, work)
        table = suite_table(results, workflows, accuracy)
        write_table(table, out)
    if work is not None and not any("error" in r for r in results.values()) and not judge_failed(work):
        work.finish()
    return table


def _evaluate(evaluator: Evaluator, samples: list, workflows: Sequence[str], name: str, out: Path,
              work: EvalWork | None = None) -> dict:  # fmt: skip
    """``{workflow: metrics}`` of the workflows that ran on one set; a workflow that raises ends the set with
    ``"error"`` (its traceback on stderr), the ones before it are kept and written, and the suite goes on."""
    records, result = [], {}
    for wf in workflows:
        try:
            records += evaluator.run(samples, wf, name, work)
        except Exception as exc:  # noqa: BLE001 - one broken set (a row, a tool, the judge) must not end the suite
            traceback.print_exc()
            result["error"] = f"evaluation failed in {wf}: {type(exc).__name__}: {exc}"
            break
    if records:
        summary = write_outputs(records, out / name)
        result |= {wf: parts["all"] for wf, parts in summary[name].items()}
    return result


def _row(workflow: str, name: str, result: dict, accuracy: str) -> dict:
    m = result.get(workflow)
    if m is None:
        return {"workflow": workflow, "set": name, "n": 0, "accuracy_metric": accuracy, "accuracy": None,
                "search_ratio": None, "call_ratio": None, "em": None, "subem": None, "judge": None,
                "judge_unparsed": None, "tool_calls": None, "failed_calls": None, "error": result.get("error", "not run")}  # fmt: skip
    return {"workflow": workflow, "set": name, "n": m["n"], "accuracy_metric": accuracy, "accuracy": m[accuracy],
            "search_ratio": m["search_ratio"], "call_ratio": m["call_ratio"], "em": m["em"], "subem": m["subem"],
            "judge": m["judge"], "judge_unparsed": m["judge_unparsed"], "tool_calls": m["tool_calls"],
            "failed_calls": m["failed_calls"], "error": None}  # fmt: skip


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def suite_table(results: Mapping[str, dict], workflows: Sequence[str], accuracy: str = "em") -> dict:
    """``{"accuracy", "rows": [one per workflow x set], "average": {workflow: {...}}}``; the average is
    the unweighted mean over the sets that ran (as the paper's Avg column), with their count (``sets``) and
    questions (``n``)."""
    if accuracy not in ACCURACY:
        raise ValueError(f"accuracy must be one of {ACCURACY}, got {accuracy!r}")
    rows = [_row(wf, name, result, accuracy) for wf in workflows for name, result in results.items()]
    average = {}
    for wf in workflows:
        ran = [r for r in rows if r["workflow"] == wf and r["error"] is None]
        average[wf] = {k: _mean([r[k] for r in ran]) for k in ("accuracy", "search_ratio", "call_ratio")}
        average[wf].update(n=sum(r["n"] for r in ran), sets=len(ran))
    return {"accuracy": accuracy, "sets": list(results), "rows": rows, "average": average}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _unparsed_line(workflow: str, rows: list[dict]) -> str:
    """The episodes the judge gave no verdict, per set (one workflow's ``rows``) and in total."""
    cells = ["error" if r["error"] else "–" if r["judge"] is None else str(r["judge_unparsed"]) for r in rows]
    total = sum(r["judge_unparsed"] for r in rows if r["error"] is None and r["judge"] is not None)
    return "| " + " | ".join([workflow, "Judge unparsed", str(total), *cells]) + " |"


def markdown_table(table: dict) -> str:
    """Two lines per workflow (Acc, SR), one column per set and the average, in percent; with a judge, a third
    (after Acc) counts the verdicts it never gave: they count wrong, so an outage shows as more than a low score."""
    names, rows = table["sets"], {(r["workflow"], r["set"]): r for r in table["rows"]}
    n = {name: max((r["n"] for r in table["rows"] if r["set"] == name), default=0) for name in names}
    judged = any(r["judge"] is not None for r in table["rows"])
    head = ["workflow", "metric", "Avg", *[f"{name} (n={n[name]})" for name in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for wf, avg in table["average"].items():
        for label, key in (("Acc", "accuracy"), ("SR", "search_ratio")):
            cells = ["error" if rows[(wf, s)]["error"] else _pct(rows[(wf, s)][key]) for s in names]
            lines.append("| " + " | ".join([wf, label, _pct(avg[key]), *cells]) + " |")
            if key == "accuracy" and judged:
                lines.append(_unparsed_line(wf, [rows[(wf, s)] for s in names]))
    notes = [f"\nAcc: {table['accuracy']} (%). SR: share of responses that searched (%). Avg: mean over the sets that ran."]
    if judged:
        notes[0] += " Judge unparsed: episodes without a judge verdict (endpoint down, reply unparsed), counted wrong; Avg: their total."
    # each set's error once, whichever workflow it stopped in (a set can fail after its first workflow ran)
    notes += [f"- {s}: {e}" for s, e in dict.fromkeys((r["set"], r["error"]) for r in table["rows"] if r["error"])]
    return "\n".join(lines + notes) + "\n"


def write_table(table: dict, out: str | Path) -> None:
    """``suite.md``, ``suite.csv`` (one line per workflow x set, then the averages: ``n`` the questions of the
    sets that ran, ``sets`` their count) and ``suite.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.md").write_text(markdown_table(table), encoding="utf-8")
    (out / "suite.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    with (out / "suite.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV)
        writer.writeheader()
        writer.writerows(table["rows"])
        for wf, avg in table["average"].items():
            writer.writerow({"workflow": wf, "set": "average", "n": avg["n"], "sets": avg["sets"], "accuracy_metric": table["accuracy"],
                             **{k: avg[k] for k in ("accuracy", "search_ratio", "call_ratio")}})  # fmt: skip
