"""More behaviours of mmsr/callbacks that no other test pinned: each test here failed against a mutant of the module
that the other callback tests let pass (a second mutation audit of mmsr/callbacks). Tiny LinearModule / BoringModel
fits, a fake trainer where the callback reads only a few attributes, and a fake clock where a rate is printed."""

import signal
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, Logger

import mmsr.callbacks.progress as progress
from mmsr.callbacks.final_checkpoint import FinalCheckpoint
from mmsr.callbacks.progress import StageProgressBar, _duration
from mmsr.callbacks.requeue import StepBoundaryRequeue
from mmsr.callbacks.trajectory_logger import TrajectoryLogger
from tests.callbacks.test_progress import LinearModule
from tests.callbacks.test_requeue import fake_trainer
from tests.callbacks.test_trajectory_logger import TwoUpdatesAStep


def test_a_handler_of_the_user_s_on_the_requeue_signal_is_left_in_place():
    """With a handler of the user's on SIGUSR1 Lightning registers no requeue handler of its own; the callback then
    does nothing. Swapping the user's handler for one that only notes the signal silenced it for the whole run (and
    at the step's end called Lightning's save and requeue, which the user had not asked for)."""
    trainer, before = fake_trainer(SLURMEnvironment()), signal.getsignal(signal.SIGUSR1)

    def users(signum, frame) -> None:
        pass

    signal.signal(signal.SIGUSR1, users)
    callback = StepBoundaryRequeue()
    try:
        callback.on_train_start(trainer, None)
        assert signal.getsignal(signal.SIGUSR1) is users and callback.signum is None
        callback.on_train_batch_end(trainer, None, None, None, 0)
        assert trainer.strategy.calls == [] and trainer._signal_connector.saves == []  # no collective, no save
    finally:
        callback.restore()
        signal.signal(signal.SIGUSR1, before)


def linear_trainer(root: Path, max_steps: int, bar: L.Callback | None = None, **kwargs) -> L.Trainer:
    """A LinearModule trainer (4 batches an epoch) without validation, logger or checkpoints unless ``kwargs``."""
    args = dict(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                enable_model_summary=False, default_root_dir=root, limit_val_batches=0,
                callbacks=[bar] if bar else [], enable_progress_bar=bar is not None)  # fmt: skip
    return L.Trainer(**args | kwargs)


def recorded(bar: StageProgressBar) -> StageProgressBar:
    """``bar``, keeping the lines it prints in ``bar.printed`` (and still printing them)."""
    bar.printed, print_line = [], bar._lines._print
    bar._lines._print = lambda text, force=False: (bar.printed.append(text), print_line(text, force))[1]
    return bar


def wait_for(condition, seconds: float = 5.0) -> None:
    """Waits until ``condition()`` holds, ``seconds`` at most (the test's assert then says what was missing)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(scope="module")
def step_2_ckpt(tmp_path_factory) -> Path:
    """A LinearModule checkpoint at step 2 (of 4 in its epoch): what the resumed and validated runs load."""
    root = tmp_path_factory.mktemp("linear")
    saves = ModelCheckpoint(root, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    linear_trainer(root, 2, enable_checkpointing=True, callbacks=[saves]).fit(LinearModule())
    return root / "step=2.ckpt"


def test_the_bar_of_a_later_epoch_starts_at_the_steps_done(tmp_path):
    """Lightning resets the bar at each epoch's start (``initial`` 0); tqdm's rate and ETA count the steps since
    ``initial``, so a bar set to step 4 of the run from 0 counted 4 steps as done in the epoch's first moment (a rate
    far too high, an ETA far too short). 6 steps of a 4-batch epoch: the second epoch starts at step 4."""
    bar = StageProgressBar(poll_s=0, plain=False, name="linear")
    linear_trainer(tmp_path, 6, bar).fit(LinearModule())
    tqdm = bar.train_progress_bar
    assert (tqdm.initial, tqdm.n, tqdm.total) == (4, 6, 6)


def test_a_run_resumed_within_an_epoch_counts_the_run_s_steps_on_its_bar(step_2_ckpt, tmp_path):
    """Lightning calls no on_train_epoch_start on a resume within an epoch, which is every GRPO resume (one endless
    epoch): the bar stayed Lightning's own ("Training", no total, counting from 0). Resumed at step 2 of 4."""
    bar = StageProgressBar(poll_s=0, plain=False, name="linear")
    linear_trainer(tmp_path, 4, bar).fit(LinearModule(), ckpt_path=step_2_ckpt)
    tqdm = bar.train_progress_bar
    assert (tqdm.desc, tqdm.initial, tqdm.n, tqdm.total) == ("linear: ", 2, 4, 4)


