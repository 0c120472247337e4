"""``mmsr demo``: the CPU demo -- a tiny VLM learns on-demand search in an offline world.

1. build the shapes world (``mmsr.demo.world``): landmarks, images, image-search index, corpus,
   a search-balanced train mix and held-out questions on unseen landmarks;
2. warm start (``SFTModule``, ``mmsr/demo/configs/sft.yaml``): next-token prediction on pages about other
   landmarks (``mmsr.demo.reading``), then imitation of a scripted teacher (``mmsr.demo.teacher``);
3. evaluate the warm start greedily on the held-out questions;
4. GRPO with the MMSearch-R1 reward (``mmsr/demo/configs/grpo.yaml``), logging sampled trajectories;
5. evaluate again; write ``metrics.csv``, ``demo.png``, ``summary.json``, print a summary table, and
   write ``report.html``: the ``mmsr report`` page of the GRPO run, with a few held-out episodes per
   question kind before and after GRPO (``held_out.jsonl`` in the GRPO run directory), so the demo
   shows what the policy does, not only curves. ``summary.json`` also holds each stage's peak
   resident memory (``memory``, ``mmsr.demo.memory``).

``--warm-start DIR`` skips 1 and 2: DIR (an earlier run's ``--out``) gives the world and the warm start, and
steps 3-5 run, GRPO with any LightningCLI arguments given after ``--``.

The claim under test (the paper's central finding in miniature): GRPO keeps accuracy while the
policy stops searching when the image alone answers the question.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import yaml

from mmsr.data.loaders import load_samples
from mmsr.demo.memory import StageMemory
from mmsr.metrics import search_ratios
from mmsr.report.records import (
    HELD_OUT_FILE,
    TrajectoryRecord,
    trajectory_record,
    write_records,
)
from mmsr.rollout.engine import SamplingParams
from mmsr.rollout.trajectory import Trajectory
from mmsr.train.update import UpdateSettings

CONFIGS = Path(__file__).resolve().parent / "configs"  # package data, found wherever mmsr is installed
KINDS = ("search_free", "image_search", "text_search")
EPISODES_PER_KIND = 3  # held-out episodes of each kind shown in report.html, before and after GRPO


def paths(*files: Path) -> str:
    """A list argument of ``files`` for LightningCLI, each quoted: it parses the value as YAML, where an unquoted
    ``[/tmp/run,v2/world/train.parquet]`` is two paths and a ``: `` or `` #`` in a path breaks the list."""
    return json.dumps([str(f) for f in files])


def overrides(out: Path, seed: int, steps: int | None) -> list[str]:
    """CLI overrides that point a demo config at ``out`` (the YAMLs default to runs/demo)."""
    world = out / "world"
    args = ["--seed_everything", str(seed), "--data.seed", str(seed), "--data.train_files", paths(world / "train.parquet"),
            "--model.init_args.image_search.init_args.index", str(world / "image_index.jsonl"),
            "--model.init_args.text_search.init_args.corpus", str(world / "corpus.jsonl")]  # fmt: skip
    return args + (["--trainer.max_steps", str(steps)] if steps is not None else [])


def updates_per_step(args: Sequence[str]) -> int:
    """Optimizer updates per GRPO training step under the LightningCLI arguments ``args`` (``trainer.max_steps``
    counts updates). Parsed, not read from grpo.yaml: arguments after ``--`` may change the mini-batches or epochs."""
    from mmsr.cli import lightning_cli

    # nothing runs, so nothing is seeded (the stage's own CLI seeds); the run's length is unbounded here: it is
    # made of this (--grpo-steps x updates), and the stage's own parse checks the schedule against it
    unbounded = ["--seed_everything", "false", "--trainer.max_steps", "-1"]
    config = lightning_cli([*args, *unbounded], parse_only=True, run=False).config
    return UpdateSettings.of(config.model.init_args).updates_per_step


