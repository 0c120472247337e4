"""``mmsr report RUN_DIR``: an offline HTML report of a run, with PNG plots of its main curves.

RUN_DIR is a run directory as the CSV logger makes it (``runs/smoke/csv/version_0``): it holds
``trajectories.jsonl`` (written by ``TrajectoryLogger``), ``metrics.csv`` and ``config.yaml``, and
may hold ``held_out.jsonl`` (greedy episodes on held-out questions at evaluation points: ``mmsr demo``
writes it before and after GRPO), shown side by side per question kind.
The report goes to ``RUN_DIR/report/``: ``index.html`` (self-contained: images and plots inline,
so it can be mailed or opened from anywhere) and the plots as PNG files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmsr.report.html import render_html
from mmsr.report.plots import plot_run
from mmsr.report.records import HELD_OUT_FILE, TRAJECTORIES_FILE, read_records


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
    plots = plot_run(metrics, out) if metrics.exists() else {}
    text = config.read_text(encoding="utf-8") if config.exists() else None
    held_out = list(read_records(run_dir / HELD_OUT_FILE)) if (run_dir / HELD_OUT_FILE).exists() else []
    html = render_html(str(run_dir), shown, plots, text, omitted=len(records) - len(shown), held_out=held_out)
    index = Path(page) if page is not None else out / "index.html"
    index.write_text(html, encoding="utf-8")
    return index


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
