"""Held-out evaluation during training: ``data.val_files`` rolled out greedily, one episode per prompt,
in Lightning's validation loop; ``val/`` metrics are means over the episodes of every rank."""

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from mmsr.metrics import held_out_metrics
from mmsr.rollout.engine import GenerationOutput, GenerationRequest, SamplingParams, ScriptedEngine
from tests.callbacks.scripted_run import run
from tests.conftest import ROOT


class RecordingEngine(ScriptedEngine):
    """The scripted engine, keeping each call's sampling temperature."""

    temperatures: list[float] = []

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        self.temperatures = [*self.temperatures, sampling.temperature]
        return super().generate(requests, sampling)


def episode(correct: float, searched: float, source: str, category: str) -> dict:
    return {"metrics": {"reward/accuracy": correct, "rollout/search_ratio/any": searched, "rollout/turns": 1 + 2 * searched},
            "data_source": source, "category": category}  # fmt: skip


def test_held_out_metrics_are_means_over_episodes_and_over_each_group():
    got = held_out_metrics([episode(1, 1, "a", "x"), episode(0, 0, "a", "y"), episode(1, 1, "b", "y"), episode(1, 0, "a", "y")])
    assert got == pytest.approx({
        "val/reward/accuracy": 3 / 4, "val/rollout/search_ratio/any": 2 / 4, "val/rollout/turns": 8 / 4,
        "val/reward/accuracy/data_source/a": 2 / 3, "val/reward/accuracy/data_source/b": 1.0,
        "val/rollout/search_ratio/any/data_source/a": 1 / 3, "val/rollout/search_ratio/any/data_source/b": 1.0,
        "val/reward/accuracy/x": 1.0, "val/reward/accuracy/y": 2 / 3,
        "val/rollout/search_ratio/any/x": 1.0, "val/rollout/search_ratio/any/y": 1 / 3,
        "val/episodes": 4.0,
    })  # fmt: skip
    one_group = held_out_metrics([episode(1, 1, "a", "x"), episode(0, 0, "a", "x")])  # logged too: no holes
    assert one_group["val/reward/accuracy/data_source/a"] == 0.5 and one_group["val/rollout/search_ratio/any/x"] == 0.5