def sft_overrides(out: Path, reading_steps: int | None, sft_steps: int | None) -> list[str]:
    """Stage-1 overrides: world files for the tokenizer and reading corpus, and the step counts
    (``trainer.max_steps`` counts reading and imitation steps together)."""
    world, sft = out / "world", out / "sft"
    args = ["--trainer.default_root_dir", str(sft), "--trainer.logger.init_args.save_dir", str(sft),
            "--model.init_args.export_dir", str(sft / "policy"), "--model.init_args.policy.init_args.tokenizer_texts",
            paths(world / "corpus.jsonl", world / "image_index.jsonl", world / "train.parquet", world / "reading.jsonl"),
            "--model.init_args.reading.init_args.files", paths(world / "reading.jsonl")]  # fmt: skip
    if reading_steps is None and sft_steps is None:
        return args
    reading, imitation = warm_start_steps(reading_steps, sft_steps)
    total = str(reading + imitation)
    return args + ["--model.init_args.reading_steps", str(reading), "--trainer.max_steps", total,
                   "--model.init_args.total_steps", total]  # fmt: skip


def warm_start_steps(reading_steps: int | None, sft_steps: int | None) -> tuple[int, int]:
    """The warm start's (reading, imitation) steps: the ones given, else sft.yaml's."""
    cfg = yaml.safe_load((CONFIGS / "sft.yaml").read_text())
    default_reading = cfg["model"]["init_args"]["reading_steps"]
    reading = default_reading if reading_steps is None else reading_steps
    return reading, cfg["trainer"]["max_steps"] - default_reading if sft_steps is None else sft_steps


def first_of_each_kind(samples: list, limit: int | None) -> list:
    """The first ``limit`` samples taking the kinds in turn (every kind stays measured); all if None."""
    if limit is None:
        return samples
    queues = [[s for s in samples if s.category == kind] for kind in KINDS]
    turns = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return turns[:limit]


