"""A run's ``metrics.csv`` (CSVLogger) -> PNG plots of the main curves.

The CSV logger writes one row per logging call with empty cells for metrics not logged in it, so
each metric becomes its own ``Curve`` of the rows where it has a value.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


@dataclass(frozen=True)
class Curve:
    """One metric over training: ``values[i]`` was logged at ``steps[i]``."""

    name: str
    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class PlotSpec:
    """One figure: the named metrics, plus every metric whose name starts with ``prefix``."""

    name: str
    title: str
    metrics: tuple[str, ...]
    prefix: str | None = None


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("reward", "Reward", ("reward/mean", "reward/format")),
    # the reward decides what ``correct`` is (exact match, SubEM, an LLM judge): ``mmsr report`` names it from the
    # run's config (``report.cli.accuracy_title``), this neutral title stands where it cannot tell
    PlotSpec("accuracy", "Accuracy (share of episodes the reward counts correct)", ("reward/accuracy",)),
    PlotSpec(
        "search_ratio", "Search ratio by type (share of responses that search)",
        ("rollout/search_ratio/any", "rollout/search_ratio/image", "rollout/search_ratio/text"),
        prefix="rollout/search_ratio/any/",  # per data source
    ),
    PlotSpec("response_length", "Response length (sampled tokens per trajectory)", ("rollout/response_tokens",)),
    # held-out evaluation (``mmsr.metrics.held_out_metrics``, logged at validation): overall, per category and source
    PlotSpec("val_accuracy", "Held-out accuracy (share of episodes the reward counts correct)", ("val/reward/accuracy",),
             prefix="val/reward/accuracy/"),  # fmt: skip
    PlotSpec(
        "val_search_ratio", "Held-out search ratio (share of responses that search)",
        ("val/rollout/search_ratio/any", "val/rollout/search_ratio/image", "val/rollout/search_ratio/text"),
        prefix="val/rollout/search_ratio/any/",
    ),
)


def read_metrics(path: str | Path) -> dict[str, Curve]:
    """Every numeric column of a CSVLogger ``metrics.csv`` as a curve over its ``step`` column.

    A metric logged twice at one step keeps its later value: resumed runs cut the file back to the
    resumed step (``mmsr.callbacks.run_dir``), but a file written otherwise may repeat steps. What a kill
    mid-write leaves is skipped with a warning: a last line without its newline, a row that ends before its
    ``step`` cell, an empty file (no curves).
    """
    text = _complete_lines(Path(path))
    if not text:
        warnings.warn(f"{path}: no complete line (a run killed before its first row?): no curves", stacklevel=2)
        return {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or "step" not in reader.fieldnames:
        raise ValueError(f"{path}: not a CSVLogger metrics file (no 'step' column)")
    points: dict[str, dict[int, float]] = {k: {} for k in reader.fieldnames if k not in ("step", "epoch")}
    for lineno, row in enumerate(reader, 2):
        if row["step"] is None:
            warnings.warn(f"{path}:{lineno}: skipped a row that ends before its 'step' cell (torn)", stacklevel=2)
            continue
        step = _number(row["step"], path, lineno, "step")  # parsed apart: its bad cell was blamed on a metric's
        for key, cell in row.items():
            if key in points and cell not in ("", None):
                points[key][int(step)] = _number(cell, path, lineno, key)
    return {k: Curve(k, sorted(p), [p[s] for s in sorted(p)]) for k, p in points.items() if p}


def _number(cell: str, path: str | Path, lineno: int, column: str) -> float:
    """``cell`` of ``column`` as a number; else a ValueError naming the file, line and column."""
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: column {column!r} holds {cell!r}, not a number") from None


def _complete_lines(path: Path) -> str:
    """The file up to its last newline: a kill mid-write leaves a last line whose cells may be cut short."""
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    whole, torn = data[:cut], data[cut:]
    if torn:
        warnings.warn(f"{path}: skipped its last line, torn by a kill mid-write: {torn[:60]!r}", stacklevel=3)
    return whole.decode("utf-8")


def curves_for(spec: PlotSpec, curves: dict[str, Curve]) -> list[Curve]:
    extra = sorted(k for k in curves if spec.prefix and k.startswith(spec.prefix))
    return [curves[k] for k in (*spec.metrics, *extra) if k in curves]


def plot(spec: PlotSpec, curves: list[Curve], out: Path) -> Path:
    """Draws ``curves`` into ``out`` (a PNG); single points get markers so they stay visible."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for c in curves:
        finite = [(s, v) for s, v in zip(c.steps, c.values) if math.isfinite(v)]
        ax.plot([s for s, _ in finite], [v for _, v in finite], marker="o" if len(finite) < 20 else None, label=c.name)
    ax.set_title(spec.title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def kinds_in(curves: dict[str, Curve]) -> tuple[str, ...]:
    """The groups a run logged accuracy for (``reward/accuracy/<kind>``: question kinds, or data
    sources when a run mixes them; ``mmsr.metrics.rollout_metrics``), in the file's column order."""
    return tuple(k.removeprefix("reward/accuracy/") for k in curves if k.startswith("reward/accuracy/"))


def plot_run(metrics_csv: str | Path, out_dir: str | Path, titles: Mapping[str, str] | None = None) -> dict[str, Path]:
    """The PNGs of ``PLOTS`` whose metrics the run logged, by plot name; first ``kinds``, the panels
    per question kind (``draw_panels``), when the run logged metrics per kind. ``titles``: plot name -> the
    title that replaces its spec's (the accuracy plot's, by what decided correctness)."""
    curves = read_metrics(metrics_csv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {}
    if kinds := kinds_in(curves):
        pngs["kinds"] = draw_panels(curves, out_dir / "kinds.png", kinds)
    for spec in PLOTS:
        if titles and spec.name in titles:
            spec = replace(spec, title=titles[spec.name])
        if chosen := curves_for(spec, curves):
            pngs[spec.name] = plot(spec, chosen, out_dir / f"{spec.name}.png")
    return pngs


def plot_panels(metrics_csv: str | Path, out_png: str | Path, kinds: tuple[str, ...]) -> Path:
    """``draw_panels`` of a ``metrics.csv`` (the CPU demo's summary plot, ``demo.png``)."""
    return draw_panels(read_metrics(metrics_csv), out_png, kinds)


def panel_label(key: str) -> str:
    """A panel curve's legend: its question kind, ``source: <name>`` for a data source's (``data_source/<name>``,
    ``mmsr.metrics.GROUP_KEYS``), else the key's last part. The last part alone named category ``search_free`` and
    source ``mmsearch_r1/search_free`` alike."""
    for prefix in ("reward/accuracy/", "rollout/search_ratio/any/"):
        if key.startswith(prefix):
            kind = key.removeprefix(prefix)
            return f"source: {kind.removeprefix('data_source/')}" if kind.startswith("data_source/") else kind
    return key.rsplit("/", 1)[-1]


def draw_panels(curves: dict[str, Curve], out_png: str | Path, kinds: tuple[str, ...]) -> Path:
    """One figure of three panels against the step: reward, accuracy per question kind and search
    ratio per question kind."""
    panels = [("reward", ["reward/mean"]), ("accuracy", [f"reward/accuracy/{k}" for k in kinds]),
              ("search ratio", [f"rollout/search_ratio/any/{k}" for k in kinds])]  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, keys) in zip(axes, panels):
        for c in (curves[k] for k in keys if k in curves):
            ax.plot(c.steps, c.values, marker="o" if len(c.steps) < 20 else None, label=panel_label(c.name))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