def test_a_run_with_val_files_logs_greedy_held_out_metrics_on_synced_weights(tmp_path):
    """The scripted run's first generation of a prompt searches the image, then the web, then answers
    right: every held-out episode (greedy, one per prompt) does so."""
    engine = {"class_path": "tests.test_validation.RecordingEngine", "init_args": {"script": "tests.callbacks.scripted_run.turn_text"}}
    cli = run(tmp_path, "--data.val_files", "[data/fvqa_dev_20/fvqa_dev.jsonl]", "--trainer.val_check_interval", "1",
              "--trainer.check_val_every_n_epoch", "null", "--trainer.num_sanity_val_steps", "0",
              "--model.init_args.engine", json.dumps(engine))  # fmt: skip
    rows = [r for r in csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").open()) if r.get("val/episodes")]
    assert len(rows) == 2  # after each of the 2 training steps
    for row in rows:
        assert float(row["val/episodes"]) == 20
        for key in ("reward/accuracy", "reward/accuracy/search_free", "reward/accuracy/search_required",
                    "rollout/search_ratio/image", "rollout/search_ratio/text", "reward/format"):  # fmt: skip
            assert float(row[f"val/{key}"]) == 1.0, key
        assert float(row["val/rollout/turns"]) == 3.0
        assert float(row["val/tools/failure_rate"]) == 0.0
    assert cli.model.engine.weight_updates == 4  # synced before each step's rollout and each validation
    assert set(cli.model.engine.temperatures) == {0.0, cli.model.sampling.temperature} and cli.model.sampling.temperature > 0


def test_mmsr_validate_evaluates_the_val_files(tmp_path, monkeypatch):
    """``mmsr validate -c <config>`` (add ``--ckpt_path`` for a checkpoint): the same ``val/`` metrics."""
    from mmsr.cli import lightning_cli
    from tests.callbacks.scripted_run import CONFIG

    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository
    cli = lightning_cli(["validate", "-c", str(CONFIG), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger",
                         "false", "--data.val_files", "[data/fvqa_dev_20/fvqa_dev.jsonl]"])  # fmt: skip
    got = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert got["val/episodes"] == 20 and got["val/reward/accuracy"] == 1.0 and got["val/rollout/turns"] == 3.0


def test_validating_leaves_the_training_episodes_as_they_were(tmp_path, monkeypatch):
    """The HF engine samples each episode from its own stream, numbered by the rollouts before it: held-out
    rollouts must not take numbers, or a run resumed from a checkpoint saved before a validation (Lightning
    saves at the step's end, then validates) would sample other episodes than the run it continues."""
    from mmsr.cli import lightning_cli
    from mmsr.report.records import read_records

    monkeypatch.chdir(ROOT)

    def episodes(root: Path, *extra: str) -> list:
        cli = lightning_cli(["fit", "-c", "configs/smoke.yaml", "--trainer.max_steps", "2", "--trainer.default_root_dir",
                             str(root), "--trainer.logger.init_args.save_dir", str(root), "--trainer.enable_checkpointing",
                             "false", "--trainer.callbacks", json.dumps([{"class_path": "mmsr.callbacks.trajectory_logger.TrajectoryLogger",
                             "init_args": {"max_trajectories": 8}}]), *extra])  # fmt: skip
        return [(r.step, r.sample_id, [t.text for t in r.turns]) for r in read_records(Path(cli.trainer.log_dir) / "trajectories.jsonl")]

    plain = episodes(tmp_path / "plain")
    validated = episodes(tmp_path / "val", "--data.val_files", "[data/fvqa_dev_20/fvqa_dev.jsonl]", "--trainer.val_check_interval",
                         "1", "--trainer.check_val_every_n_epoch", "null", "--trainer.num_sanity_val_steps", "0")  # fmt: skip
    assert {step for step, *_ in plain} == {0, 1} and validated == plain


def test_mmsr_validate_of_a_checkpoint_logs_and_names_the_step_its_fit_did(tmp_path, monkeypatch, capsys):
    """Lightning restores its step counters in fit only: ``mmsr validate --ckpt_path`` logged the checkpoint's
    ``val/`` metrics at step 0 and printed ``validation at step 0``. The checkpoint of step 2 (2 updates a step)
    is validated where the fit validated it: the same ``metrics.csv`` step (1, that step's row) and line."""
    from mmsr.cli import lightning_cli
    from tests.callbacks.scripted_run import CONFIG

    val = ["--data.val_files", "[data/fvqa_dev_20/fvqa_dev.jsonl]", "--model.init_args.mini_batches", "2",
           "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "true"]  # fmt: skip
    bar = {"class_path": "mmsr.callbacks.progress.StageProgressBar", "init_args": {"plain": True, "poll_s": 0}}
    saver = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 2, "save_top_k": -1}}  # fmt: skip
    fit = run(tmp_path / "fit", *val, "--trainer.val_check_interval", "1", "--trainer.check_val_every_n_epoch", "null",
              "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "true",
              "--trainer.callbacks", json.dumps([bar, saver]))  # fmt: skip
    fitted = capsys.readouterr().out.splitlines()
    fit_rows = [r for r in csv.DictReader((Path(fit.trainer.log_dir) / "metrics.csv").open()) if r.get("val/episodes")]
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "val")}}
    monkeypatch.chdir(ROOT)
    cli = lightning_cli(["validate", "-c", str(CONFIG), *val, "--ckpt_path", str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"),
                         "--trainer.logger", json.dumps(logger), "--trainer.callbacks", json.dumps([bar])])  # fmt: skip
    validated = capsys.readouterr().out.splitlines()
    (row,) = list(csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").open()))
    assert [r["step"] for r in fit_rows] == ["0", "1"] and row["step"] == "1"
    assert row["val/reward/mean"] == fit_rows[1]["val/reward/mean"]
    shown = [line.split(" | ")[0] for line in fitted + validated if line.startswith("grpo validation at")]
    assert shown == ["grpo validation at step 1/2", "grpo validation at step 2/2", "grpo validation at step 2/2"]


def test_mmsr_validate_of_a_checkpoint_logs_its_epoch_too():
    """The ``epoch`` column of ``mmsr validate --ckpt_path`` was 0 whatever the checkpoint's epoch (Lightning
    restores it in fit only); it is the epoch the fit logged that step with, as the step is."""
    import lightning as L

    from mmsr.callbacks.run_dir import restore_logged_step

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    loops = {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": 11}}}
    restore_logged_step(trainer, {"epoch": 1, "global_step": 24, "loops": loops})
    assert (trainer.current_epoch, trainer.fit_loop.epoch_loop._batches_that_stepped, trainer.global_step) == (1, 11, 0)


def test_held_out_episodes_log_the_share_of_their_tool_calls_that_failed(tiny_policy, fvqa_samples):
    """A tool that cannot serve the held-out rows (a cache keyed on the training rows) showed only as a lower
    ``val/reward/accuracy``: ``val/tools/failure_rate`` is the failed calls over all calls, absent without any."""
    from mmsr.metrics import episode_metrics
    from tests.rollout.test_loop import ANS, IMG, TXT, FakeTextSearch, make_loop

    samples = fvqa_samples[:2]
    script = {f"{samples[0].id}#0": [IMG, TXT, ANS], f"{samples[1].id}#0": [ANS]}
    loop, _ = make_loop(tiny_policy, script, text=FakeTextSearch(fail=True))
    trajs = loop.run(samples, 1, SamplingParams())
    episodes = [episode_metrics(t, samples, 1.0, {}, loop.settings) for t in trajs]
    assert held_out_metrics(episodes)["val/tools/failure_rate"] == 0.5  # the image search's call went through
    assert "val/tools/failure_rate" not in held_out_metrics(episodes[1:])
