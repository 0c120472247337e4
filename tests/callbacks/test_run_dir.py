"""A resumed run keeps its run directory: logger versions stored in checkpoints, loggers re-pointed
from them, ``metrics.csv`` / ``trajectories.jsonl`` continued without repeated steps, wandb resumed.
(The kill -9 version, through the ``mmsr fit`` subprocess, is ``tests/test_resume.py``.)"""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from mmsr.callbacks import run_dir
from mmsr.callbacks.run_dir import (
    LoggedConfig,
    RunDirectory,
    checkpoint_runs,
    continue_metrics,
    drop_rows_from,
    explicit_default_logger,
    repoint_loggers,
)
from mmsr.callbacks.trajectory_logger import drop_records_from
from mmsr.cli import lightning_cli
from mmsr.report.records import read_records
from tests.conftest import ROOT


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_continue_across_a_header_change_and_drop_repeated_steps(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version=0)
    path = Path(logger.log_dir) / "metrics.csv"
    path.parent.mkdir(parents=True)
    # The killed run logged steps 0..4, the last row torn by the kill.
    path.write_text("a,step\n" + "".join(f"{s / 10},{s}\n" for s in range(5)) + "0.5")
    continue_metrics(logger)  # Lightning's writer would have deleted the file here
    drop_rows_from(path, 3)  # resumed at step 3: the killed run's rows 3, 4 (and the torn one) go
    assert [r["step"] for r in rows(path)] == ["0", "1", "2"]
    logger.log_metrics({"a": 0.33, "b": 1.0}, step=3)  # a new key: the writer rewrites the header
    logger.save()
    logger.log_metrics({"a": 0.44}, step=4)
    logger.save()
    got = rows(path)
    assert [(r["step"], r["a"], r["b"]) for r in got] == [("0", "0.0", ""), ("1", "0.1", ""), ("2", "0.2", ""), ("3", "0.33", "1.0"), ("4", "0.44", "")]


def test_metrics_left_aside_by_a_crash_are_put_back(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version=0)
    Path(logger.log_dir).mkdir(parents=True)
    (Path(logger.log_dir) / ".metrics.csv.resuming").write_text("a,step\n1,0\n")
    continue_metrics(logger)
    assert rows(Path(logger.log_dir) / "metrics.csv") == [{"a": "1", "step": "0"}]


def test_trajectories_drop_resumed_steps_and_torn_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    records = [json.dumps({"step": s, "text": "line\u2028separator"}, ensure_ascii=False) for s in (0, 0, 1, 2)]
    path.write_text("\n".join(records) + '\n{"step": 3, "te', encoding="utf-8")
    drop_records_from(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text(encoding="utf-8").split("\n") if line] == [0, 0, 1]
    assert path.read_text(encoding="utf-8").endswith("separator\"}\n")


def csv_entry(save_dir, **init_args) -> Namespace:
    args = Namespace(save_dir=str(save_dir), name="csv", version=None, prefix="", **init_args)
    return Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=args)


def test_loggers_are_repointed_only_to_their_own_directory(tmp_path):
    wandb = Namespace(class_path="lightning.pytorch.loggers.WandbLogger",
                      init_args=Namespace(save_dir=str(tmp_path), version=None, id=None, resume=None))  # fmt: skip
    runs = [{"logger": "CSVLogger", "version": 3, "root_dir": str(tmp_path / "csv")},
            {"logger": "WandbLogger", "version": "abc123", "root_dir": None}]  # fmt: skip
    config = [csv_entry(tmp_path), wandb]
    repoint_loggers(config, runs)
    assert config[0].init_args.version == 3
    assert (wandb.init_args.version, wandb.init_args.resume) == ("abc123", "allow")
    moved = csv_entry(tmp_path / "elsewhere")
    with pytest.warns(UserWarning, match="not where this config logs"):
        repoint_loggers(moved, runs)
    assert moved.init_args.version is None  # another save_dir: a new version there, as before
    pinned = csv_entry(tmp_path)
    pinned.init_args.version = "mine"
    repoint_loggers([pinned, True], runs)
    assert pinned.init_args.version == "mine"  # a version set in the config wins


