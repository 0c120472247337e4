"""TrajectoryLogger on a real (scripted) run: the run directory's JSONL, and the per-turn wandb table."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from mmsr.callbacks.trajectory_logger import TrajectoryLogger
from mmsr.callbacks.wandb_table import COLUMNS
from mmsr.report.records import data_uri_to_image, read_records


def run_dir(cli) -> Path:
    return Path(cli.trainer.log_dir)


def test_run_directory_holds_config_metrics_and_trajectories(scripted_run):
    d = run_dir(scripted_run)
    config = yaml.safe_load((d / "config.yaml").read_text())
    assert config["model"]["init_args"]["engine"]["class_path"] == "mmsr.rollout.engine.ScriptedEngine"
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == ["mmsr.callbacks.trajectory_logger.TrajectoryLogger"]
    header = (d / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"reward/mean", "rollout/search_ratio/image", "train/loss"} <= set(header)
    records = list(read_records(d / "trajectories.jsonl"))
    # 2 steps x max_trajectories=4 (of 2 prompts x 2 generations each), in rollout order.
    assert [(r.step, r.index, r.group_id) for r in records] == [(s, i, i // 2) for s in (0, 1) for i in range(4)]
    assert [r.global_step for r in records] == [1] * 4 + [2] * 4


def test_metrics_columns_carry_their_stage_prefix(scripted_run):
    """The progress bar's ``reward`` (``reward/mean`` again) was logged as an unprefixed column beside it."""
    header = (run_dir(scripted_run) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {c for c in header if "/" not in c} == {"epoch", "step"}, header


def test_records_hold_turns_tools_spans_and_scores(scripted_run):
    records = list(read_records(run_dir(scripted_run) / "trajectories.jsonl"))
    for r in records:
        assert data_uri_to_image(r.image).size[0] <= 128 and r.question and r.answers
        assert r.sampled_tokens == sum(t.span[1] - t.span[0] for t in r.turns)
        assert all(a.span[1] <= b.span[0] for a, b in zip(r.turns, r.turns[1:])) and r.turns[-1].span[1] == r.length
        if r.index % 2:  # odd generations answer wrong at once
            assert [t.action for t in r.turns] == ["answer"] and r.correct is False and r.reward < 0.5
            continue
        assert [t.action for t in r.turns] == ["image_search", "text_search", "answer"]
        assert r.correct is True and r.answer == r.answers[0] and r.reward > 0.5
        image, text = r.turns[0].tool, r.turns[1].tool
        assert image.kind == "image_search" and image.ok and len(image.titles) == 2 == len(image.images)
        assert all(data_uri_to_image(u).size[0] > 0 for u in image.images) and image.latency_s > 0
        assert text.kind == "text_search" and text.query == f"who is in {r.sample_id}" == r.turns[1].argument
        assert text.ok and text.titles and not text.images
    # The group's advantages are centred: the right answer gets the positive one.
    for a, b in zip(records[::2], records[1::2]):
        assert a.advantage > 0 > b.advantage and abs(a.advantage + b.advantage) < 1e-5


def staged_tables(wandb_home: Path) -> list[dict]:
    """The full tables wandb staged for upload (its run-file previews replace images by a name).
    Staging may hold a table twice (run file and artifact entry), so they are deduplicated."""
    tables = {}
    for f in (wandb_home / "wandb_data_dir").rglob("*"):
        if f.is_file() and f.read_bytes()[:1] == b"{":
            obj = json.loads(f.read_text())
            if obj.get("_type") == "table" and obj.get("columns") == COLUMNS:
                tables[json.dumps(obj["data"])] = obj
    return list(tables.values())


def test_wandb_table_has_one_row_per_turn_with_images(scripted_run, offline_wandb):
    records = list(read_records(run_dir(scripted_run) / "trajectories.jsonl"))
    (previews,) = [p for p in Path(scripted_run.trainer.default_root_dir).glob("wandb/offline-run-*/files/media/table/rollout")]
    assert len(list(previews.glob("trajectories_*.table.json"))) == 2  # one table per logged step
    tables = staged_tables(offline_wandb)
    assert sorted(len(t["data"]) for t in tables) == sorted(sum(len(r.turns) for r in records if r.step == s) for s in (0, 1))
    col = {name: i for i, name in enumerate(COLUMNS)}
    rows = [row for t in tables for row in t["data"]]
    by_action = {}
    for row in rows:
        by_action.setdefault(row[col["action"]], []).append(row)
        assert row[col["image"]]["_type"] == "image-file"  # the question image on every turn
    for row in by_action["image_search"]:
        assert row[col["thumbnails"]]["_type"] == "image-file" and " | " in row[col["titles"]]
        assert json.loads(row[col["tool_args"]]) == {"image": "question image"} and row[col["tool_latency_s"]] > 0
    for row in by_action["text_search"]:
        assert json.loads(row[col["tool_args"]]) == {"query": f"who is in {row[col['sample_id']]}"}
    assert {row[col["correct"]] for row in by_action["answer"]} == {True, False}
    assert all(row[col["loss_mask_span"]].startswith("[") for row in rows)


def test_every_n_steps_counts_training_steps_and_survives_a_resume(scripted_run, tmp_path, monkeypatch):
    # Replay the run's last rollout through the hook with a trainer that has no wandb logger: the
    # callback must not need wandb then (CSV / TensorBoard runs work without it).
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now fails
    logger = CSVLogger(tmp_path)  # the callback writes to the first logger's directory, as trainer.log_dir does
    # the step is Lightning's count of batches that stepped, which a resumed fit restores from its checkpoint
    loop = SimpleNamespace(_batches_that_stepped=0)
    trainer = SimpleNamespace(loggers=[logger], default_root_dir=str(tmp_path), global_step=7, is_global_zero=True,
                              fit_loop=SimpleNamespace(epoch_loop=loop))  # fmt: skip
    out = Path(logger.log_dir)
    module = scripted_run.model
    cb = TrajectoryLogger(every_n_steps=2, max_trajectories=1, filename="t.jsonl")
    for step in range(3):
        loop._batches_that_stepped = step
        cb.on_train_batch_end(trainer, module, None, None, step)
    assert [(r.step, r.global_step, r.sample_id) for r in read_records(out / "t.jsonl")] == [
        (s, 7, module.last_rollout.trajectories[0].sample_id) for s in (0, 2)
    ]
    resumed = TrajectoryLogger(every_n_steps=2, max_trajectories=1, filename="t.jsonl")
    for step in (3, 4):  # 3 steps done: the next one (3) is skipped, 4 is logged
        loop._batches_that_stepped = step
        resumed.on_train_batch_end(trainer, module, None, None, step - 3)
    assert [r.step for r in read_records(out / "t.jsonl")] == [0, 2, 4]


def test_wandb_run_gets_the_stage_prefixed_scalars(scripted_run):
    (run_file,) = Path(scripted_run.trainer.default_root_dir).glob("wandb/offline-run-*/run-*.wandb")
    data = run_file.read_bytes()  # protobuf records: metric names are stored as plain strings
    for key in ("reward/mean", "reward/accuracy", "rollout/search_ratio/image", "tools/latency_s", "train/loss", "timing/rollout"):
        assert key.encode() in data, key


def test_a_fast_dev_run_writes_its_trajectories_into_the_root_directory(tmp_path):
    """``trainer.fast_dev_run`` swaps the loggers for one without a directory: the callback crashed at
    the first step on ``Path(None)``; with no logger directory it writes where ``logger: false`` does."""
    from tests.callbacks.scripted_run import run

    run(tmp_path, "--trainer.fast_dev_run", "true")
    assert {r.step for r in read_records(tmp_path / "trajectories.jsonl")} == {0}


class StepsOfWandb(WandbLogger):
    """A WandbLogger keeping the ``trainer/global_step`` of each call instead of sending it."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir=save_dir, offline=True)
        self.calls: list[tuple[str, int]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append(("table" if "rollout/trajectories" in metrics else "scalars", step))

    def log_hyperparams(self, params) -> None:
        pass


class TwoUpdatesAStep(L.LightningModule):
    """Two optimizer updates per training step (``mini_batches: 2``), one scalar logged, the scripted run's rollout."""

    def __init__(self, rollout) -> None:
        super().__init__()
        self.automatic_optimization, self.last_rollout, self.layer = False, rollout, torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        for _ in range(2):
            self.optimizers().step()
        self.log("reward/mean", 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_the_wandb_table_sits_at_the_step_of_its_scalars(scripted_run, tmp_path):
    """Lightning logs a step's scalars at the training steps done before it; the table went to ``global_step``
    (optimizer updates, already counting this step's): step 1's table sat at 4, its curves at 1."""
    logger = StepsOfWandb(str(tmp_path))
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TrajectoryLogger(max_trajectories=1)])  # fmt: skip
    trainer.fit(TwoUpdatesAStep(scripted_run.model.last_rollout), torch.utils.data.DataLoader(torch.zeros(3, 1)))
    tables, scalars = ([s for kind, s in logger.calls if kind == k] for k in ("table", "scalars"))
    assert tables == scalars == [0, 1, 2]


