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


def test_readme_names_every_metric_prefix_of_the_run_directory(scripted_run):
    """README's "Seeing what the policy does" listed the stage prefixes of ``metrics.csv`` without ``sync/`` and
    ``memory/``; the weight sync's metrics (``mmsr.sync.WeightSync.metrics``) are each named there too."""
    import re

    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Seeing what the policy does", 1)[1].split("\n## ", 1)[0]
    header = (run_dir(scripted_run) / "metrics.csv").read_text().splitlines()[0].split(",")
    prefixes = {c.split("/")[0] for c in header if "/" in c}
    assert {"sync", "memory", "reward"} <= prefixes and [p for p in prefixes if f"`{p}/`" not in section] == []
    sync_keys = re.findall(r'"sync/(\w+)"', (ROOT / "mmsr" / "sync" / "__init__.py").read_text())
    assert {"probe_diff", "sampling_diff"} <= set(sync_keys) and [k for k in sync_keys if f"`{k}`" not in section] == []


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
                              log_every_n_steps=1, should_stop=False, fast_dev_run=False,
                              fit_loop=SimpleNamespace(epoch_loop=loop))  # fmt: skip
    out = Path(logger.log_dir)
    module = scripted_run.model
    cb = TrajectoryLogger(every_n_steps=2, max_trajectories=1, filename="t.jsonl")
    for step in range(3):  # step 0 (its scalars are logged: log_every_n_steps 1), then Lightning's phase: 1, 3, ...
        loop._batches_that_stepped = step
        cb.on_train_batch_end(trainer, module, None, None, step)
    assert [(r.step, r.global_step, r.sample_id) for r in read_records(out / "t.jsonl")] == [
        (s, 7, module.last_rollout.trajectories[0].sample_id) for s in (0, 1)
    ]
    resumed = TrajectoryLogger(every_n_steps=2, max_trajectories=1, filename="t.jsonl")
    for step in (3, 4, 5):  # 3 steps done: the resumed run's first step (3) is logged, not its second
        loop._batches_that_stepped = step
        resumed.on_train_batch_end(trainer, module, None, None, step - 3)
    assert [r.step for r in read_records(out / "t.jsonl")] == [0, 1, 3, 5]


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
    """Two optimizer updates per training step (``mini_batches: 2``), one scalar logged, the scripted run's rollout;
    the run is stopped at training step ``stop_at`` (``trainer.should_stop``, as early stopping does)."""

    def __init__(self, rollout, stop_at: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization, self.last_rollout, self.layer = False, rollout, torch.nn.Linear(1, 1)
        self.stop_at = stop_at

    def training_step(self, batch, batch_idx):
        for _ in range(2):
            self.optimizers().step()
        self.log("reward/mean", 1.0)
        if batch_idx == self.stop_at:
            self.trainer.should_stop = True

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_the_wandb_table_sits_at_the_step_of_its_scalars(scripted_run, tmp_path):
    """Lightning logs a step's scalars at the training steps done before it; the table went to ``global_step``
    (optimizer updates, already counting this step's): step 1's table sat at 4, its curves at 1."""
    import wandb

    logger = StepsOfWandb(str(tmp_path))
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TrajectoryLogger(max_trajectories=1)])  # fmt: skip
    try:  # the callback opens the offline run (its folder holds the trajectories)
        trainer.fit(TwoUpdatesAStep(scripted_run.model.last_rollout), torch.utils.data.DataLoader(torch.zeros(3, 1)))
    finally:
        wandb.finish()
    tables, scalars = ([s for kind, s in logger.calls if kind == k] for k in ("table", "scalars"))
    assert tables == scalars == [0, 1, 2]


def test_every_n_steps_tables_sit_at_steps_lightning_logs_scalars_at(scripted_run, tmp_path):
    """Lightning logs scalars every ``log_every_n_steps: N`` on steps N-1, 2N-1, ... and on the step a run is stopped
    at; ``every_n_steps: N`` put the tables on 0, N, 2N: in wandb no table was ever beside its reward and accuracy."""
    import wandb

    logger = StepsOfWandb(str(tmp_path))
    trainer = L.Trainer(max_steps=99, accelerator="cpu", logger=logger, log_every_n_steps=4, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TrajectoryLogger(every_n_steps=4, max_trajectories=1)])  # fmt: skip
    module = TwoUpdatesAStep(scripted_run.model.last_rollout, stop_at=9)
    try:
        trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(20, 1)))
    finally:
        wandb.finish()
    tables, scalars = ([s for kind, s in logger.calls if kind == k] for k in ("table", "scalars"))
    assert set(tables) <= set(scalars) and scalars == [3, 7, 9]  # no step 0: Lightning logs no scalars there
    assert tables == [3, 7, 9]