def test_lightnings_default_logger_is_written_out_so_that_it_can_be_repointed(tmp_path, monkeypatch):
    """``trainer.logger`` true or left out: Lightning builds the logger inside the Trainer, after the configs
    are re-pointed, and a resumed run opened lightning_logs/version_1."""
    monkeypatch.setattr(run_dir, "_TENSORBOARDX_AVAILABLE", False)
    for tensorboard, name in ((False, "CSVLogger"), (True, "TensorBoardLogger")):  # Lightning's choice
        monkeypatch.setattr(run_dir, "_TENSORBOARD_AVAILABLE", tensorboard)
        runs = [{"logger": name, "version": 3, "root_dir": str(tmp_path / "lightning_logs")}]
        for left_out in (None, True):
            trainer = Namespace(logger=left_out, default_root_dir=str(tmp_path), barebones=False)
            explicit_default_logger(trainer)
            repoint_loggers(trainer.logger, runs)
            assert (trainer.logger.class_path, trainer.logger.init_args.version) == (f"lightning.pytorch.loggers.{name}", 3)
    for off in (Namespace(logger=False, barebones=False), Namespace(logger=None, barebones=True)):
        explicit_default_logger(off)
        assert not off.logger  # no logger stays no logger


class Built(Exception):
    """Raised where the CLI would build the model: carries the config it would build from."""