def evaluate(module, samples, max_tokens: int) -> tuple[dict[str, dict[str, float]], list[Trajectory]]:
    """Greedy, one episode per question; accuracy and search ratio per question kind and overall,
    and the episodes (``samples[t.group_id]`` is each one's question)."""
    was = module.model.training
    module.model.eval()
    trajs = module.loop.run(samples, 1, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    module.model.train(was)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(trajs):
        groups[samples[t.group_id].category or "none"].append(i)
        groups["all"].append(i)
    result = {}
    for kind, idx in groups.items():
        details = [module.reward.details(trajs[i], samples[trajs[i].group_id]) for i in idx]
        ratios = search_ratios([trajs[i] for i in idx], module.loop.settings)
        result[kind] = {"accuracy": sum(d["correct"] for d in details) / len(idx), "search_ratio": ratios["any"],
                        "image_search_ratio": ratios["image"], "text_search_ratio": ratios["text"], "n": len(idx)}  # fmt: skip
    return result, trajs


def held_out_records(module, samples: list, trajs: list[Trajectory], step: int, global_step: int) -> list[TrajectoryRecord]:
    """The first ``EPISODES_PER_KIND`` episodes of each question kind as report records, scored by the
    module's reward (advantage 0: no group); the same questions at every evaluation, so the report
    can put each question's episodes before and after GRPO side by side."""
    kind_of = [samples[t.group_id].category for t in trajs]
    chosen = [i for kind in KINDS for i in [i for i, k in enumerate(kind_of) if k == kind][:EPISODES_PER_KIND]]
    rewards = module.compute_rewards([trajs[i] for i in chosen], samples).tolist()  # [len(chosen)]
    records = []
    for i, reward in zip(chosen, rewards):
        t, sample = trajs[i], samples[trajs[i].group_id]
        records.append(trajectory_record(t, sample, step=step, global_step=global_step, index=i, reward=reward,
                                         advantage=0.0, reward_terms=module.reward.details(t, sample)))  # fmt: skip
    return records


def run(out: Path, seed: int, sft_steps: int | None, grpo_steps: int | None, eval_limit: int | None = None,
        reading_steps: int | None = None, warm_start: Path | None = None, grpo_args: Sequence[str] = ()) -> dict:  # fmt: skip
    """The demo into ``out``; with ``warm_start`` (an earlier run's ``--out``) its world and warm-start policy are
    reused and only GRPO and the evaluations run. ``grpo_args``: more LightningCLI arguments for the GRPO stage."""
    from mmsr.cli import lightning_cli

    t0, memory = time.perf_counter(), StageMemory()
    if warm_start is not None:
        source = reused(warm_start)
    else:
        source = warm_start_stage(out, seed, memory, reading_steps, sft_steps)
    t_sft = time.perf_counter()
    grpo = out / "grpo"
    shutil.rmtree(grpo, ignore_errors=True)  # a rerun into the same --out: trajectories.jsonl would get both runs'
    with memory.stage("grpo_setup"):
        stage = ["--trainer.default_root_dir", str(grpo), "--trainer.logger.init_args.save_dir", str(grpo),
                 "--model.init_args.policy.init_args.path", str(source / "sft" / "policy"), *grpo_args]  # fmt: skip
        config = ["-c", str(CONFIGS / "grpo.yaml")]
        updates = None if grpo_steps is None else grpo_steps * updates_per_step([*config, *overrides(source, seed, None), *stage])
        cli = lightning_cli([*config, *overrides(source, seed, updates), *stage], run=False)
        held_out = first_of_each_kind(load_samples(source / "world" / "eval.parquet"), eval_limit)
        max_tokens = cli.model.loop.settings.max_tokens_per_turn
        cli.model.start_engine()  # evaluated before fit, whose setup hook would start it
    with memory.stage("warm_start_eval"):
        warm, warm_trajs = evaluate(cli.model, held_out, max_tokens)
    with memory.stage("grpo"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    with memory.stage("grpo_eval"):
        final, final_trajs = evaluate(cli.model, held_out, max_tokens)
    steps = cli.trainer.fit_loop.total_batch_idx + 1  # training steps (global_step counts optimizer updates)
    episodes = held_out_records(cli.model, held_out, warm_trajs, 0, 0)
    episodes += held_out_records(cli.model, held_out, final_trajs, steps, cli.trainer.global_step)
    write_records(Path(cli.trainer.logger.log_dir) / HELD_OUT_FILE, episodes)  # beside trajectories.jsonl
    # a reused warm start took no time here: its seconds are the earlier run's (its summary.json)
    trained = {"sft": t_sft - t0} if warm_start is None else {}
    seconds = trained | {"grpo_and_eval": time.perf_counter() - t_sft, "total": time.perf_counter() - t0}
    reuse = {} if warm_start is None else {"warm_start_from": str(warm_start)}
    return {"warm_start": warm, "grpo": final, "seconds": seconds, "grpo_metrics": str(grpo / "csv" / "metrics.csv"),
            "memory": {"peak_rss_mb": memory.peak_mb(), "stages": memory.stages}, **reuse}  # fmt: skip


def warm_start_stage(out: Path, seed: int, memory: StageMemory, reading_steps: int | None, sft_steps: int | None) -> Path:
    """Build the world in ``out/world`` and train the warm start into ``out/sft``; returns ``out``."""
    from mmsr.cli import lightning_cli
    from mmsr.demo.world import build_world

    with memory.stage("world"):
        build_world(out / "world", seed=seed)
    with memory.stage("warm_start"):
        lightning_cli(["fit", "-c", str(CONFIGS / "sft.yaml"), *overrides(out, seed, None), *sft_overrides(out, reading_steps, sft_steps)])
    return out


def reused(source: Path) -> Path:
    """``source``, an earlier demo's run directory (its ``--out``), once it is known to hold the world and the warm
    start GRPO starts from; else the files it lacks are named (an empty or missing folder, a fit run's)."""
    world, policy = source / "world", source / "sft" / "policy"
    needs = (world / "train.parquet", world / "eval.parquet", policy / "config.json", policy / "model.safetensors")
    if missing := [str(need) for need in needs if not need.is_file()]:
        raise FileNotFoundError(f"--warm-start {source} is not a demo run folder (no {', '.join(missing)}): "
                                f"give the --out of an earlier `mmsr demo`")  # fmt: skip
    return source


def warm_start_seed(source: Path) -> int:
    """The seed the warm start in ``source`` was trained with (its LightningCLI config); the world is built from it."""
    config = source / "sft" / "csv" / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"--warm-start {source}: {config} is missing (it names the seed); pass --seed")
    try:
        loaded = yaml.safe_load(config.read_text())
    except yaml.YAMLError as e:  # yaml's own message spans lines and names no file
        raise ValueError(f"--warm-start {source}: {config} is not valid YAML ({yaml_problem(e)}); pass --seed") from e
    seed = loaded.get("seed_everything") if isinstance(loaded, dict) else None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"--warm-start {source}: {config} names no seed_everything (got {seed!r}); pass --seed")
    return seed


