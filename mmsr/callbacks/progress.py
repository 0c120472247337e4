"""A progress bar that says what a long GRPO step is doing while it does it.

A step can take minutes (rollouts with slow web tools, then several PPO updates), and Lightning's
bars only move when the step ends. ``StageProgressBar`` adds a watcher thread that refreshes the
bar's postfix every ``poll_s`` seconds with the current stage, the rollout's tokens/s and the tool
calls in flight, read from the module:
- the stage from ``GRPOModule.stage`` (``sync`` / ``rollout`` / ``reward`` / ``train``, set by
  ``GRPOModule.timed``; ``val rollout`` / ``val reward`` while a validation rolls out and scores the
  held-out episodes); during a rollout, ``tools`` (``val tools``) while tool calls are in flight. A module
  without ``stage``, or between its stages (``None``), gets a coarser stage from the callback hooks
  (rollout until the first backward, ``validation`` during one);
- tokens/s and calls in flight from the live ``RolloutLoop.stats`` (a call is in flight from when it
  is counted until its latency is recorded, waiting for the concurrency limit included).
The thread only reads plain attributes and writes through tqdm, which locks its own refreshes. A
validation outside the training loop (the sanity check, ``mmsr validate``) gets a watcher of its own,
which writes to the validation bar (or lines), for as long as it runs.

The bar counts training steps of the run under its name (``grpo 12/60``), not Lightning's epochs of
an endless resumable loader: ``trainer.global_step`` / ``max_steps`` count optimizer updates, divided
by the module's ``updates_per_step`` when it makes several a step (PPO epochs x mini-batches). When
stdout is not a terminal (a log file, CI) a bar is only drawn at the end, so the callback prints plain
lines instead, every ``plain_every_s`` seconds at most and at the last step: name, step/total, rate,
ETA, the stage and the progress-bar metrics (``reward`` for GRPO, ``loss`` for the warm start); and one
line when a validation ends, with its duration. No tqdm bar is drawn then, the sanity check's,
validation's, test's and predict's included.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


@dataclass(frozen=True)
class StepStatus:
    """What the step is doing now.

    Attributes:
        stage: ``sync``, ``rollout``, ``tools``, ``reward``, ``train`` or ``idle`` (between steps); during a
            validation ``val rollout``, ``val tools``, ``val reward`` (``validation`` from the hooks).
        tokens_per_s: sampled tokens / generation seconds of the current (or last) rollout.
        tools_in_flight: tool calls started and not yet finished.
    """

    stage: str
    tokens_per_s: float
    tools_in_flight: int

    def postfix(self) -> dict[str, str]:
        return {"stage": self.stage, "tok/s": f"{self.tokens_per_s:.0f}", "tools": str(self.tools_in_flight)}


def training_steps(trainer: L.Trainer, updates: int | None = None) -> tuple[int, int]:
    """Training steps done (``updates`` optimizer updates; default ``trainer.global_step``) and in the run
    (0: unbounded): Lightning's optimizer-update counts over the module's ``updates_per_step`` (1 when it has none).
    The run's steps round up: Lightning stops once ``max_steps`` is reached, after the step's last update (3 updates
    at 2 a step are 2 steps, as ``mmsr.cli_checks.check_schedule_length`` counts them)."""
    per_step = max(int(getattr(trainer.lightning_module, "updates_per_step", 1)), 1)
    return (trainer.global_step if updates is None else updates) // per_step, -(-max(trainer.max_steps, 0) // per_step)


def step_status(pl_module: L.LightningModule, fallback_stage: str = "idle") -> StepStatus:
    """The module's current status; ``fallback_stage`` is used when the module exposes no ``stage``, or between
    its stages (``None``: a validation's end is no ``idle``)."""
    stage = getattr(pl_module, "stage", None) or fallback_stage or "idle"
    stats = getattr(getattr(pl_module, "loop", None), "stats", None)
    if stats is None:
        return StepStatus(stage, 0.0, 0)
    in_flight = sum(stats.tool_calls.values()) - len(stats.tool_latency_s)
    tokens_per_s = stats.sampled_tokens / stats.generate_s if stats.generate_s else 0.0
    if stage.endswith("rollout") and in_flight > 0:  # a training or a validation rollout
        stage = stage.removesuffix("rollout") + "tools"
    return StepStatus(stage, tokens_per_s, in_flight)


class StageProgressBar(TQDMProgressBar):
    """TQDM bar whose postfix shows the live stage, rollout tokens/s and tool calls in flight.

    Args:
        refresh_rate: update the bar every this many steps (0 disables it).
        poll_s: seconds between live refreshes during a step.
        leave: keep the finished bar on screen.
        name: the run's name in the bar and lines (default: the module's, ``GRPOModule`` -> ``grpo``).
        plain: print plain lines instead of a bar; ``None``: when stdout is not a terminal.
        plain_every_s: least seconds between two plain lines (the last step is always printed).
    """

    def __init__(self, refresh_rate: int = 1, poll_s: float = 0.5, leave: bool = False, name: str | None = None,
                 plain: bool | None = None, plain_every_s: float = 30.0) -> None:  # fmt: skip
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.poll_s, self.name, self.plain_every_s = poll_s, name, plain_every_s
        self.plain = not sys.stdout.isatty() if plain is None else plain
        self._lines = PlainLines(plain_every_s)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._metrics: dict[str, int | str | float] = {}  # last batch-end metrics, reused live
        self._hook_stage = "idle"
        self._phase = "the step"  # what the watcher's lines say is running: a validation runs between steps
        self._validation_t0 = time.monotonic()
        self._loaded_updates = 0  # global_step of the checkpoint a validate / test run loaded (--ckpt_path)
        self._watching_validation = False  # the watcher is a validation's own, not the training loop's

    # Plain mode draws no bar at all: a log file would get every redraw, cursor-up escapes included,
    # glued to the plain lines.
    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self.plain else super().init_train_tqdm()

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self.plain else super().init_sanity_tqdm()

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self.plain else super().init_validation_tqdm()

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self.plain else super().init_test_tqdm()

    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(disable=True) if self.plain else super().init_predict_tqdm()

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._steps_bar(trainer)

    def _steps_bar(self, trainer: L.Trainer) -> None:
        """The training bar counts the run's steps, from those already done, under the run's name."""
        if trainer.max_steps > 0:  # steps of the run, not batches of a (resumable, endless) epoch
            step, self.train_progress_bar.total = training_steps(trainer)
            self.train_progress_bar.initial = self.train_progress_bar.n = step
        self.train_progress_bar.set_description(self.run_name(trainer.lightning_module))

    def run_name(self, pl_module: L.LightningModule) -> str:
        return self.name or type(pl_module).__name__.removesuffix("Module").lower() or "train"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        self._metrics = dict(super().get_metrics(trainer, pl_module))
        return self._metrics | step_status(pl_module, self._hook_stage).postfix()

    # The hook stages are the fallback for modules without ``stage``: this callback's
    # on_train_batch_start runs before the module's RolloutCallback (trainer callbacks come first).
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._hook_stage = "rollout"
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._hook_stage = "train"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._hook_stage = "idle"
        bar = self.train_progress_bar
        if bar is not None and trainer.max_steps > 0 and not self.plain:
            bar.n = training_steps(trainer)[0]
            bar.set_postfix(self.get_metrics(trainer, pl_module))
        elif trainer.max_steps <= 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.plain and self.is_enabled:
            self.get_metrics(trainer, pl_module)  # refreshes the step's metrics
            self._lines.step(trainer, self.run_name(pl_module), self._metrics)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._validation_t0, self._phase, self._hook_stage = time.monotonic(), "validation", "validation"
        if self._watcher is None:  # no training loop's watcher (sanity check, `mmsr validate`): one of its own
            self._start_watching(pl_module, trainer.global_step if trainer.state.fn == "fit" else self._loaded_updates)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._watching_validation:  # before the bar it writes to closes
            self._stop_watching()
        super().on_validation_end(trainer, pl_module)
        self._phase, self._hook_stage = "the step", "idle"
        if self.plain and self.is_enabled and not trainer.sanity_checking:  # the bar no longer shows it
            seconds = time.monotonic() - self._validation_t0
            updates = None if trainer.state.fn == "fit" else self._loaded_updates
            self._lines.validation(trainer, self.run_name(pl_module), seconds, updates)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning restores global_step in fit only: `mmsr validate --ckpt_path` validates the checkpoint's step
        self._loaded_updates = checkpoint.get("global_step", 0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # A resume within an epoch (every GRPO resume: one endless epoch) gets no on_train_epoch_start
        self._steps_bar(trainer)
        self._lines.start(training_steps(trainer)[0])
        self._start_watching(pl_module)

    def _start_watching(self, pl_module: L.LightningModule, updates: int | None = None) -> None:
        """Watch the training loop (``updates`` None), or a validation outside it, at ``updates`` optimizer updates."""
        if self.is_enabled and self.poll_s > 0:
            self._stop.clear()
            self._watching_validation = updates is not None
            args = (pl_module, updates)
            self._watcher = threading.Thread(target=self._watch, args=args, daemon=True, name="mmsr-progress")
            self._watcher.start()

    def _watch(self, pl_module: L.LightningModule, updates: int | None) -> None:
        while not self._stop.wait(self.poll_s):
            bar = self._train_progress_bar if updates is None else self._val_progress_bar
            live = self._metrics | step_status(pl_module, self._hook_stage).postfix()
            if bar is not None and not bar.disable:
                bar.set_postfix(live, refresh=True)
            elif self.plain:  # a long step or validation: say what it is doing
                self._lines.status(pl_module.trainer, self.run_name(pl_module), live, self._phase, updates)

    def _stop_watching(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        self._watching_validation = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_watching()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_watching()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_watching()
        super().teardown(trainer, pl_module, stage)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


class PlainLines:
    """Progress as plain lines, at most one every ``every_s`` seconds (and always the last step)."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self.t0, self.step0, self.last = every_s, time.monotonic(), 0, float("-inf")
        self.lock = threading.Lock()

    def start(self, step: int) -> None:
        self.t0, self.step0, self.last = time.monotonic(), step, float("-inf")

    def line(self, trainer: L.Trainer, name: str, metrics: dict, updates: int | None = None) -> str:
        """``updates``: the optimizer updates of a validation outside the training loop, whose line has no rate."""
        step, total = training_steps(trainer, updates)
        rate = (step - self.step0) / max(time.monotonic() - self.t0, 1e-9)
        eta = f" | ETA {_duration((total - step) / rate)}" if rate > 0 and total > 0 else ""
        shown = " | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "v_num")
        speed = "" if updates is not None else f" | {rate:.2g} steps/s{eta}"
        return f"{name} step {step}/{total if total > 0 else '?'}{speed} | {shown}"

    def step(self, trainer: L.Trainer, name: str, metrics: dict) -> None:
        step, total = training_steps(trainer)
        self._print(self.line(trainer, name, metrics), force=step >= total > 0)

    def status(self, trainer: L.Trainer, name: str, metrics: dict, phase: str = "the step",
               updates: int | None = None) -> None:  # fmt: skip
        """A line while ``phase`` (``the step``, ``validation``) runs: the step count is of the steps done."""
        self._print(self.line(trainer, name, metrics, updates) + f" (in {phase})")

    def validation(self, trainer: L.Trainer, name: str, seconds: float, updates: int | None = None) -> None:
        step, total = training_steps(trainer, updates)
        at = f"{step}/{total if total > 0 else '?'}"
        self._print(f"{name} validation at step {at} | {_duration(seconds)}", force=True)

    def _print(self, text: str, force: bool = False) -> None:
        with self.lock:
            if force or time.monotonic() - self.last >= self.every_s:
                self.last = time.monotonic()
                print(text, flush=True)
