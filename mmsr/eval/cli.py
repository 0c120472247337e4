"""``mmsr eval``: greedy evaluation of a checkpoint or a Hugging Face model over eval sets.

    mmsr eval --ckpt runs/smoke/csv/version_0/checkpoints/last.ckpt --data data/fvqa_dev_20/fvqa_dev.jsonl \\
        --workflow on-demand direct rag --out runs/eval
    mmsr eval --model-dir Qwen2.5-VL-7B-Instruct --tools configs/tools.yaml --data fvqa_test.parquet \\
        --workflow rag --judge-url https://api.openai.com/v1 --judge-model gpt-4o-2024-11-20 \\
        --min-pixels 262144 --max-pixels 903168          # the recipe's image bounds (configs/mmsearch_r1/)
    mmsr eval --model-dir Qwen2.5-VL-7B-Instruct --tools configs/tools.yaml --suite configs/eval/suite.yaml \\
        --workflow direct rag on-demand --out runs/suite     # one Table-1 table over the suite's sets

Episode limits: ``--ckpt`` uses its run's; ``--model-dir`` the paper's (3 rounds, 1 image / 2 text searches,
2048 tokens a turn within a 6144-token context, 120 s a tool call: ``mmsr.eval.load.MMSEARCH_R1_ROLLOUT``, as
``configs/mmsearch_r1/``); ``--policy`` a run config's default, ``RolloutSettings()`` (CPU-sized: 256 tokens a turn,
4096 a context, 30 s a tool call). ``--rollout`` gives them for ``--model-dir`` / ``--policy`` (a YAML of
``RolloutSettings`` fields, or a run config: ``--rollout configs/mmsearch_r1/qwen3_vl_8b_1x8.yaml``), and
``--max-rounds`` / ``--max-tokens-per-turn`` / ``--max-context-tokens`` override any of them. As ``mmsr fit``,
the tools' nested timeouts must fit the per-call cap (``mmsr.tools.budget.check_budgets``), checked before the
policy loads where the limits are known by then. A ``--model-dir`` that
mmsr did not export (Qwen2.5-VL-7B-Instruct, the MMSearch-R1 authors' checkpoint) also resizes question images to the
recipes' bounds, 512*512 pixels to 1,152 tokens (``load.recipe_pixels``), unless ``--min-pixels`` / ``--max-pixels``
give them; an mmsr export keeps the bounds it was trained with.

A crashed or killed evaluation resumes: the same command again takes the batches it finished from
``<out>/episodes.partial.jsonl`` (``mmsr.eval.work``); under ``--suite``, those of the sets whose entry and data
file are unchanged (``suite.set_identities``). Heavy imports (transformers, torch; Lightning
only for ``--ckpt`` and ``--weights``) happen after argument parsing. Whatever the source, the loaded
weights are synced into the engine and checked with the probe before the first question
(``mmsr.eval.load``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from mmsr.eval.work import CONTENTS, SETS, WORK_FILE, EvalWork, fingerprint


ROLLOUT_HELP = ("with --model-dir / --policy: the episode limits, a YAML of RolloutSettings fields or a run config whose "
                "model.init_args.rollout is used (e.g. configs/mmsearch_r1/qwen2_5_vl_7b_1x8.yaml). Default: --model-dir the "
                "paper's (3 rounds, 1 image / 2 text searches, 2048 tokens a turn within a 6144-token context, 120 s a tool "
                "call); --policy RolloutSettings() (256 tokens a turn, 4096 a context, 30 s a tool call); --ckpt its run's. "
                "--max-rounds / --max-tokens-per-turn / --max-context-tokens override them")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The policy source, tools and episode-limit arguments shared by ``eval`` and ``curate``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint of a GRPOModule or SFTModule run, a .ckpt file or a distributed checkpoint directory "
                     "(rebuilt from the run's config.yaml)")  # fmt: skip
    src.add_argument("--model-dir", help="Hugging Face model directory (PretrainedPolicy)")
    src.add_argument("--policy", help="YAML with a policy class_path entry (e.g. TinyQwen2_5_VL)")
    parser.add_argument("--run-config", help="the run's config.yaml (default: found next to --ckpt)")
    parser.add_argument("--weights", help="with --policy: a checkpoint (file or distributed directory) or state-dict file")
    parser.add_argument("--tools", help="YAML with image_search / text_search class_path entries")
    parser.add_argument("--min-pixels", type=int, help="with --model-dir: image processor lower bound (without it and "
                        "--max-pixels: the recipes' 512*512 to 1,152 tokens for a model mmsr did not export, an mmsr "
                        "export's own)")  # fmt: skip
    parser.add_argument("--max-pixels", type=int, help="with --model-dir: image processor upper bound")
    parser.add_argument("--rollout", metavar="YAML", help=ROLLOUT_HELP)
    parser.add_argument("--max-rounds", type=int, help="override the most assistant turns")
    parser.add_argument("--max-tokens-per-turn", type=int, help="override the per-turn token budget")
    parser.add_argument("--max-context-tokens", type=int, help="override the episode token budget")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="questions per rollout batch")
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid data rows with a warning")


# The arguments only some policy sources read (``load_from_args``): given with another, they were silently ignored.
# ``--rollout`` with ``--ckpt``: its limits are its run's (``--run-config``).
READ_ONLY_WITH = {"weights": ("policy",), "run_config": ("ckpt",), "min_pixels": ("model_dir",), "max_pixels": ("model_dir",),
                  "rollout": ("model_dir", "policy")}  # fmt: skip


def refuse_unread(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A parser error for an argument the chosen policy source does not read (``READ_ONLY_WITH``): ``--weights``
    with ``--model-dir`` evaluated the directory's weights, not the ones given."""
    source = next(name for name in ("ckpt", "model_dir", "policy") if getattr(args, name) is not None)
    for name, readers in READ_ONLY_WITH.items():
        if getattr(args, name) is not None and source not in readers:
            p.error(f"{_flag(name)} is read only with {' or '.join(map(_flag, readers))}; with {_flag(source)} it would be ignored")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# The arguments that name files or folders the episodes depend on (the work file keeps their ``fingerprint``);