def test_a_resume_with_lightnings_default_logger_continues_its_version(tmp_path, monkeypatch):
    from tests.callbacks.scripted_run import CONFIG

    def stop(cli):
        raise Built(cli.config.fit.trainer.logger)

    monkeypatch.setattr(LightningCLI, "instantiate_classes", stop)
    monkeypatch.setattr(run_dir, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(run_dir, "_TENSORBOARDX_AVAILABLE", False)
    monkeypatch.chdir(ROOT)
    run = {"logger": "CSVLogger", "version": 0, "root_dir": str(tmp_path / "lightning_logs")}
    torch.save({"callbacks": {"RunDirectory": {"loggers": [run]}}}, tmp_path / "last.ckpt")
    with pytest.raises(Built) as built:
        lightning_cli(["fit", "-c", str(CONFIG), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "true",
                       "--ckpt_path", str(tmp_path / "last.ckpt")])  # fmt: skip
    (logger,) = built.value.args
    assert (logger.class_path, logger.init_args.save_dir, logger.init_args.version) == (
        "lightning.pytorch.loggers.CSVLogger", str(tmp_path), 0)  # fmt: skip


def test_a_resumed_run_takes_its_config_not_the_checkpoints_hyperparameters(tmp_path, monkeypatch):
    """Lightning merged a checkpoint file's hparams over the config: the resumed run trained at the old lr."""
    from tests.callbacks.scripted_run import CONFIG

    def stop(cli):
        raise Built(cli.config.fit.model.init_args.lr)

    monkeypatch.setattr(LightningCLI, "instantiate_classes", stop)
    monkeypatch.chdir(ROOT)
    torch.save({"hyper_parameters": {"lr": 0.5}}, tmp_path / "last.ckpt")
    with pytest.raises(Built) as built:
        lightning_cli(["fit", "-c", str(CONFIG), "--model.init_args.lr", "0.002", "--ckpt_path", str(tmp_path / "last.ckpt")])
    assert built.value.args == (0.002,)


def test_the_whole_config_goes_to_the_loggers_under_its_cli_keys(monkeypatch):
    """Lightning logged only the module's hparams: no policy, engine, tools or reward (not even the
    ``model.reward.search_penalty`` a sweep varies). A secret written into the config is masked."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MMSR_TEST_API_KEY", "sk-test-0123456789abcdef")
    cli = lightning_cli(["-c", "configs/smoke_wandb.yaml", "--model.reward.search_penalty=0.2",
                         "--trainer.default_root_dir", "runs/sk-test-0123456789abcdef"], run=False, parse_only=True)  # fmt: skip
    assert cli.save_config_callback is LoggedConfig
    logged = []
    logger = SimpleNamespace(log_hyperparams=logged.append)
    LoggedConfig(cli.parser, cli.config).save_config(SimpleNamespace(loggers=[logger, logger]), None, "fit")
    assert len(logged) == 2 and logged[0] == logged[1]
    params = logged[0]
    assert (params["model.reward.class_path"], params["model.reward.search_penalty"]) == ("mmsr.reward.MMSearchR1Reward", 0.2)
    assert params["model.policy.class_path"] == "mmsr.models.build.TinyQwen2_5_VL" and params["model.lr"] == 1e-3
    assert {"model.engine.class_path", "model.image_search.top_k", "model.text_search.corpus", "data.train_files"} <= params.keys()
    assert params["trainer.default_root_dir"] == "runs/[redacted MMSR_TEST_API_KEY]"


def test_run_state_is_read_from_files_and_sharded_directories(tmp_path):
    state = {"callbacks": {"RunDirectory": {"loggers": [{"logger": "CSVLogger", "version": 0, "root_dir": None}]}}}
    torch.save(state, tmp_path / "a.ckpt")
    (tmp_path / "sharded.ckpt").mkdir()
    torch.save(state, tmp_path / "sharded.ckpt" / "meta.pt")
    torch.save({"callbacks": {}}, tmp_path / "old.ckpt")
    expected = state["callbacks"]["RunDirectory"]["loggers"]
    assert checkpoint_runs(tmp_path / "a.ckpt") == expected == checkpoint_runs(tmp_path / "sharded.ckpt")
    assert checkpoint_runs(tmp_path / "old.ckpt") is None and checkpoint_runs(tmp_path / "missing.ckpt") is None
    assert RunDirectory().state_key == "RunDirectory"


def scripted(root: Path, steps: int, *extra: str):
    """The scripted run (tests/callbacks/scripted_run.py) with CSV + offline wandb, a checkpoint per
    step kept outside the run directory, and a TrajectoryLogger."""
    import wandb

    from tests.callbacks.scripted_run import run

    callbacks = [
        {"class_path": "mmsr.callbacks.trajectory_logger.TrajectoryLogger", "init_args": {"max_trajectories": 4}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}"}},
    ]  # fmt: skip
    args = ["--trainer.max_steps", str(steps), "--trainer.enable_checkpointing", "true", "--trainer.callbacks", json.dumps(callbacks)]
    try:
        return run(root, *args, *extra, wandb=True)
    finally:
        wandb.finish()  # as at the end of a training process


def test_resume_continues_the_run_directory_and_the_wandb_run(tmp_path, offline_wandb, monkeypatch):
    # wandb stages tables under these: this run's own, apart from the session's scripted run, whose
    # tables test_trajectory_logger counts
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    first = scripted(tmp_path, 2)
    run_id = first.trainer.loggers[1].version
    # Resumed from the first step's checkpoint: step 1 is logged again, and must be there once.
    resumed = scripted(tmp_path, 2, "--ckpt_path", str(tmp_path / "ckpt" / "step=1.ckpt"))
    assert resumed.trainer.loggers[1].version == run_id  # the same wandb run, resumed
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["version_0"]
    run_dir = tmp_path / "csv" / "version_0"
    assert [r["step"] for r in rows(run_dir / "metrics.csv") if r["reward/mean"]] == ["0", "1"]
    assert [r.step for r in read_records(run_dir / "trajectories.jsonl")] == [0] * 4 + [1] * 4
    assert {p.name.rsplit("-", 1)[-1] for p in (tmp_path / "wandb").glob("offline-run-*")} == {run_id}


class Killed(Exception):
    """The test's SIGKILL: raised where a kill would leave the process."""


class KillAfterSave(ModelCheckpoint):
    """Saves like ``ModelCheckpoint``, then dies after writing the checkpoint of optimizer step
    ``kill_at``: before Lightning writes that step's ``metrics.csv`` row (the row follows the
    ``on_train_batch_end`` hooks, and checkpoint callbacks run last among them)."""

    def __init__(self, kill_at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kill_at = kill_at

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.global_step == self.kill_at:
            raise Killed(filepath)


def checkpointed(root: Path, steps: int, checkpoint: str = "lightning.pytorch.callbacks.ModelCheckpoint", *extra: str, **init):
    """The scripted run (CSV logger only) with a checkpoint after every step in ``root/ckpt``."""
    from tests.callbacks.scripted_run import run

    args = {"dirpath": str(root / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}", **init}
    callbacks = [{"class_path": checkpoint, "init_args": args}]
    return run(root, "--trainer.max_steps", str(steps), "--trainer.enable_checkpointing", "true",
               "--trainer.callbacks", json.dumps(callbacks), *extra)  # fmt: skip


CLOCK = ("timing/", "sync/seconds", "rollout/overlap", "rollout/tokens_per_s", "tools/latency_s")


def untimed(row: dict[str, str]) -> dict[str, str]:
    """A metrics row's filled cells, less those read from the clock (they differ between runs); a
    column only later steps log is empty in a row."""
    return {k: v for k, v in row.items() if v and not k.startswith(CLOCK)}


def test_a_kill_between_checkpoint_and_metrics_row_loses_no_row(tmp_path):
    checkpointed(tmp_path / "whole", 2)
    expected = rows(tmp_path / "whole" / "csv" / "version_0" / "metrics.csv")
    with pytest.raises(Killed):  # killed with step 1's checkpoint written and its row not
        checkpointed(tmp_path, 3, f"{__name__}.KillAfterSave", kill_at=2)
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    assert [r["step"] for r in rows(path)] == ["0"]
    checkpointed(tmp_path, 3, "lightning.pytorch.callbacks.ModelCheckpoint", "--ckpt_path", str(tmp_path / "ckpt" / "step=2.ckpt"))
    got = rows(path)
    assert [r["step"] for r in got] == ["0", "1", "2"]  # the lost row is back, once, in order
    assert [untimed(r) for r in got[:2]] == [untimed(r) for r in expected[:2]]  # the killed run's values
    # Resuming again from the same checkpoint (its row now written) does not repeat the row.
    checkpointed(tmp_path, 3, "lightning.pytorch.callbacks.ModelCheckpoint", "--ckpt_path", str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert [r["step"] for r in rows(path)] == ["0", "1", "2"]


def test_with_a_wandb_logger_first_the_runs_own_folder_holds_its_config(monkeypatch, tmp_path):
    """Lightning writes config.yaml to the first logger's save_dir: for wandb every run's, overwritten by each, while
    the run's checkpoints and trajectories are in ``<save_dir>/<project>/<run id>``, where export and report look."""
    from lightning.pytorch.loggers import WandbLogger

    class Offline(WandbLogger):  # no wandb run: the folder a run of this id has
        @property
        def experiment(self):
            return SimpleNamespace(id="run1", config=SimpleNamespace(update=lambda *args, **kwargs: None))

    monkeypatch.chdir(ROOT)
    cli = lightning_cli(["-c", "configs/smoke.yaml", "--model.reward.search_penalty=0.3"], run=False, parse_only=True)
    logger = Offline(project="proj", save_dir=str(tmp_path))
    LoggedConfig(cli.parser, cli.config).save_config(SimpleNamespace(loggers=[logger]), None, "fit")
    saved = yaml.safe_load((tmp_path / "proj" / "run1" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["reward"]["init_args"]["search_penalty"] == 0.3
