"""``mmsr.callbacks.run_dir`` cases a mutation audit found untested: loggers re-pointed by class and never over a
configured wandb id, ``metrics.csv`` continued when the resumed run's first row has fewer columns, the checkpoint's
row kept out of another run directory, and no due validation run where the resumed run validates nothing."""

from pathlib import Path
from types import SimpleNamespace

from lightning.pytorch.loggers import CSVLogger

from mmsr.callbacks import run_dir
from mmsr.callbacks.run_dir import RunDirectory, continue_metrics, logger_run, repoint_loggers
from tests.callbacks.test_resume_logging import wandb_entry
from tests.callbacks.test_run_dir import csv_entry, rows


def test_a_logger_is_repointed_only_to_a_run_of_its_own_class(tmp_path):
    """The loggers are matched by position: a resume whose config's first logger is the CSV one, from a checkpoint
    whose first logger was wandb, would otherwise open the wandb run's id as a CSV ``version_<id>`` directory (and a
    wandb logger the CSV version number as its run id). Each starts its own new version instead."""
    runs = [{"logger": "WandbLogger", "version": "abc123", "root_dir": None},
            {"logger": "CSVLogger", "version": 3, "root_dir": str(tmp_path / "csv")}]  # fmt: skip
    config = [csv_entry(tmp_path), wandb_entry()]
    repoint_loggers(config, runs)
    assert config[0].init_args.version is None
    assert (config[1].init_args.version, config[1].init_args.resume) == (None, None)
    repoint_loggers(config, runs[::-1])  # in the checkpoint's order: both continue
    assert (config[0].init_args.version, config[1].init_args.version) == (3, "abc123")


def test_a_wandb_id_set_in_the_config_is_not_replaced_by_the_checkpoints(monkeypatch):
    """``id`` is wandb's name for the run id (``version`` the Lightning one): a config that names its run, e.g. to log
    the resumed run into a fresh one, keeps it; the checkpoint's id must not be resumed instead."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = {"logger": "WandbLogger", "version": "abc123", "root_dir": None}
    pinned = wandb_entry(id="mine")
    repoint_loggers([pinned], [run])
    assert (pinned.init_args.id, pinned.init_args.version, pinned.init_args.resume) == ("mine", None, None)
    unpinned = wandb_entry()
    repoint_loggers([unpinned], [run])
    assert (unpinned.init_args.version, unpinned.init_args.resume) == ("abc123", "allow")


def test_metrics_continue_when_the_first_resumed_row_lacks_a_column_of_the_file(tmp_path):
    """The killed run validated (a ``val/reward`` column); the resumed run's first row is a training step's, without
    it. The writer must know the file's whole header: told none, it took the row's keys as the header and rewrote the
    file with them, which fails on the old rows' ``val/reward`` (the resumed run died on its first row)."""
    logger = CSVLogger(tmp_path, name="csv", version=0)
    path = Path(logger.log_dir) / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text("a,step,val/reward\n0.0,0,\n0.1,1,\n,1,0.5\n")
    continue_metrics(logger)
    logger.log_metrics({"a": 0.2}, step=2)
    logger.save()
    assert path.read_text().splitlines()[0] == "a,step,val/reward"
    assert [(r["step"], r["a"], r["val/reward"]) for r in rows(path)] == [
        ("0", "0.0", ""), ("1", "0.1", ""), ("1", "", "0.5"), ("2", "0.2", "")]  # fmt: skip


def test_the_checkpoints_row_goes_only_into_the_checkpoints_own_run_directory(tmp_path):
    """The row a checkpoint carries (``unlogged_row``) is a step of the killed run: a resume that logs to another
    directory (another ``save_dir``, or a new version there) starts without it, at the step it trains first. In the
    checkpoint's own directory it is put back where missing."""
    own = CSVLogger(tmp_path, name="csv", version=0)
    elsewhere = CSVLogger(tmp_path / "elsewhere", name="csv", version=0)
    new_version = CSVLogger(tmp_path, name="csv", version=1)
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text("a,step\n0.0,0\n")
    callback = RunDirectory()
    callback.load_state_dict({"loggers": [logger_run(own)], "unlogged_row": {"step": 1, "metrics": {"a": 0.1}}})
    callback.continue_logs(SimpleNamespace(loggers=[elsewhere, new_version]), 2)
    assert not (tmp_path / "elsewhere" / "csv" / "version_0" / "metrics.csv").exists()
    assert not (tmp_path / "csv" / "version_1" / "metrics.csv").exists()
    callback.load_state_dict({"loggers": [logger_run(own)], "unlogged_row": {"step": 1, "metrics": {"a": 0.1}}})
    continue_metrics(own)  # as the resumed fit does before its first batch
    callback.continue_logs(SimpleNamespace(loggers=[own]), 2)
    got = rows(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert [(r["step"], r["a"]) for r in got] == [("0", "0.0"), ("1", "0.1")]


def test_no_due_validation_runs_where_the_resumed_run_validates_nothing(monkeypatch):
    """A checkpoint saved before a due validation, resumed with validation off (``limit_val_batches: 0``, no val
    data): the resumed run does not start the validation loop (it validates nothing). Lightning's loop, started
    anyway, skips itself with ``limit_val_batches: 0`` today: this keeps the resume from relying on that."""
    ran = []
    monkeypatch.setattr(run_dir, "run_validation", ran.append)
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=2))
    for validating in (False, True):
        trainer = SimpleNamespace(enable_validation=validating, is_global_zero=False, fit_loop=loop)
        callback = RunDirectory()
        callback.load_state_dict({"loggers": [], "validation_due": True})
        callback.resuming = True
        callback.on_train_start(trainer, None)
        assert ran == ([trainer] if validating else [])