def yaml_problem(e: yaml.YAMLError) -> str:
    """``e`` in one line: what the parser was doing, what it found, and where."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f" at line {e.problem_mark.line + 1}" if e.problem_mark else ""
    return ": ".join(filter(None, (e.context, e.problem))) + where


def at_least(value: float, threshold: float) -> bool:
    """``value >= threshold`` for ratios of counts, up to float rounding: a claim met exactly must pass, and in
    floats 38/40 - 18/40 is 0.49999999999999994, a drop of 50 points that was reported as "+50.0 points" and NO."""
    return value >= threshold - 1e-9


def checks(summary: dict) -> list[tuple[str, bool, str]]:
    """The demo's claims, each with what was measured (reported as is, never tuned to pass)."""
    w, g = summary["warm_start"], summary["grpo"]
    sf_drop = w["search_free"]["search_ratio"] - g["search_free"]["search_ratio"]
    req = min(g[k]["search_ratio"] for k in ("image_search", "text_search"))
    weakest = min(KINDS, key=lambda k: g[k]["accuracy"])
    return [
        ("accuracy after GRPO >= 80%", at_least(g["all"]["accuracy"], 0.8), f"{g['all']['accuracy']:.1%}"),
        ("every question kind >= 75% after GRPO", at_least(g[weakest]["accuracy"], 0.75),
         f"{weakest} {g[weakest]['accuracy']:.1%}"),
        ("accuracy within 5 points of the warm start", at_least(g["all"]["accuracy"], w["all"]["accuracy"] - 0.05),
         f"{g['all']['accuracy']:.1%} vs {w['all']['accuracy']:.1%}"),
        ("search-free search ratio drops >= 50 points", at_least(sf_drop, 0.5), f"{sf_drop * 100:+.1f} points"),
        ("search-required search ratio >= 90%", at_least(req, 0.9), f"{req:.1%}"),
    ]  # fmt: skip


def table(summary: dict) -> str:
    rows = ["| stage | kind | accuracy | search ratio | image | text | n |", "|---|---|---|---|---|---|---|"]
    for stage in ("warm_start", "grpo"):
        for kind in ("all", *KINDS):
            m = summary[stage].get(kind)
            if m:
                rows.append(f"| {stage} | {kind} | {m['accuracy']:.1%} | {m['search_ratio']:.1%} | "
                            f"{m['image_search_ratio']:.1%} | {m['text_search_ratio']:.1%} | {m['n']} |")  # fmt: skip
    rows += ["", "| claim | met | measured |", "|---|---|---|"]
    rows += [f"| {name} | {'yes' if ok else 'NO'} | {value} |" for name, ok, value in checks(summary)]
    return "\n".join(rows)


def write_outputs(out: Path, summary: dict) -> list[str]:
    """The summary files, ``demo.png`` and ``report.html`` (the GRPO run's ``mmsr report`` page); returns the
    names written."""
    from mmsr.report.cli import write_report
    from mmsr.report.plots import plot_panels

    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stage", "kind", "metric", "value"])
        for stage in ("warm_start", "grpo"):
            for kind, metrics in summary[stage].items():
                writer.writerows([stage, kind, k, v] for k, v in metrics.items())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table(summary) + "\n")
    written = ["metrics.csv", "summary.json", "summary.md"]
    if not Path(summary["grpo_metrics"]).is_file():  # --grpo-steps 0: no GRPO step logged, no curves to draw
        return written
    plot_panels(summary["grpo_metrics"], out / "demo.png", KINDS)
    write_report(Path(summary["grpo_metrics"]).parent, page=out / "report.html")
    return written + ["demo.png", "report.html"]