def test_a_resumed_run_s_plain_rate_counts_the_steps_since_the_resume(step_2_ckpt, tmp_path, monkeypatch):
    """The plain lines' rate is the steps this process did over its time: counted from step 0, a run resumed at step
    2 claimed its restored steps too (0.3 steps/s for 1 step in 10 s) and its ETA was a third of the real one.
    The clock is the progress module's, faked to 10 s a step done: 20 s at the start, 30 s after step 3."""
    bar = recorded(StageProgressBar(poll_s=0, name="linear", plain=True, plain_every_s=0.0))
    trainer = linear_trainer(tmp_path, 4, bar)
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: 10.0 * trainer.global_step))
    trainer.fit(LinearModule(), ckpt_path=step_2_ckpt)
    lines = [line.split(" | ")[:3] for line in bar.printed]
    assert lines == [["linear step 3/4", "0.1 steps/s", "ETA 0m10s"], ["linear step 4/4", "0.1 steps/s", "ETA 0m00s"]]


class WatchedValidation(LinearModule):
    """A validation step that lasts until the bar's watcher has printed a line during it (5 s at most)."""

    bar: StageProgressBar

    def validation_step(self, batch, batch_idx) -> None:
        wait_for(lambda: any(line.endswith("(in validation)") for line in self.bar.printed))
        super().validation_step(batch, batch_idx)


def test_mmsr_validate_of_a_step_2_checkpoint_shows_step_2(step_2_ckpt, tmp_path):
    """``mmsr validate --ckpt_path`` runs no fit, so ``trainer.global_step`` stays 0: the lines during and after the
    validation said ``step 0`` for a checkpoint of step 2. They name the step the checkpoint holds."""
    module = WatchedValidation()
    module.bar = bar = recorded(StageProgressBar(poll_s=0.02, name="linear", plain=True, plain_every_s=0.0))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=1, callbacks=[bar])  # fmt: skip
    trainer.validate(module, ckpt_path=step_2_ckpt)
    watched, (last,) = bar.printed[:-1], bar.printed[-1:]
    assert watched and all(line.startswith("linear step 2/? | stage validation") for line in watched), bar.printed
    assert last.startswith("linear validation at step 2/? | "), bar.printed


class WatchedSecondStep(LinearModule):
    """The second training step lasts until the bar's watcher has printed a line after the first validation's
    (5 s at most)."""

    bar: StageProgressBar

    def training_step(self, batch, batch_idx):
        if batch_idx == 1:
            wait_for(lambda: "(in the step)" in phases_after_validation(self.bar.printed))
        return super().training_step(batch, batch_idx)


def phases_after_validation(lines: list[str]) -> list[str]:
    """What the watcher's lines after the first validation's line say is running (``(in ...)``)."""
    ended = next((i for i, line in enumerate(lines) if line.startswith("linear validation at step")), len(lines))
    return [line[line.rindex(" (in ") + 1 :] for line in lines[ended + 1 :] if line.endswith(")")]


def test_after_a_validation_the_watcher_names_the_step_again(tmp_path):
    """A validation between two steps sets the watcher's phase to ``validation``; at its end the next step's lines
    say ``(in the step)`` again, or a log read as if every later step were still validating."""
    module = WatchedSecondStep()
    module.bar = bar = recorded(StageProgressBar(poll_s=0.02, name="linear", plain=True, plain_every_s=0.0))
    trainer = linear_trainer(tmp_path, 2, bar, limit_val_batches=1, val_check_interval=1, check_val_every_n_epoch=None,
                             num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module)
    assert "(in the step)" in phases_after_validation(bar.printed), bar.printed


class ProgBarLoss(LinearModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss, prog_bar=True)
        return loss


