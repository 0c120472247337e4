"""One run, one directory: a resumed ``mmsr fit`` writes into the run directory it was checkpointed
from, so its metrics, trajectories and wandb run continue instead of starting a new version.

Lightning's loggers pick a fresh ``version_N`` (and a fresh wandb id) on every start, so without
this a run killed and resumed twice lives in three directories and ``mmsr report`` sees a third of
it. The pieces, in the order a resume runs them:
1. ``RunDirectory`` (added to every trainer by ``mmsr.cli``) stores in each checkpoint which logger
   versions the run uses: the CSV / TensorBoard version and its directory, the wandb run id.
2. ``repoint_loggers`` (``MMSRCLI.before_instantiate_classes``, given ``--ckpt_path``) reads that
   back and sets ``version`` in the logger configs before the loggers exist (wandb: the same run
   id, with ``resume="allow"``); Lightning's default logger is first written out as such an entry
   (``explicit_default_logger``). A logger whose directory moved (another ``save_dir``) starts a new
   version, as before.
3. ``continue_metrics`` (``MMSRCLI.before_fit``) keeps ``metrics.csv``, which the CSV logger would
   delete when it opens the directory, and appends to it (a header change rewrites it with every row).
4. On the first training batch ``RunDirectory`` drops the rows of steps >= the first step the
   resumed run logs: a run killed after logging step 5 and resumed from step 4's checkpoint logs 5
   again, and a resumed run may stop earlier than the killed one got, so the killed run's rows from
   that step on are not this run's history. ``TrajectoryLogger`` applies the same rule.
5. Lightning saves a step's checkpoint (``ModelCheckpoint.on_train_batch_end``) before it writes that
   step's metrics row, and the resumed run starts at the next step: a kill in between would lose the
   row for good. A checkpoint saved in that window carries the row (``on_save_checkpoint``), and a
   resumed run that logs to the checkpoint's own directory appends it after step 4 unless
   ``metrics.csv`` already has that step (a resume into a new directory starts without it).

The run's config goes with it: ``LoggedConfig`` (``mmsr.cli``'s ``SaveConfigCallback``) saves
``config.yaml`` in the run directory and logs the whole config to every logger (the wandb run's config).
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from mmsr.tools.secrets import redact_all

METRICS_FILE = "metrics.csv"


class RunDirectory(L.Callback):
    """Stores the run's logger versions (and a step row not yet written) in checkpoints; on resume cuts
    ``metrics.csv`` back to the resumed step and puts back the checkpoint's row if it is missing."""

    def __init__(self) -> None:
        self.loggers: list[dict[str, Any]] = []  # one entry per trainer logger, in order
        self.resuming = False
        self.unlogged_row: dict[str, Any] | None = None  # the loaded checkpoint's step row, if not yet written
        self.resumed_from: list[dict[str, Any]] = []  # the loaded checkpoint's loggers

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The loggers created their experiments just before this hook: versions and ids are known.
        if trainer.is_global_zero:
            self.loggers = [logger_run(logger) for logger in trainer.loggers]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        row = unlogged_row(trainer)  # on every rank: reading the metrics may sync them across ranks
        if row is not None and trainer.is_global_zero:
            checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})["unlogged_row"] = row

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.resuming = trainer.state.fn == "fit"  # resuming a fit (not validating from a checkpoint)
        if not self.resuming:
            restore_logged_step(trainer, checkpoint)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.resuming:
            return
        self.resuming = False
        if not trainer.is_global_zero:
            return
        # The step Lightning logs this batch's metrics at; read here, after the loop restored it.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                drop_rows_from(Path(logger.log_dir) / METRICS_FILE, step)
                # The row belongs to the checkpoint's run: a resume that logs to a new directory does not get it.
                continues = logger_run(logger) in self.resumed_from
                if self.unlogged_row is not None and self.unlogged_row["step"] < step and continues:
                    append_missing_row(logger, self.unlogged_row)

    def state_dict(self) -> dict[str, Any]:
        return {"loggers": self.loggers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # ``self.loggers`` stays this run's (from ``setup``): later checkpoints name where this run logs.
        self.resumed_from = list(state_dict.get("loggers", []))
        self.unlogged_row = state_dict.get("unlogged_row")


class LoggedConfig(SaveConfigCallback):
    """Saves ``config.yaml`` to the run directory, as Lightning does, and logs the whole config to every
    logger under the dotted keys the command line and sweep files take (``cli_keys``).

    Lightning logs only the module's and data module's ``hparams``, and ``GRPOModule`` keeps its components
    (policy, engine, tools, reward) out of them: a sweep's runs could not be grouped in wandb by the
    ``model.reward.search_penalty`` they swept."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Rank 0 only. Keys are configured by environment variable name (``api_key_env``); a value written
        # into the config anyway (a header, a URL) is masked, as in the tools' results.
        params = redact_all(cli_keys(yaml.safe_load(self.parser.dump(self.config, skip_unset=False))))
        for logger in trainer.loggers:
            logger.log_hyperparams(params)


def cli_keys(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` flattened to the command line's dotted keys: ``model.reward.search_penalty`` for
    model.init_args.reward.init_args.search_penalty, ``model.reward.class_path`` for its class. A list
    (of callbacks, of loggers) stays one value."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = prefix if key == "init_args" else f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(cli_keys(value, path))
        else:
            flat[path] = value
    return flat


def unlogged_row(trainer: L.Trainer) -> dict[str, Any] | None:
    """The metrics row Lightning will log for the current training step, while a checkpoint is saved
    between the step's end and that row being written (``{"step": s, "metrics": {...}}``); else None.

    Inside that window the batch is processed but not yet counted completed
    (lightning/pytorch/loops/training_epoch_loop.py ``advance``); the row is what
    ``update_train_step_metrics`` would log there: the step's logged metrics plus ``epoch``.
    """
    loop = trainer.fit_loop.epoch_loop
    progress = loop.batch_progress.current
    if not trainer.training or progress.processed != progress.completed + 1:
        return None
    connector = trainer._logger_connector
    if loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
        return None  # no row is logged mid-accumulation
    if not connector.should_update_logs:
        return None
    metrics = convert_tensors_to_scalars(connector.metrics["log"])
    metrics.setdefault("epoch", trainer.current_epoch)
    return {"step": loop._batches_that_stepped, "metrics": metrics}


def restore_logged_step(trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
    """``mmsr validate`` (test, predict) ``--ckpt_path``: its metrics are logged at the checkpoint's step. Lightning
    restores its step counters in ``fit`` only, so they were logged at step 0. Only the step Lightning logs at (the
    fit loop's ``_batches_that_stepped``) is set: ``global_step``, which ends a later ``fit``, stays as it was."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    if "_batches_that_stepped" in loop:  # Lightning's checkpoints have it (a hand-made one may not)
        trainer.fit_loop.epoch_loop._batches_that_stepped = loop["_batches_that_stepped"]


def append_missing_row(logger: CSVLogger, row: dict[str, Any]) -> None:
    """Append ``row`` (see ``unlogged_row``) through ``logger`` unless its ``metrics.csv`` has that step."""
    path = Path(logger.log_dir) / METRICS_FILE
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as f:
            if any(_step_of(r) == row["step"] for r in csv.DictReader(f)):
                return
    logger.log_metrics(row["metrics"], step=row["step"])
    logger.save()


def logger_run(logger: Any) -> dict[str, Any]:
    """What identifies ``logger``'s run: its class name, version (wandb: run id) and, for loggers
    with version directories, the absolute directory holding them (``None`` otherwise)."""
    root = getattr(logger, "root_dir", None)
    return {"logger": type(logger).__name__, "version": logger.version, "root_dir": os.path.abspath(root) if root else None}


def checkpoint_runs(ckpt_path: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The ``RunDirectory`` state of a checkpoint file or sharded checkpoint directory (Lightning keeps
    a directory's non-tensor state in ``meta.pt``); None if it has none or cannot be read."""
    path = Path(ckpt_path)
    path = path / "meta.pt" if path.is_dir() else path
    if not path.is_file():
        return None
    try:  # memory-mapped: only the small callback state is read, not the weights
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - Lightning reports an unreadable checkpoint itself, next
        warnings.warn(f"could not read the run directory from {path} ({type(e).__name__}); logging to a new one")
        return None
    state = ckpt.get("callbacks", {}).get(RunDirectory.__qualname__) if isinstance(ckpt, dict) else None
    return state.get("loggers") if isinstance(state, dict) else None


def repoint_loggers(logger_config: Any, runs: list[dict[str, Any]]) -> None:
    """Set ``version`` of each configured logger (a ``class_path`` / ``init_args`` entry, or a list
    of them) to the checkpoint's, matched by position and class; a version or id set in the config
    wins. A versioned logger is re-pointed only if its directory is the checkpoint's."""
    entries = logger_config if isinstance(logger_config, list) else [logger_config]
    entries = [e for e in entries if isinstance(e, Namespace) and "class_path" in e]
    for entry, run in zip(entries, runs):
        args = entry.get("init_args")
        if entry.class_path.rsplit(".", 1)[-1] != run.get("logger") or run.get("version") is None or args is None:
            continue
        if "version" not in args or args.get("version") is not None or args.get("id") is not None:
            continue
        if run.get("root_dir") and not same_root(args, run["root_dir"]):
            warnings.warn(f"the checkpoint's run directory {run['root_dir']} is not where this config logs; "
                          "logging to a new version")  # fmt: skip
            continue
        args.version = run["version"]
        if "resume" in args and args.get("resume") is None:  # WandbLogger: continue the same run
            args.resume = "allow"


def explicit_default_logger(trainer_config: Namespace) -> None:
    """Write Lightning's default logger (``trainer.logger`` true, or left out) into ``trainer_config`` as the
    ``class_path`` entry the Trainer would build, so that ``repoint_loggers`` can continue its version: the
    default is made inside the Trainer, too late for that. ``false`` (and ``barebones``) stay without one.

    As lightning/pytorch/trainer/connectors/logger_connector/logger_connector.py ``configure_logger``:
    ``TensorBoardLogger`` if tensorboard(X) is installed, else ``CSVLogger``, in ``default_root_dir`` (else
    the working directory) under ``lightning_logs``. ``mmsr.cli`` calls it on resume only, so the version is
    the checkpoint's (Lightning's TensorBoard default would take a SLURM job's id)."""
    logger = trainer_config.get("logger")
    if logger is not True and (logger is not None or trainer_config.get("barebones")):
        return
    name = "TensorBoardLogger" if _TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE else "CSVLogger"
    root = trainer_config.get("default_root_dir") or os.getcwd()
    if _is_local_file_protocol(root):  # as ``Trainer.default_root_dir``
        root = os.path.normpath(os.path.expanduser(root))
    args = Namespace(save_dir=root, name="lightning_logs", version=None)
    trainer_config.logger = Namespace(class_path=f"lightning.pytorch.loggers.{name}", init_args=args)


def same_root(init_args: Namespace, root_dir: str) -> bool:
    """Whether a logger configured with ``init_args`` keeps its versions in ``root_dir``."""
    save_dir = init_args.get("save_dir") or init_args.get("root_dir")
    return save_dir is not None and os.path.abspath(os.path.join(save_dir, init_args.get("name") or "")) == root_dir


@rank_zero_only
def continue_metrics(logger: CSVLogger) -> None:
    """Open ``logger``'s experiment without losing its ``metrics.csv``, and append to it from now on.

    The CSV writer deletes an existing ``metrics.csv`` when it is created and only knows the header
    it wrote itself (lightning/fabric/loggers/csv_logs.py): the file is moved aside while the writer
    is created and then told the header, so new rows append and new keys rewrite the file with the
    old rows kept. A copy left aside by a crash in between is put back by the next resume.
    """
    path = Path(logger.log_dir) / METRICS_FILE
    aside = path.with_name(f".{METRICS_FILE}.resuming")
    if path.is_file():
        os.replace(path, aside)
    if not aside.is_file():
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        writer = logger.experiment
    os.replace(aside, path)
    with path.open(newline="", encoding="utf-8") as f:
        writer.metrics_keys = list(csv.DictReader(f).fieldnames or [])


def drop_rows_from(path: Path, step: int) -> None:
    """Remove the rows of ``step`` and later from a CSVLogger ``metrics.csv`` (atomically), and a row
    torn by a kill mid-write."""
    if not path.is_file():
        return
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    kept = [r for r in rows if (s := _step_of(r)) is not None and s < step]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)


def _step_of(row: dict[str | None, Any]) -> int | None:
    """The row's step; None for a torn row (fewer or more cells than the header)."""
    if None in row or None in row.values():
        return None
    try:
        return int(float(row["step"]))
    except (KeyError, ValueError):
        return None
