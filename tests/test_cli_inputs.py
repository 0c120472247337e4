"""``mmsr fit`` refuses a missing data file or checkpoint before it builds anything: Lightning looked for
them only after the policy loaded (data), or even after the engine started and FSDP sharded the model
(``--ckpt_path``), minutes into a 7B run."""

import functools
from pathlib import Path

import pytest
from jsonargparse import Namespace

from mmsr.cli import check_inputs_exist, lightning_cli
from mmsr.models.build import TinyQwen2_5_VL

ROOT = Path(__file__).resolve().parents[1]
DATA = "data/fvqa_dev_20/fvqa_dev.jsonl"


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--data.train_files", f"[{DATA}.typo]", rf"data.train_files\[0\]: data file {DATA}.typo not found"),
    ("--data.val_files", f"[{DATA}, held_out.jsonl]", r"data.val_files\[1\]: data file held_out.jsonl not found"),
    ("--ckpt_path", "runs/nope/last.ckpt", "ckpt_path: checkpoint runs/nope/last.ckpt not found"),
])  # fmt: skip
def test_a_missing_data_file_or_checkpoint_is_refused_before_the_policy_loads(flag, value, message, monkeypatch):
    @functools.wraps(TinyQwen2_5_VL.build)  # its signature: the config's protocol check reads it
    def no_policy(self):
        raise AssertionError("the policy was built before the inputs were checked")

    monkeypatch.setattr(TinyQwen2_5_VL, "build", no_policy)
    monkeypatch.chdir(ROOT)
    with pytest.raises(FileNotFoundError, match=message):
        lightning_cli(["fit", "-c", "configs/smoke.yaml", "--trainer.logger", "false", flag, value])


def test_directories_and_checkpoints_lightning_finds_itself_pass(tmp_path):
    """A saved ``datasets`` directory, a sharded checkpoint's directory, Lightning's names, a registry model
    and a remote path (Lightning checks those itself)."""
    (tmp_path / "saved_dataset").mkdir()
    (tmp_path / "sharded.ckpt").mkdir()
    data = Namespace(train_files=[str(tmp_path / "saved_dataset")], val_files=None)
    for ckpt in (None, str(tmp_path / "sharded.ckpt"), "best", "registry:model:v1", "s3://bucket/last.ckpt"):
        check_inputs_exist(Namespace(data=data, ckpt_path=ckpt))