def test_plain_lines_leave_out_the_logger_s_version(tmp_path):
    """Lightning's progress-bar metrics carry the logger's version (``v_num``) for the bar's postfix; a plain line
    is no place for it: ``v_num 0`` on every line of the log, between the rate and the run's metrics."""
    bar = recorded(StageProgressBar(poll_s=0, name="linear", plain=True, plain_every_s=0.0))
    linear_trainer(tmp_path, 2, bar, logger=CSVLogger(tmp_path)).fit(ProgBarLoss())
    assert bar._metrics.get("v_num") == 0  # Lightning's metrics hold it: the lines leave it out
    assert [line.split(" | ")[0] for line in bar.printed] == ["linear step 1/2", "linear step 2/2"]
    assert all(line.split(" | ")[-1].startswith("loss ") and "v_num" not in line for line in bar.printed), bar.printed


@pytest.mark.parametrize(("seconds", "shown"), [(0, "0m00s"), (59.9, "0m59s"), (61, "1m01s"), (3599, "59m59s"),
                                                 (3600, "1h00m"), (4500, "1h15m"), (7199, "1h59m"), (36000, "10h00m")])
def test_a_duration_shows_minutes_and_seconds_under_an_hour_then_hours_and_minutes(seconds, shown):
    """ETAs and validation times: whole seconds under an hour, whole minutes of the hour above (1h75m for 75 minutes
    read as nearly two hours)."""
    assert _duration(seconds) == shown


def test_a_cut_epoch_counts_as_done_again_after_the_last_checkpoint(tmp_path):
    """``FinalCheckpoint`` saves ``last.ckpt`` with ``max_steps``' cut epoch counted as still running, then puts the
    count back: left one low, the trainer said epoch 0 after the fit (``trainer.current_epoch``) and a checkpoint
    saved after it (``trainer.save_checkpoint``) recorded the epoch as running, unlike Lightning's own count."""
    trainer = L.Trainer(max_epochs=2, max_steps=3, limit_train_batches=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                        callbacks=[ModelCheckpoint(tmp_path, save_last=True), FinalCheckpoint()])  # fmt: skip
    trainer.fit(BoringModel())
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert (saved["global_step"], saved["epoch"]) == (3, 0)  # the epoch saved as still running
    epochs = trainer.fit_loop.epoch_progress
    counts = [(c.processed, c.completed) for c in (epochs.current, epochs.total)]
    assert trainer.current_epoch == 1 and counts == [(1, 1), (1, 1)]
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert torch.load(tmp_path / "after.ckpt", map_location="cpu", weights_only=False)["epoch"] == 1


class ScalarSteps(Logger):
    """A logger keeping the step of each ``log_metrics`` call (Lightning's scalars), sending nothing."""

    name, version = "steps", 0

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.steps.append(step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class WrittenSteps(TrajectoryLogger):
    """A TrajectoryLogger keeping the steps it writes instead of writing them."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.written: list[int] = []

    def write(self, trainer, rollout, step: int) -> None:
        self.written.append(step)


@pytest.mark.parametrize(("max_steps", "stop_at"), [(12, None), (99, 3)], ids=["max_steps", "stopped_on_phase"])
def test_the_last_step_s_table_is_logged_only_with_its_scalars(tmp_path, max_steps, stop_at):
    """Reaching ``max_steps`` does not set ``trainer.should_stop``: Lightning logs no scalars at a last step off its
    ``log_every_n_steps`` phase, so that step's table is not logged either (a table without its reward and accuracy,
    at a step wandb has no other point at). 6 steps (12 updates at 2 a step) every 4: step 3 only. A stop on a
    logged step (3) logs its table once, at that step: nothing is left for the end of training."""
    logger, tables = ScalarSteps(), WrittenSteps(every_n_steps=4, max_trajectories=1)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger, log_every_n_steps=4,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[tables])  # fmt: skip
    module = TwoUpdatesAStep(rollout=object(), stop_at=stop_at)
    trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(20, 1)))
    assert trainer.global_step == 2 * (stop_at + 1 if stop_at else 6)
    assert logger.steps == [3] and tables.written == logger.steps
