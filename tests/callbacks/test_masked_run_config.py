"""A secret that reaches a run's config (typed in, or ``${oc.env:...}`` resolved) is masked in everything the run
keeps: its config.yaml, the loggers' hyperparameters (CSV hparams.yaml, the wandb run), the checkpoints' and the
report; the module still runs with the real value. Only the config the loggers got was masked before."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from mmsr.report.cli import write_report

KEY = "sk-test-0123456789abcdef"
MASK = "[redacted MMSR_TEST_API_KEY]"


def files_with(root: Path, text: str, skip: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and skip not in p.parents and text.encode() in p.read_bytes()]


def test_a_secret_in_the_config_is_masked_in_all_the_run_keeps(tmp_path, offline_wandb, monkeypatch):
    import wandb

    from tests.callbacks.scripted_run import run

    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR"):  # this run's own tables
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("MMSR_TEST_API_KEY", KEY)
    export = tmp_path / f"export_{KEY}"  # a module hyperparameter (GRPOModule's export_dir) holding the key
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1}}  # fmt: skip
    try:
        cli = run(tmp_path, "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "true",
                  "--trainer.callbacks", json.dumps([ckpt]), "--model.init_args.export_dir", str(export), wandb=True)
    finally:
        wandb.finish()
    assert cli.model.hparams.export_dir == str(export) and export.is_dir()  # the run used the real value
    run_dir = tmp_path / "csv" / "version_0"
    write_report(run_dir)
    assert files_with(tmp_path, KEY[8:], skip=export) == []  # nor a partial copy of it
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_args"]["export_dir"].endswith(f"export_{MASK}")
    assert yaml.safe_load((run_dir / "hparams.yaml").read_text())["export_dir"].endswith(f"export_{MASK}")
    (saved,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert torch.load(saved, weights_only=False)["hyper_parameters"]["export_dir"].endswith(f"export_{MASK}")
    (wandb_run,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # the config as synced: the mask, no key
    assert wandb_run.read_bytes().count(MASK.encode()) == 2  # model.export_dir (LoggedConfig), export_dir (hparams)


def test_the_report_masks_the_config_of_a_run_saved_before(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSR_TEST_API_KEY", KEY)
    (tmp_path / "trajectories.jsonl").write_text("")
    (tmp_path / "config.yaml").write_text(f"trainer:\n  default_root_dir: {KEY}\nmodel:\n  class_path: GRPOModule\n")
    page = write_report(tmp_path).read_text()
    assert KEY not in page and KEY[8:] not in page and "[redacted MMSR_TEST_API_KEY]" in page


def test_a_weights_only_checkpoint_masks_its_hyperparameters_too(tmp_path, monkeypatch):
    """Lightning writes the hyperparameters into every checkpoint but runs callbacks' ``on_save_checkpoint`` only
    for full ones: with ``save_weights_only`` the key stayed in ``hyper_parameters`` (the module's hook masks it)."""
    from tests.callbacks.scripted_run import run

    monkeypatch.setenv("MMSR_TEST_API_KEY", KEY)
    export = tmp_path / f"export_{KEY}"
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1, "save_weights_only": True}}
    run(tmp_path, "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "true",
        "--trainer.callbacks", json.dumps([ckpt]), "--model.init_args.export_dir", str(export))
    (saved,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert torch.load(saved, weights_only=False)["hyper_parameters"]["export_dir"] == str(tmp_path / f"export_{MASK}")
