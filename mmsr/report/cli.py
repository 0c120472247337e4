"""``mmsr report RUN_DIR``: an offline HTML report of a run, with PNG plots of its main curves.

RUN_DIR is a run directory as the CSV logger makes it (``runs/smoke/csv/version_0``): it holds
``trajectories.jsonl`` (written by ``TrajectoryLogger``), ``metrics.csv`` and ``config.yaml``, and
may hold ``held_out.jsonl`` (greedy episodes on held-out questions at evaluation points: ``mmsr demo``
writes it before and after GRPO), shown side by side per question kind.
The report goes to ``RUN_DIR/report/``: ``index.html`` (self-contained: images and plots inline,
so it can be mailed or opened from anywhere) and the plots as PNG files. The accuracy plot is titled by what
decided correctness under the run's reward in ``config.yaml`` (``accuracy_title``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from mmsr.report.html import render_html
from mmsr.report.plots import PLOTS, plot_run
from mmsr.report.records import HELD_OUT_FILE, TRAJECTORIES_FILE, read_records
from mmsr.tools.secrets import redact_config


def write_report(
    run_dir: str | Path, out_dir: str | Path | None = None, max_trajectories: int = 200, page: str | Path | None = None
) -> Path:
    """Writes the report of ``run_dir``; returns the path of the page.

    Args:
        out_dir: where the plots go (default ``RUN_DIR/report``).
        max_trajectories: keep the last this many records (the most recent training).
        page: the page's path (default ``OUT_DIR/index.html``); it needs none of the files beside it.
    """
    run_dir = Path(run_dir)
    traj_file, metrics, config = run_dir / TRAJECTORIES_FILE, run_dir / "metrics.csv", run_dir / "config.yaml"
    if not traj_file.exists() and not metrics.exists():
        found = sorted(str(p.parent) for p in run_dir.rglob(TRAJECTORIES_FILE))[:5]
        hint = f"; run directories below it: {', '.join(found)}" if found else ""
        raise FileNotFoundError(f"{run_dir} has neither {TRAJECTORIES_FILE} nor metrics.csv{hint}")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    # A record logged twice for one step and position keeps its later version (see plots.read_metrics).
    records = list({(r.step, r.index): r for r in read_records(traj_file)}.values()) if traj_file.exists() else []
    shown = records[-max_trajectories:] if max_trajectories > 0 else []
    text = redact_config(config.read_text(encoding="utf-8")) if config.exists() else None  # a run saved before masking
    title = accuracy_title(text)
    titles = {"accuracy": title, "val_accuracy": f"Held-out {title[0].lower()}{title[1:]}"}
    plots = plot_run(metrics, out, titles) if metrics.exists() else {}
    held_out = list(read_records(run_dir / HELD_OUT_FILE)) if (run_dir / HELD_OUT_FILE).exists() else []
    found = [f.name for f in (traj_file, metrics) if f.exists()]  # an empty section says: no file, or nothing in it
    html = render_html(str(run_dir), shown, plots, text, omitted=len(records) - len(shown), held_out=held_out, found=found)
    index = Path(page) if page is not None else out / "index.html"
    index.write_text(html, encoding="utf-8")
    return index


# How ``MMSearchR1Reward`` matches an answer, by ``mode``, and ``JudgedReward`` where the judge gave no verdict.
_MATCHING = {"EM": "exact match", "SubEM": "SubEM: the answer contains a ground truth"}
_FALLBACK = {"EM": "exact match", "SubEM": "SubEM"}


def accuracy_title(config_text: str | None) -> str:
    """The accuracy plot's title: what decided ``correct`` under the reward of the run's ``config.yaml`` (exact match,
    SubEM, an LLM judge); where it cannot tell (another reward, a combination, no config) ``PLOTS``' neutral title.
    It said "exact match" whatever the reward."""
    entry = _reward_entry(config_text)
    name, args = entry if entry is not None else ("", {})
    if name == "MMSearchR1Reward" and (match := _MATCHING.get(args.get("mode", "EM"))):
        return f"Accuracy ({match})"
    if name == "JudgedReward" and (match := _FALLBACK.get(args.get("fallback", "EM"))):
        return f"Accuracy (LLM judge; {match} where it gave no verdict)"
    return next(spec.title for spec in PLOTS if spec.name == "accuracy")


def _reward_entry(config_text: str | None) -> tuple[str, dict] | None:
    """``(class name, init args)`` of a GRPO run's reward in its config (``GRPOModule``'s default when unset), or
    None: no config, not YAML, or not a ``GRPOModule`` (a subclass may default to another reward)."""
    try:
        data = yaml.safe_load(config_text) if config_text else None
    except yaml.YAMLError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or str(model.get("class_path", "GRPOModule")).rsplit(".", 1)[-1] != "GRPOModule":
        return None
    init = model.get("init_args") if "class_path" in model else model  # mmsr fit may write the init args bare
    reward = init.get("reward") if isinstance(init, dict) else None
    if reward is None:
        return ("MMSearchR1Reward", {}) if isinstance(init, dict) else None
    if isinstance(reward, str):
        return reward.rsplit(".", 1)[-1], {}
    if isinstance(reward, dict) and "class_path" in reward:
        return str(reward["class_path"]).rsplit(".", 1)[-1], dict(reward.get("init_args") or {})
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmsr report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="run directory (holds trajectories.jsonl / metrics.csv / config.yaml)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    parser.add_argument("--max-trajectories", type=int, default=200, help="show the last N trajectories")
    args = parser.parse_args(argv)
    try:
        index = write_report(args.run_dir, args.out, args.max_trajectories)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"mmsr report: error: {exc}\n")
    print(index)