def quiet_library_bars() -> None:
    """Turn off transformers' and huggingface_hub's own tqdm bars ("Loading weights", "Writing model shards"):
    under CI the demo's output is a file, where every redraw of a bar is one more line. The environment
    variable reaches the processes the demo starts; a ``HF_HUB_DISABLE_PROGRESS_BARS`` the user set is kept.
    mmsr's own progress lines (Lightning's bar, ``mmsr.callbacks.progress``) are another tqdm and stay."""
    from transformers.utils import logging as hf_logging

    if os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1") == "1":
        hf_logging.disable_progress_bar()  # this process: transformers read the variable when it was imported


def count(text: str) -> int:
    """An argparse type: a step count, 0 or more."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative: give 0 or more steps")
    return n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="mmsr demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    ap.add_argument("--seed", type=int, default=None, help="default: 0, or the --warm-start run's seed")
    ap.add_argument("--reading-steps", type=count, default=None,
                    help="override the warm start config's reading_steps (the first of them, as many as its "
                         "reading's single_page_steps, still read one page a sequence)")
    ap.add_argument("--sft-steps", type=count, default=None, help="imitation steps after reading (default: from the warm start config)")
    ap.add_argument("--grpo-steps", type=count, default=None, help="GRPO training steps (default: the GRPO config's; 0 evaluates the warm start only)")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help=f"evaluate only the first N held-out questions, the kinds in turn (N >= {len(KINDS)}: one of each)")
    ap.add_argument("--warm-start", type=Path, default=None, metavar="DIR",
                    help="reuse the world and warm start of an earlier run's --out DIR: only GRPO and the evaluations run")
    ap.add_argument("--check", action="store_true", help="exit with status 1, naming them, when claims are not met")
    ap.add_argument("grpo_args", nargs="*", metavar="-- GRPO_ARG",
                    help="after --: LightningCLI arguments for the GRPO stage (e.g. -- --model.init_args.lr 5e-5)")
    args = ap.parse_args(argv)
    # checked before anything trains: the claims compare every kind, and a missing one failed only at the end
    if args.eval_limit is not None and args.eval_limit < len(KINDS):
        ap.error(f"--eval-limit {args.eval_limit}: at least {len(KINDS)}, one question of each kind ({', '.join(KINDS)})")
    if args.warm_start is not None and (args.reading_steps is not None or args.sft_steps is not None):
        ap.error("--reading-steps and --sft-steps shape the warm start, which --warm-start reuses")
    # SFTModule refuses total_steps=0, but only once the world is built
    if args.warm_start is None and sum(warm_start_steps(args.reading_steps, args.sft_steps)) == 0:
        ap.error("--reading-steps 0 --sft-steps 0: the warm start would train no step; give either 1 or more "
                 "(or --warm-start DIR to reuse an earlier run's)")
    if args.warm_start is not None:  # before its seed is read: a folder of another kind was told to pass --seed
        reused(args.warm_start)
    seed = args.seed if args.seed is not None else warm_start_seed(args.warm_start) if args.warm_start else 0
    # the demo hands LightningCLI its own arguments on purpose; its warning about sys.argv is noise here
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    quiet_library_bars()
    summary = run(args.out, seed, args.sft_steps, args.grpo_steps, args.eval_limit, args.reading_steps, args.warm_start,
                  args.grpo_args)  # fmt: skip
    written = write_outputs(args.out, summary)
    print(table(summary))
    print(f"\nseconds: {summary['seconds']}; outputs in {args.out}/ ({', '.join(written)})")
    unmet = [f"{name} (measured {value})" for name, ok, value in checks(summary) if not ok]
    if args.check and unmet:
        raise SystemExit("mmsr demo --check: claims not met: " + "; ".join(unmet))
    return summary
