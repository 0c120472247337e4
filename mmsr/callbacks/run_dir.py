"""One run, one directory: a resumed ``mmsr fit`` writes into the run directory it was checkpointed
from, so its metrics, trajectories and wandb run continue instead of starting a new version.

Lightning's loggers pick a fresh ``version_N`` (and a fresh wandb id) on every start, so without
this a run killed and resumed twice lives in three directories and ``mmsr report`` sees a third of
it. The pieces, in the order a resume runs them:
1. ``RunDirectory`` (added to every trainer by ``mmsr.cli``) stores in each checkpoint which logger
   versions the run uses: the CSV / TensorBoard version and its directory, the wandb run id.
2. ``repoint_loggers`` (``MMSRCLI.before_instantiate_classes``, given ``--ckpt_path``) reads that
   back and sets ``version`` in the logger configs before the loggers exist (wandb: the same run
   id, with ``resume="allow"``, or rewound to the checkpoint with ``RunDirectory(rewind_wandb=True)``);
   Lightning's default logger is first written out as such an entry (``explicit_default_logger``). A
   logger whose directory moved (another ``save_dir``) starts a new version, as before.
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
6. The validation Lightning runs after that step comes after the checkpoint too, and a resumed loop skips
   it for good (it fast-forwards past it). The checkpoint records that it was due, and the resumed run
   runs it before its first training batch, logged at that step, as the uninterrupted run did (the
   killed run's rows of the step are replaced: its training row from the checkpoint, then the validation).

The run's config goes with it: ``LoggedConfig`` (``mmsr.cli``'s ``SaveConfigCallback``) saves
``config.yaml`` in the run directory and logs the whole config to every logger (the wandb run's config), with
secrets masked (``mmsr.tools.secrets``) there and in the hyperparameters Lightning logs and checkpoints.
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
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.parsing import AttributeDict

from mmsr.callbacks.resume_point import (
    before_finished_fit,
    next_step,
    rewinds,
    run_validation,
    unlogged_row,
    validation_due,
    wandb_steps,
)
from mmsr.callbacks.trajectory_logger import later_csv_dirs, wandb_run_dir
from mmsr.tools.secrets import redact_all, redact_checkpoint_hparams, redact_config

METRICS_FILE = "metrics.csv"


class RunDirectory(L.Callback):
    """Stores the run's logger versions (and a step row not yet written) in checkpoints; on resume cuts
    ``metrics.csv`` back to the resumed step, puts back the checkpoint's row if it is missing and runs the
    validation that was due after the checkpoint's step.

    Args:
        rewind_wandb: record in each checkpoint the last history step of each online wandb run, and resume a run
            from such a checkpoint with ``wandb.init(resume_from="<id>?_step=<n>")``: W&B drops what the killed run
            logged after the checkpoint, which a resumed run otherwise logs a second time. Off by default: rewinding
            is a W&B server preview that not every account or server has, and it refuses a run not yet marked
            crashed or finished (right after a kill -9); there ``wandb.init`` fails and the run does not start.
            Set it from the run's first start (add the callback to ``trainer.callbacks``); ``resume: allow`` in the
            ``WandbLogger`` config resumes without a rewind.
    """

    def __init__(self, rewind_wandb: bool = False) -> None:
        self.rewind_wandb = rewind_wandb
        self.loggers: list[dict[str, Any]] = []  # one entry per trainer logger, in order
        self.resuming = False
        self.unlogged_row: dict[str, Any] | None = None  # the loaded checkpoint's step row, if not yet written
        self.validation_due = False  # the loaded checkpoint was saved before the validation after its step
        self.next_step: int | None = None  # the loaded checkpoint's next step, if saved outside a step (``next_step``)
        self.resumed_from: list[dict[str, Any]] = []  # the loaded checkpoint's loggers

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The loggers created their experiments just before this hook: versions and ids are known.
        if trainer.is_global_zero:
            self.loggers = [logger_run(logger) for logger in trainer.loggers]
        if stage == "fit":  # resumed from the last step's checkpoint, the fit ends before ``on_train_start``
            before_finished_fit(trainer, lambda: self.on_train_start(trainer, pl_module))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        row = unlogged_row(trainer)  # on every rank: reading the metrics may sync them across ranks
        if not trainer.is_global_zero:
            return
        state = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})
        state["validation_due"] = validation_due(trainer)
        state["next_step"] = next_step(trainer)
        if row is not None:
            state["unlogged_row"] = row
        if self.rewind_wandb:
            state["wandb_steps"] = wandb_steps(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.resuming = trainer.state.fn == "fit"  # resuming a fit (not validating from a checkpoint)
        if not self.resuming:
            restore_logged_step(trainer, checkpoint)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.resuming and self.validation_due and trainer.enable_validation):
            return
        self.validation_due = False
        # The checkpoint's step, not yet counted done (the loop counts it on the first batch): the step the
        # uninterrupted run logged this validation at.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if trainer.is_global_zero:
            self.continue_logs(trainer, step)  # the killed run's rows of the step go, its training row comes back
        run_validation(trainer)  # on every rank: the validation gathers every rank's episodes

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the checkpoint callbacks (Lightning calls them last): the replayed epoch end's checkpoint gets it too.
        if self.resuming:
            self.restore_next_step(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.resuming:
            return
        self.restore_next_step(trainer)
        self.resuming = False
        if trainer.is_global_zero:  # the step Lightning logs this batch's metrics at, now that the loop restored it
            self.continue_logs(trainer, trainer.fit_loop.epoch_loop._batches_that_stepped)

    def restore_next_step(self, trainer: L.Trainer) -> None:
        """Undo Lightning's second count of the step of a checkpoint saved outside a step (``next_step``): until the
        resumed run's first training batch, the loop's count is the checkpoint's, on every rank."""
        if self.next_step is not None:
            trainer.fit_loop.epoch_loop._batches_that_stepped = self.next_step

    def continue_logs(self, trainer: L.Trainer, step: int) -> None:
        """Drop the ``metrics.csv`` rows of ``step`` and later, then put back the checkpoint's row (of a step before
        the first one the resumed run trains) where it is missing: in ``metrics.csv``, and in a rewound wandb run.
        The row belongs to the checkpoint's run: a resume that logs to a new directory or run does not get it."""
        row, self.unlogged_row = self.unlogged_row, None
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                drop_rows_from(Path(logger.log_dir) / METRICS_FILE, step)
            if row is None or logger_run(logger) not in self.resumed_from:
                continue
            if isinstance(logger, CSVLogger):
                append_missing_row(logger, row)
            elif isinstance(logger, WandbLogger) and logger.experiment.settings.resume_from is not None:
                logger.log_metrics(row["metrics"], step=row["step"])  # the rewind dropped it with what came after

    def state_dict(self) -> dict[str, Any]:
        return {"loggers": self.loggers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # ``self.loggers`` stays this run's (from ``setup``): later checkpoints name where this run logs.
        self.resumed_from = list(state_dict.get("loggers", []))
        self.unlogged_row = state_dict.get("unlogged_row")
        self.validation_due = bool(state_dict.get("validation_due"))
        self.next_step = state_dict.get("next_step")


class LoggedConfig(SaveConfigCallback):
    """Saves ``config.yaml`` to the run directory, as Lightning does, and logs the whole config to every
    logger under the dotted keys the command line and sweep files take (``cli_keys``).

    Lightning logs only the module's and data module's ``hparams``, and ``GRPOModule`` keeps its components
    (policy, engine, tools, reward) out of them: a sweep's runs could not be grouped in wandb by the
    ``model.reward.search_penalty`` they swept.

    Keys are configured by environment variable name (``api_key_env``); a secret in the config anyway (typed in,
    or ``${oc.env:...}`` resolved by the omegaconf parser) is masked in every copy the run keeps: ``config.yaml``
    (``redact_config``), what the loggers get (this config, and the hyperparameters Lightning logs after
    ``setup``) and the checkpoints' hyperparameters. The module runs with the real values.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        saving = self.save_to_log_dir and not self.already_saved
        log_dir = trainer.log_dir if saving else None  # on every rank: it broadcasts
        mask_logged_hparams(pl_module, trainer.datamodule)
        super().setup(trainer, pl_module, stage)  # Lightning writes config.yaml, then calls ``save_config``
        if saving and trainer.is_global_zero and log_dir is not None:
            mask_saved_config(os.path.join(log_dir, self.config_filename))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        redact_checkpoint_hparams(checkpoint)  # Lightning's copy of the live ``hparams`` (modules not mmsr's too)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Rank 0 only.
        params = redact_all(cli_keys(yaml.safe_load(self.parser.dump(self.config, skip_unset=False))))
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        # A first wandb logger: the run's own folder (its checkpoints, trajectories.jsonl); Lightning's config.yaml in
        # save_dir is every run's, overwritten by each, and export / eval --ckpt / report look beside the run's files.
        # A later CSV logger's folder holds metrics.csv, and report reads the config beside it (Lightning wrote the
        # first logger's).
        first = trainer.loggers[0] if trainer.loggers else None
        for folder in ([wandb_run_dir(first)] if isinstance(first, WandbLogger) else []) + later_csv_dirs(trainer):
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, folder / self.config_filename, skip_none=False, overwrite=True, multifile=self.multifile)
            mask_saved_config(str(folder / self.config_filename))


def mask_logged_hparams(*holders: Any) -> None:
    """Mask secrets in the hyperparameters Lightning logs of each module (``hparams_initial``, which only its
    hyperparameter logging reads, after the ``setup`` hooks); the ``hparams`` the module runs with stay as they are."""
    for holder in holders:
        initial = getattr(holder, "_hparams_initial", None)
        if initial:
            holder._hparams_initial = AttributeDict(redact_all(dict(initial)))


def mask_saved_config(path: str) -> None:
    """Rewrite the config file at ``path`` (local or remote, as Lightning saves it) with its secrets masked, if any."""
    fs = get_filesystem(path)
    with fs.open(path, "r", encoding="utf-8") as f:
        text = f.read()
    if (masked := redact_config(text)) != text:
        with fs.open(path, "w", encoding="utf-8") as f:
            f.write(masked)


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


def restore_logged_step(trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
    """``mmsr validate`` (test, predict) ``--ckpt_path``: its metrics are logged at the checkpoint's step. Lightning
    restores its step counters in ``fit`` only, so they were logged at step 0 and epoch 0. Only the step Lightning
    logs at (the fit loop's ``_batches_that_stepped``) and the epoch it writes beside it (``current_epoch``) are set:
    ``global_step``, which ends a later ``fit``, stays as it was."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    if "_batches_that_stepped" in loop:  # Lightning's checkpoints have it (a hand-made one may not)
        trainer.fit_loop.epoch_loop._batches_that_stepped = loop["_batches_that_stepped"]
    if "epoch" in checkpoint:  # the current_epoch the fit logged that step's rows with
        trainer.fit_loop.epoch_progress.current.completed = checkpoint["epoch"]


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
    """The loggers of the ``RunDirectory`` state of a checkpoint file or sharded checkpoint directory (Lightning
    keeps a directory's non-tensor state in ``meta.pt``), a wandb run's with the ``rewind_step`` recorded for it
    (``RunDirectory(rewind_wandb=True)``); None if it has none or cannot be read."""
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
    if not isinstance(state, dict) or state.get("loggers") is None:
        return None
    steps = state.get("wandb_steps", {})  # by wandb run id
    return [run | {"rewind_step": steps[run.get("version")]} if run.get("version") in steps else run
            for run in state["loggers"]]  # fmt: skip


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
            if run.get("rewind_step") is not None and rewinds(args):  # without what the killed run logged after
                args.resume, args.resume_from = None, f"{run['version']}?_step={run['rewind_step']}"


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
