"""``mmsr fit`` refuses a missing data file or checkpoint before it builds anything: Lightning looked for
them only after the policy loaded (data), or even after the engine started and FSDP sharded the model
(``--ckpt_path``), minutes into a 7B run."""

import functools
import warnings
from pathlib import Path

import pytest
from jsonargparse import Namespace

from mmsr.cli import lightning_cli
from mmsr.cli_checks import check_inputs_exist
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
    (tmp_path / "sharded.ckpt" / "meta.pt").write_bytes(b"")  # what tells a sharded checkpoint directory
    data = Namespace(train_files=[str(tmp_path / "saved_dataset")], val_files=None)
    for ckpt in (None, str(tmp_path / "sharded.ckpt"), "best", "registry:model:v1", "s3://bucket/last.ckpt"):
        check_inputs_exist(Namespace(data=data, ckpt_path=ckpt))


BUILT = "the policy is built"  # every check before the build passed (jsonargparse wraps what the build raises)


@pytest.fixture
def fit(monkeypatch):
    """``mmsr fit`` on the smoke config with extra flags, stopped where the policy would be built."""

    @functools.wraps(TinyQwen2_5_VL.build)
    def no_policy(self):
        raise RuntimeError(BUILT)

    monkeypatch.setattr(TinyQwen2_5_VL, "build", no_policy)
    monkeypatch.chdir(ROOT)
    return lambda *flags: lightning_cli(["fit", "-c", "configs/smoke.yaml", "--trainer.logger", "false", *flags])


COSINE = ("--model.init_args.lr_schedule", "cosine", "--trainer.max_steps", "4")


REFUSED_STEPS = [
    # 2 prompts x 4 generations: 9 updates a step had 8 episodes to split, refused at the first step
    (("--model.init_args.mini_batches", "9"), r"model.mini_batches=9 .* 2 x 4 = 8 episodes on each rank"),
    # the schedule steps once a training step: lr 0 from step 3 on
    ((*COSINE, "--model.init_args.total_steps", "3"), r"model.total_steps=3 < 4 training steps .* last 1 steps would not"),
    # 4 updates in 2 training steps of 2
    ((*COSINE, "--model.init_args.mini_batches", "2", "--model.init_args.total_steps", "1"),
     r"model.total_steps=1 < 2 training steps \(trainer.max_steps=4 optimizer updates, 2 a step"),
    # a warmup longer than the cosine schedule: refused once the module was built, not by the parse
    ((*COSINE, "--model.init_args.warmup_steps", "6", "--model.init_args.total_steps", "5"),
     r"model.warmup_steps=6 > model.total_steps=5"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), REFUSED_STEPS)
def test_step_settings_that_cannot_train_are_refused_before_the_policy_loads(fit, flags, message):
    with pytest.raises(ValueError, match=message):
        fit(*flags)


@pytest.mark.parametrize(("flags", "message"), REFUSED_STEPS)
def test_a_config_parsed_without_a_subcommand_is_refused_as_fit_refuses_it(fit, flags, message):
    """``mmsr plan`` (parse only: nothing is built) sized, and the demo's GRPO stage (``run=False``) built, a run
    that ``mmsr fit`` refuses."""
    from mmsr.plan.config import parse_run_config

    with pytest.raises(ValueError, match=message):
        parse_run_config(["-c", "configs/smoke.yaml", *flags])
    with pytest.raises(ValueError, match=message):
        lightning_cli(["-c", "configs/smoke.yaml", "--trainer.logger", "false", *flags], run=False)


def test_a_cosine_schedule_longer_than_the_run_is_warned_and_one_as_long_passes(fit):
    with pytest.warns(UserWarning, match=r"model.total_steps=4 > 2 training steps .* model.total_steps: 2 decays"):
        with pytest.raises(ValueError, match=BUILT):  # max_steps counts updates: 4 of them are 2 steps of 2 updates
            fit(*COSINE, "--model.init_args.mini_batches", "2", "--model.init_args.total_steps", "4")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError, match=BUILT):
        warnings.simplefilter("always")
        fit(*COSINE, "--model.init_args.mini_batches", "2", "--model.init_args.total_steps", "2")
    assert not [str(w.message) for w in caught if "model.total_steps=" in str(w.message)]


def test_seed_everything_false_leaves_no_stale_run_seed_for_the_unset_seeds(fit, monkeypatch):
    """The engines' and data's unset seeds are the run's ``seed_everything`` (``PL_GLOBAL_SEED``): with
    ``seed_everything: false`` a value a shell exported, or an earlier run in this process left, must not stand in."""
    import os

    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    with pytest.raises(Exception, match=BUILT):
        fit("--seed_everything", "false")
    assert "PL_GLOBAL_SEED" not in os.environ
    with pytest.raises(Exception, match=BUILT):
        fit("--seed_everything", "3")
    assert os.environ["PL_GLOBAL_SEED"] == "3"