class StopsAfter(L.Callback):
    """Stops the run in ``on_train_batch_end`` at training step ``step``, after the callbacks before it, as Lightning's
    ``Timer`` (``max_time``), appended after the user's callbacks, does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.step:
            trainer.should_stop = True


def test_the_step_a_later_callback_stops_the_run_at_has_its_table(scripted_run, tmp_path):
    """Lightning logs the scalars of the step a run stops at; a stop set by a callback after this one (``max_time``)
    came after ``due`` looked, and that step's trajectories were never logged."""
    import wandb

    logger = StepsOfWandb(str(tmp_path))
    trainer = L.Trainer(max_steps=99, accelerator="cpu", logger=logger, log_every_n_steps=4, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TrajectoryLogger(every_n_steps=4, max_trajectories=1), StopsAfter(5)])  # fmt: skip
    try:
        trainer.fit(TwoUpdatesAStep(scripted_run.model.last_rollout), torch.utils.data.DataLoader(torch.zeros(20, 1)))
    finally:
        wandb.finish()
    tables, scalars = ([s for kind, s in logger.calls if kind == k] for k in ("table", "scalars"))
    assert scalars == [3, 5] and tables == [3, 5]


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


def test_a_csv_logger_after_a_first_wandb_logger_gets_the_whole_run(offline_wandb, tmp_path, monkeypatch):
    """With a ``WandbLogger`` first, ``trajectories.jsonl`` and ``config.yaml`` went to the wandb run's folder only and
    ``metrics.csv`` is in the CSV logger's: ``mmsr report`` of either had no trajectories or no curves."""
    import wandb

    from mmsr.report.cli import write_report
    from tests.callbacks.scripted_run import run
    from tests.report.browser import Page

    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR"):  # its tables apart from the session's
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    wandb_args = {"save_dir": str(tmp_path), "offline": True, "project": "p"}
    csv_args = {"save_dir": str(tmp_path), "name": "csv"}
    loggers = [{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": wandb_args},
               {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": csv_args}]  # fmt: skip
    try:
        cli = run(tmp_path, "--trainer.logger", json.dumps(loggers), "--trainer.max_steps", "1")
    finally:
        wandb.finish()
    wandb_dir, csv_dir = tmp_path / "p" / cli.trainer.loggers[0].version, Path(cli.trainer.loggers[1].log_dir)
    assert csv_dir == tmp_path / "csv" / "version_0"
    for name in ("config.yaml", "trajectories.jsonl"):  # the wandb run's folder keeps its own
        assert (csv_dir / name).read_text() == (wandb_dir / name).read_text(), name
    assert yaml.safe_load((csv_dir / "config.yaml").read_text())["trainer"]["max_steps"] == 1
    records = list(read_records(csv_dir / "trajectories.jsonl"))
    assert [r.step for r in records] == [0] * 4
    page = Page(write_report(csv_dir).read_text())
    assert [a["id"] for a in page.trajectories] == [f"step0-traj{r.index}" for r in records]
    assert (csv_dir / "report" / "reward.png").is_file() and "No metrics.csv" not in "".join(page.text)


def test_a_resume_cuts_back_each_copy_of_the_trajectories(scripted_run, tmp_path):
    """Every copy (the first logger's, a later CSV logger's) loses the killed run's records of the resumed steps."""
    loggers = [CSVLogger(tmp_path, name="first"), CSVLogger(tmp_path, name="later")]
    loop = SimpleNamespace(_batches_that_stepped=0)
    trainer = SimpleNamespace(loggers=loggers, default_root_dir=str(tmp_path), global_step=0, is_global_zero=True,
                              log_every_n_steps=1, should_stop=False, fast_dev_run=False,
                              fit_loop=SimpleNamespace(epoch_loop=loop), state=SimpleNamespace(fn="fit"))  # fmt: skip
    for steps, resumed in ((range(3), False), (range(1, 2), True)):  # the second run resumes at step 1
        cb = TrajectoryLogger(max_trajectories=1)
        if resumed:
            cb.on_load_checkpoint(trainer, scripted_run.model, {})
        for step in steps:
            loop._batches_that_stepped = step
            cb.on_train_batch_start(trainer, scripted_run.model, None, step)
            cb.on_train_batch_end(trainer, scripted_run.model, None, None, step)
    files = [Path(logger.log_dir) / "trajectories.jsonl" for logger in loggers]
    assert [[r.step for r in read_records(f)] for f in files] == [[0, 1], [0, 1]]