# not ``--suite``: its sets are recorded one by one (``suite.set_identities``), so fixing one keeps the others
INPUTS = ("ckpt", "run_config", "weights", "model_dir", "policy", "tools", "rollout")


def input_contents(args: argparse.Namespace, data: Sequence[str] = (), outputs: Sequence[str] = ()) -> dict:
    """The ``fingerprint`` of each file or folder the arguments name (``data``: the data paths), leaving out the
    command's ``outputs``: a checkpoint overwritten since a crash has the same path, and resuming would mix the
    two models' episodes."""
    contents = {name: fingerprint(getattr(args, name), outputs) for name in INPUTS if getattr(args, name, None) is not None}
    return contents | ({"data": [fingerprint(path, outputs) for path in data]} if data else {})


def positive_int(text: str) -> int:
    """``type`` of a count (``--limit``, ``--batch-size``, curate's ``--k``): 0 or less evaluated nothing, or all
    but the last (a slice's -1); a batch size of 0 failed only after the model loaded, a ``--k`` of 0 dropped
    every question."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# The workflows that search, and the tools each must have (none named: any one). ``direct`` never searches.
SEARCHING = {"on-demand": (), "rag": ("image_search", "text_search")}


def missing_tools(workflows: Sequence[str], tools: Mapping[str, object]) -> str | None:
    """Why ``workflows`` cannot run with ``tools`` (``{name: tool or None}``), or None: a workflow that searches
    without its tools had every search fail ("no image_search tool is configured") and reported that as a result."""
    have = sorted(name for name, tool in tools.items() if tool is not None)
    for workflow in (w for w in workflows if w in SEARCHING):
        need = SEARCHING[workflow]
        if not have or not set(need) <= set(have):
            wanted, configured = " and ".join(need) or "a search tool", f"only {', '.join(have)} is" if have else "no tool is"
            return f"--workflow {workflow} searches with {wanted}, but {configured} configured"
    return None


def refuse_missing_tools(workflows: Sequence[str], tools: Mapping[str, object], where: str) -> None:
    """Stop before any episode when ``workflows`` search without their tools (``missing_tools``)."""
    if (reason := missing_tools(workflows, tools)) is not None:
        raise SystemExit(f"mmsr eval: error: {reason} ({where}): give the tools with --tools TOOLS.yaml "
                         "(image_search / text_search entries, e.g. configs/tools/), or run --workflow direct")  # fmt: skip


def load_from_args(args: argparse.Namespace, workflows: Sequence[str] = (), refuse=refuse_missing_tools):
    """The ``Loaded`` policy/engine/tools/settings the arguments describe; ``workflows`` that search without
    their tools are refused (``refuse(workflows, tools, where)``; ``mmsr curate`` gives its own), and tools that cannot
    fit the per-call cap (``refuse_slow_tools``), before the policy loads when ``--tools`` names them and the limits
    are known by then (``--model-dir`` / ``--policy``: ``load.episode_limits``; ``--ckpt``: its run's, once loaded)."""
    from mmsr.eval import load
    from mmsr.tools.base import check_ready
    from mmsr.eval.workflows import limits_for

    tools = load.load_tools(args.tools) if args.tools else None
    limits = None if args.ckpt else overridden(load.episode_limits(args.rollout, bool(args.model_dir)), args)
    if tools:
        refuse(workflows, tools, f"--tools {args.tools}")
        check_ready(tools)  # before the policy loads
        if limits is not None:
            refuse_slow_tools(tools, limits, args)
    if args.ckpt:
        loaded = load.load_checkpoint(args.ckpt, args.run_config, run_tools=not tools)
    elif args.model_dir:
        loaded = load.load_model_dir(args.model_dir, args.min_pixels, args.max_pixels)
    else:
        loaded = load.load_policy_yaml(args.policy, args.weights)
    loaded.settings = limits if limits is not None else overridden(loaded.settings, args)
    if tools:
        loaded.tools, loaded.settings = tools, limits_for(loaded.settings, tools)
    else:  # a checkpoint's run's own tools; the other sources bring none
        where = "the tools of --ckpt's run config" if args.ckpt else f"--tools {args.tools}" if args.tools else "no --tools"
        refuse(workflows, loaded.tools, where)
        check_ready(loaded.tools)
    refuse_slow_tools(loaded.tools, loaded.settings, args)
    return loaded


def overridden(settings, args: argparse.Namespace):
    """``settings`` (``RolloutSettings``) with the ``--max-rounds`` / ``--max-tokens-per-turn`` / ``--max-context-tokens``
    given."""
    overrides = {k: getattr(args, k) for k in ("max_rounds", "max_tokens_per_turn", "max_context_tokens")}
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def refuse_slow_tools(tools: Mapping[str, object], settings, args: argparse.Namespace) -> None:
    """``load.check_tool_budgets`` of the evaluation's tools against its per-call cap ``settings.tool_timeout_s``,
    the ``BudgetError`` saying where the cap came from and how to change it."""
    from mmsr.eval import load

    if args.ckpt:
        fix = "the cap is --ckpt's run's (its config.yaml, or --run-config)"
    else:
        where = f"--rollout {args.rollout}'s" if args.rollout else f"--{'model-dir' if args.model_dir else 'policy'}'s default"
        fix = f"the cap is {where}: give tool_timeout_s with --rollout YAML"
    load.check_tool_budgets(tools, settings.tool_timeout_s, f"mmsr eval: {fix}")


def eval_sets(specs: list[str]) -> list[tuple[str, str]]:
    """``name=path`` or ``path`` (named by its file stem) -> ``(name, path)``; names must differ."""
    sets = [tuple(s.split("=", 1)) if "=" in s else (Path(s).stem, s) for s in specs]
    names = [n for n, _ in sets]
    if len(set(names)) != len(names):
        raise SystemExit(f"eval set names repeat: {names}; name them with name=path")
    return sets  # type: ignore[return-value]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmsr eval", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    sets = p.add_mutually_exclusive_group(required=True)
    sets.add_argument("--data", nargs="+", help="eval sets: path or name=path (parquet, jsonl, datasets dir)")
    sets.add_argument("--suite", help="YAML naming eval sets by loader (configs/eval/suite.yaml): one Table-1 table")
    p.add_argument("--workflow", nargs="+", default=["on-demand"], choices=["on-demand", "direct", "rag"])
    p.add_argument("--out", default="runs/eval", help="output directory")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N questions of each set")
    p.add_argument("--judge-url", help="OpenAI-compatible API root for the LLM judge (e.g. .../v1)")
    p.add_argument("--judge-model", default="gpt-4o-2024-11-20")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable with the judge's API key")
    p.add_argument("--accuracy", choices=["judge", "em", "subem"], help="--suite's accuracy (default: judge with --judge-url, else em)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed arguments; refused here, before the model loads: an argument the policy source does not read
    (``refuse_unread``), a workflow given twice, ``--accuracy judge`` without a judge (it would
    give a table of "–"), and a workflow that searches (``SEARCHING``) from ``--model-dir`` / ``--policy`` without
    ``--tools`` (every search would fail, reported as a result)."""
    p = parser()
    args = p.parse_args(argv)
    refuse_unread(p, args)
    if repeated := sorted({w for w in args.workflow if args.workflow.count(w) > 1}):
        p.error(f"--workflow {' '.join(repeated)} is given twice: each workflow runs once")
    if args.accuracy == "judge" and not args.judge_url:
        p.error("--accuracy judge needs --judge-url (the judge's OpenAI-compatible endpoint); without one, use --accuracy em or subem")
    searching = [w for w in args.workflow if w in SEARCHING]
    if searching and not args.tools and not args.ckpt:  # a checkpoint's run names its own tools
        p.error(f"--workflow {' '.join(searching)} searches, and --{'model-dir' if args.model_dir else 'policy'} brings no "
                "tools: give them with --tools TOOLS.yaml (image_search / text_search entries, e.g. configs/tools/), "
                "or run --workflow direct (without tools every search fails)")  # fmt: skip
    return args


def warn_unjudged(metrics: Iterable[dict], out: str | Path) -> None:
    """One line on stderr when the judge gave no verdict for some episodes (``metrics``: a set x workflow's
    ``report.metrics`` each): they count wrong, and an endpoint that was down must not pass for a low score."""
    judged = [m for m in metrics if m.get("judge") is not None]
    missing = sum(m["judge_unparsed"] for m in judged)
    if missing:
        print(f"mmsr eval: warning: {missing} of {sum(m['n'] for m in judged)} judged episodes got no verdict (endpoint "
              f"down or reply unparsed) and count as wrong; see judge_reply in the trajectories.jsonl under {out}",
              file=sys.stderr)  # fmt: skip


def warn_failed_calls(metrics: Iterable[dict], out: str | Path) -> None:
    """One line on stderr when tool calls failed (``metrics``: a set x workflow's ``report.metrics`` each): their
    episodes went on with the failure as the observation, so a tool that cannot serve the set (a cache keyed on
    other rows, e.g. FVQA's training cache on FVQA-test; a provider down) must not pass for a low score."""
    metrics = [m for m in metrics if m.get("tool_calls")]  # a suite's set that failed has none
    failed = sum(m["failed_calls"] for m in metrics)
    if failed:
        print(f"mmsr eval: warning: {failed} of {sum(m['tool_calls'] for m in metrics)} tool calls failed and their "
              f"episodes went on without results (a tool that cannot serve this data, e.g. a cache of other rows, or a "
              f"provider down?); see tool_ok and the observations in the trajectories.jsonl under {out}",
              file=sys.stderr)  # fmt: skip


def refuse_judge_failed(work: EvalWork) -> None:
    """Exit with an error when the judge never replied for some episodes (``run.judge_failed``): they count
    wrong, so a script must not read the outage as a result; the work file stays for the rerun."""
    from mmsr.eval.run import judge_failed

    if failed := judge_failed(work):
        raise SystemExit(f"mmsr eval: error: the judge never replied for {failed} episode{'s' * (failed > 1)} (its "
                         f"endpoint kept failing, or refused them), counted wrong: {work.path} is kept, and running the same "
                         "command again asks the judge only for those verdicts (delete it to keep them wrong)")  # fmt: skip


def refuse_repeated_ids(data: Mapping[str, Sequence], sets: Sequence[tuple[str, str]]) -> None:
    """Stop before the model loads when a set's sample id repeats (``data``: each set's samples)."""
    from mmsr.eval.run import repeated_id

    for name, path in sets:
        if (sample_id := repeated_id(data[name])) is not None:
            raise SystemExit(f"mmsr eval: error: sample id {sample_id!r} repeats in set {name} ({path}): each question "
                             "needs its own id (an empty RAG query searches the question of its id)")  # fmt: skip


def build_evaluator(args: argparse.Namespace):
    """The ``Evaluator`` of the loaded policy, with the judge if one is configured."""
    from mmsr.reward.judge import OpenAIJudge
    from mmsr.eval.run import Evaluator

    loaded = load_from_args(args, args.workflow)
    judge = OpenAIJudge(args.judge_url, args.judge_model, args.judge_key_env) if args.judge_url else None
    return Evaluator(loaded.policy, loaded.engine, loaded.tools, loaded.settings, loaded.prompts, judge, loaded.reward,
                     batch_size=args.batch_size)  # fmt: skip


def run_arguments(args: argparse.Namespace) -> dict:
    """The arguments that decide an evaluation's episodes (``EvalWork``'s run): all but where it is written,
    which workflows run, how many questions (a batch is the same slice of a set whatever the limit), which
    score the suite's table shows (``--accuracy``: every record holds EM, SubEM and the judge's verdict) and
    the name of the variable the judge's key is read from (the judge is its URL and model: a renamed variable
    holding a key to the same judge refused the rerun and lost its finished batches). The files and folders
    named are recorded with their ``fingerprint`` (``input_contents``); ``--suite``'s sets each with its own batches
    (``SETS``: ``suite.set_identities``), not here."""
    left_out = ("out", "workflow", "limit", "accuracy", "judge_key_env")
    data = [path for _, path in eval_sets(args.data)] if args.data else []
    per_set = {SETS: "with each batch"} if args.suite else {}
    return ({k: v for k, v in sorted(vars(args).items()) if k not in left_out} | per_set
            | {CONTENTS: input_contents(args, data, [args.out])})  # fmt: skip


def run_suite_args(args: argparse.Namespace) -> dict:
    """``--suite``: the sets are built (config errors stop here) before the model is loaded."""
    from mmsr.eval.suite import read_suite, run_suite, set_identities

    sets = read_suite(args.suite)
    if args.skip_invalid:
        for evalset in sets.values():
            evalset.skip_invalid = True
    accuracy = args.accuracy or ("judge" if args.judge_url else "em")
    work = EvalWork(Path(args.out) / WORK_FILE, run_arguments(args), set_identities(args.suite, [args.out]))
    table = run_suite(build_evaluator(args), sets, args.workflow, args.out, args.limit, accuracy, work)
    print((Path(args.out) / "suite.md").read_text(encoding="utf-8"))
    warn_unjudged(table["rows"], args.out)
    warn_failed_calls(table["rows"], args.out)
    if all(row["error"] is not None for row in table["rows"]):  # a script must not read this as success
        raise SystemExit(f"mmsr eval: error: no set of the suite could be evaluated ({', '.join(table['sets'])}): "
                         f"each set's error is in {Path(args.out) / 'suite.md'}")  # fmt: skip
    refuse_judge_failed(work)
    return table


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.suite:
        return run_suite_args(args)
    sets = eval_sets(args.data)
    from mmsr.data.loaders import load_samples
    from mmsr.eval.run import judge_failed, write_outputs

    data = {name: load_samples(path, args.skip_invalid) for name, path in sets}
    refuse_repeated_ids(data, sets)
    data = {name: samples[: args.limit] for name, samples in data.items()}
    work = EvalWork(Path(args.out) / WORK_FILE, run_arguments(args))  # refused here, before the model loads
    evaluator = build_evaluator(args)
    records = [r for name, samples in data.items() for wf in args.workflow for r in evaluator.run(samples, wf, name, work)]
    summary = write_outputs(records, args.out)
    if not judge_failed(work):  # else the rerun takes the file's episodes and asks the judge only for those
        work.finish()
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    overall = [parts["all"] for workflows in summary.values() for parts in workflows.values()]
    warn_unjudged(overall, args.out)
    warn_failed_calls(overall, args.out)
    refuse_judge_failed(work)
    return summary
