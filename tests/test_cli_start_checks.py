"""``mmsr fit`` refuses, before the policy loads, what failed only later: an ``export_dir`` that is a file (after the
whole run), a ``ckpt_path`` that is a run's folder or another file (once the model was built), several processes
without ``use_distributed_sampler: false`` (once the engine started); and every recipe's checkpoint interval
divides its ``max_steps``."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace

from mmsr.cli_checks import _fewest_devices, check_inputs_exist
from tests.test_cli_inputs import BUILT, fit  # noqa: F401 - the fixture, shared

ROOT = Path(__file__).resolve().parents[1]


def test_an_export_dir_that_is_a_file_is_refused_before_the_policy_loads(fit, tmp_path):
    (tmp_path / "afile").write_text("")
    afile = re.escape(str(tmp_path / "afile"))
    with pytest.raises(FileExistsError, match=rf"^model.export_dir {afile}: exists and is not a directory$"):
        fit("--model.init_args.export_dir", str(tmp_path / "afile"))
    with pytest.raises(FileExistsError, match=rf"^model.export_dir {afile}/hf \({afile} in its path\): exists and"):
        fit("--model.init_args.export_dir", str(tmp_path / "afile" / "hf"))
    (tmp_path / "done").mkdir()
    for fine in ("new/hf", "done"):  # made at the end, or there already
        with pytest.raises(Exception, match=BUILT):
            fit("--model.init_args.export_dir", str(tmp_path / fine))


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A run's version folder: its config and its checkpoints."""
    version = tmp_path / "csv" / "version_0"
    (version / "checkpoints").mkdir(parents=True)
    (version / "config.yaml").write_text("trainer: {}\n")
    torch.save({"global_step": 2}, version / "checkpoints" / "last.ckpt")
    return version


@pytest.mark.parametrize(("given", "kind"), [
    ("", "a directory, not a checkpoint"),
    ("checkpoints", "a directory, not a checkpoint"),
    ("config.yaml", "not a checkpoint"),
])  # fmt: skip
def test_a_ckpt_path_that_is_no_checkpoint_is_refused_before_the_policy_loads(fit, run_folder, given, kind):
    path = run_folder / given if given else run_folder
    shown, last = re.escape(str(path)), re.escape(str(run_folder / "checkpoints" / "last.ckpt"))
    with pytest.raises(ValueError, match=rf"^ckpt_path {shown}: {kind} .*; give the checkpoint, e.g. {last}$"):
        fit("--ckpt_path", str(path))


def test_checkpoint_files_and_sharded_directories_pass(tmp_path):
    """A ``torch.save`` file (zip, or the legacy pickle) and a sharded checkpoint's directory (its ``meta.pt``)."""
    torch.save({"state_dict": {}}, tmp_path / "zip.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    (tmp_path / "sharded.ckpt").mkdir()
    torch.save({}, tmp_path / "sharded.ckpt" / "meta.pt")
    data = Namespace(train_files=[], val_files=None)
    for name in ("zip.ckpt", "legacy.ckpt", "sharded.ckpt"):
        check_inputs_exist(Namespace(data=data, ckpt_path=str(tmp_path / name)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"a directory, not a checkpoint .* e.g. runs/x/csv/version_0/checkpoints/"):
        check_inputs_exist(Namespace(data=data, ckpt_path=str(tmp_path / "empty")))


SAMPLER = r"multi-process training needs `trainer.use_distributed_sampler: false`"


@pytest.mark.parametrize("flags", [
    ("--trainer.devices", "2"),
    ("--trainer.devices", "[0, 1]"),
    ("--trainer.devices", "0,1"),
    ("--trainer.num_nodes", "2"),
    ("--trainer.devices", "auto", "--trainer.num_nodes", "2"),  # at least one device on each of 2 nodes
])  # fmt: skip
def test_several_processes_without_use_distributed_sampler_false_are_refused_before_the_policy_loads(fit, flags):
    with pytest.raises(ValueError, match=rf"^trainer.devices=.* x trainer.num_nodes=\d: {SAMPLER}"):
        fit(*flags)


@pytest.mark.parametrize("flags", [
    ("--trainer.devices", "2", "--trainer.use_distributed_sampler", "false"),
    ("--trainer.devices", "auto"),  # maybe several, maybe one: the data module refuses it once it knows
    ("--trainer.devices", "-1"),
])  # fmt: skip
def test_one_or_an_unknown_number_of_processes_pass(fit, flags):
    with pytest.raises(Exception, match=BUILT):
        fit(*flags)


def test_the_fewest_devices_lightning_runs_on_a_node():
    given = {2: 2, 1: 1, -1: 1, 0: 1, "auto": 1, "2": 2, "-1": 1, "0,1": 2, "1,": 1, "0, 1, 2": 3, (0, 1): 2, "gpu": 1}
    assert {k: _fewest_devices(list(k) if isinstance(k, tuple) else k) for k in given} == given


def test_every_recipe_checkpoints_its_last_step():
    """A checkpoint interval that divides ``max_steps`` saves the last step as an interval's checkpoint (the
    1x8 recipes ran 100 steps saving every 40: their last.ckpt was step 80 until ``FinalCheckpoint``)."""
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        for callback in trainer.get("callbacks") or []:
            every = (callback.get("init_args") or {}).get("every_n_train_steps")
            if callback["class_path"].endswith("ModelCheckpoint") and every and trainer.get("max_steps"):
                assert trainer["max_steps"] % every == 0, f"{path.relative_to(ROOT)}: every_n_train_steps {every}"


def _wandb_logged(tmp_path, **init_args) -> str:
    snippet = tmp_path / "wandb.yaml"
    entry = {"class_path": "lightning.pytorch.loggers.WandbLogger",
             "init_args": {"project": "mmsr-tests", "save_dir": str(tmp_path), **init_args}}  # fmt: skip
    snippet.write_text(yaml.safe_dump({"trainer": {"logger": [entry]}}))
    return str(snippet)


NO_KEY = "No API key configured. Use `wandb login` to log in."


def test_online_wandb_without_a_key_is_refused_before_the_policy_loads(fit, tmp_path, monkeypatch):
    """wandb's ``No API key configured`` came once the module was built: after a 7B policy had loaded. (wandb's own
    answer without a key is checked in a fresh process below: this process's wandb may be set up by other tests.)"""
    import wandb

    def no_key(**_):
        raise wandb.errors.UsageError(NO_KEY)

    for name in ("WANDB_MODE", "WANDB_DISABLED", "RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(wandb, "login", no_key)
    with pytest.raises(ValueError, match=r"^trainer.logger WandbLogger: No API key configured.* WANDB_MODE=offline"):
        fit("-c", _wandb_logged(tmp_path))
    for offline in ({"offline": True}, {"mode": "offline"}):
        with pytest.raises(Exception, match=BUILT):
            fit("-c", _wandb_logged(tmp_path, **offline))
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank that logs nothing
    with pytest.raises(Exception, match=BUILT):
        fit("-c", _wandb_logged(tmp_path))
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(Exception, match=BUILT):
        fit("-c", _wandb_logged(tmp_path))


def test_wandb_login_without_a_key_raises_the_usage_error_the_check_reads(tmp_path):
    """The check relies on ``wandb.login(verify=False)`` raising ``UsageError`` without a key and a terminal."""
    code = ("import wandb\ntry:\n    wandb.login(verify=False)\nexcept wandb.errors.UsageError as e:\n    print('usage:', e)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.stdout.strip() == f"usage: {NO_KEY}", proc.stdout + proc.stderr[-2000:]