def test_wandb_runs_of_one_save_dir_keep_their_trajectories_apart(scripted_run, offline_wandb, tmp_path, monkeypatch):
    """Under a first ``WandbLogger`` every run of a ``save_dir`` appended to ``<save_dir>/trajectories.jsonl``, and a
    run resumed at step 1 dropped the other runs' records of steps 1 and later. Each run has its folder now."""
    import wandb

    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR"):  # its tables apart from the session's
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    loop = SimpleNamespace(_batches_that_stepped=0)
    files = []
    for steps, resumed in ((range(3), False), (range(1, 2), True)):  # the second run resumes at step 1
        logger = WandbLogger(project="p", save_dir=str(tmp_path))
        trainer = SimpleNamespace(loggers=[logger], default_root_dir=str(tmp_path), global_step=0, is_global_zero=True,
                                  fit_loop=SimpleNamespace(epoch_loop=loop), state=SimpleNamespace(fn="fit"))  # fmt: skip
        cb = TrajectoryLogger(max_trajectories=1)
        if resumed:
            cb.on_load_checkpoint(trainer, scripted_run.model, {})
        try:
            for step in steps:
                loop._batches_that_stepped = step
                cb.on_train_batch_start(trainer, scripted_run.model, None, step)
                cb.on_train_batch_end(trainer, scripted_run.model, None, None, step)
            files.append(tmp_path / "p" / logger.version / "trajectories.jsonl")
        finally:
            wandb.finish()
    assert [[r.step for r in read_records(f)] for f in files] == [[0, 1, 2], [1]]
    assert not (tmp_path / "trajectories.jsonl").exists()
