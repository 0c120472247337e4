"""StageProgressBar: the bar's postfix shows, during the step, the stage, tokens/s and tool calls in flight."""

import asyncio
import re
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import lightning as L
import pytest
import torch

import mmsr.callbacks.progress as progress
from mmsr.callbacks.progress import StageProgressBar, StepStatus, step_status
from mmsr.data.datamodule import MMSRDataModule
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.module import GRPOModule
from mmsr.rollout.engine import ScriptedEngine
from mmsr.rollout.stats import RolloutStats
from mmsr.tools.local import LocalImageSearch, LocalTextSearch
from tests.callbacks.scripted_run import turn_text
from tests.conftest import FVQA


class SlowTextSearch(LocalTextSearch):
    """The real local text search, slowed down like a web API so the calls are seen in flight. A step's two
    searchers overlap however slowly the machine generates: each call waits (5 s at most) for the other to start,
    then both take 0.4 s (a fixed 0.4 s missed the overlap on a loaded machine)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started = 0

    async def __call__(self, request):
        self.started += 1
        for _ in range(250):
            if self.started % 2 == 0:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.4)
        return await super().__call__(request)


def scripted_module(**kwargs) -> GRPOModule:
    texts = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
    return GRPOModule(
        policy=TinyQwen2_5_VL(tokenizer_texts=texts, scaffold=Scaffold(), vocab_size=512, hidden_size=64, num_layers=2, seed=0),
        engine=ScriptedEngine(turn_text),
        image_search=LocalImageSearch(index=str(FVQA / "search" / "image_index.jsonl"), top_k=2),
        text_search=SlowTextSearch(corpus=str(FVQA / "search" / "corpus.jsonl"), top_k=2),
        num_generations=2,
        kl_coef=0.0,
        **kwargs,
    )


@pytest.fixture(scope="module")
def module() -> GRPOModule:
    return scripted_module()


def test_status_reads_stage_tokens_per_second_and_calls_in_flight(module, monkeypatch):
    stats = RolloutStats(generate_s=2.0, sampled_tokens=300, tool_latency_s=[0.1])
    stats.tool_calls.update(image_search=2, text_search=1)  # 3 started, 1 finished
    monkeypatch.setattr(module.loop, "stats", stats)
    monkeypatch.setattr(module, "stage", "rollout", raising=False)
    assert step_status(module) == StepStatus("tools", 150.0, 2)
    module.stage = "train"
    assert step_status(module).stage == "train"
    stats.tool_latency_s += [0.2, 0.3]
    module.stage = "rollout"
    assert step_status(module) == StepStatus("rollout", 150.0, 0)
    module.stage = None
    assert step_status(module).postfix() == {"stage": "idle", "tok/s": "150", "tools": "0"}


def test_bar_shows_live_stages_during_a_step(module, capfd, tmp_path, monkeypatch):
    # Each stage waits (5 s at most) until the bar's watcher has read it once: a stage shorter than the poll
    # (a warm scripted rollout) was missed by it now and then, and the test failed on a loaded machine.
    polled, real_status, real_timed = defaultdict(threading.Event), progress.step_status, module.timed
    monkeypatch.setattr(progress, "step_status", lambda *a: (s := real_status(*a), polled[s.stage].set())[0])

    @contextmanager
    def timed(stage):
        with real_timed(stage):
            polled[stage].clear()
            polled[stage].wait(5)
            yield

    monkeypatch.setattr(module, "timed", timed)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[StageProgressBar(poll_s=0.02, plain=False)],
    )  # fmt: skip
    trainer.fit(module, datamodule=MMSRDataModule(train_files=[str(FVQA / "fvqa_dev.jsonl")], prompts_per_step=2))
    out = capfd.readouterr()
    postfixes = re.findall(r"stage=(\w+), tok/s=(\d+), tools=(\d+)", out.out + out.err)
    stages = {s for s, _, _ in postfixes}
    assert {"rollout", "tools", "train"} <= stages, stages
    # Episodes advance independently, so a poll may fall between one episode's call starting and the
    # other's: 1 or 2 calls in flight, both at some point; a call starts only after a timed generation.
    in_flight = {(int(tps) > 0, n) for s, tps, n in postfixes if s == "tools"}
    assert (True, "2") in in_flight and in_flight <= {(True, "1"), (True, "2")}, in_flight


def fit(module, tmp_path, bar, steps=2):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[bar])  # fmt: skip
    trainer.fit(module, datamodule=MMSRDataModule(train_files=[str(FVQA / "fvqa_dev.jsonl")], prompts_per_step=2))
    return trainer


def test_plain_lines_when_stdout_is_not_a_terminal(module, capsys, tmp_path):
    bar = StageProgressBar(poll_s=0)
    assert bar.plain  # pytest captures stdout: not a terminal
    bar.plain_every_s = bar._lines.every_s = 0.0
    fit(module, tmp_path, bar)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("grpo step")]
    assert "Training" not in out  # no bar drawn
    assert [line.split(" | ")[0] for line in lines] == ["grpo step 1/2", "grpo step 2/2"]
    # a step done, the rate and so the ETA are known on every line: the last one has none left
    etas = [re.search(r"steps/s \| ETA (\d+h\d\dm|\d+m\d\ds) \| reward [\d.]+$", line) for line in lines]
    assert all(etas) and etas[-1][1] == "0m00s", lines


def test_lines_count_training_steps_when_a_step_makes_several_updates(capsys, tmp_path):
    """``max_steps`` counts optimizer updates (2 a step here): 4 updates are 2 training steps."""
    bar = StageProgressBar(poll_s=0)
    bar.plain_every_s = bar._lines.every_s = 0.0
    trainer = fit(scripted_module(mini_batches=2), tmp_path, bar, steps=4)
    lines = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("grpo step")]
    assert trainer.global_step == 4 and lines == ["grpo step 1/2", "grpo step 2/2"]


def test_bar_counts_training_steps_when_a_step_makes_several_updates(tmp_path):
    """The bar's total is the run's training steps too: 4 updates at 2 a step are 2 steps, not 4."""
    bar = StageProgressBar(poll_s=0, plain=False)
    trainer = fit(scripted_module(mini_batches=2), tmp_path, bar, steps=4)
    tqdm = bar.train_progress_bar
    assert trainer.global_step == 4 and (tqdm.n, tqdm.total) == (2, 2)


def test_bar_counts_steps_of_the_run_under_its_name(module, tmp_path):
    bar = StageProgressBar(poll_s=0, plain=False, name="warm start")
    fit(module, tmp_path, bar, steps=3)
    tqdm = bar.train_progress_bar
    assert tqdm.desc.startswith("warm start") and (tqdm.n, tqdm.total) == (3, 3)  # not "Epoch 0", n of -1



class LinearModule(L.LightningModule):
    """One linear layer on random data: a fit with validation in about a second."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val/loss", self.layer(batch).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)

    val_dataloader = train_dataloader


def test_plain_mode_draws_no_validation_bar_and_prints_a_line_per_validation(capsys, tmp_path):
    """Sanity check and validation write no tqdm bar into the log (redraws, cursor-up escapes), only
    one plain line when a validation ends."""
    bar = StageProgressBar(poll_s=0)
    bar.plain_every_s = bar._lines.every_s = 0.0
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[bar], limit_val_batches=2,
                        val_check_interval=1, check_val_every_n_epoch=None)  # fmt: skip
    trainer.fit(LinearModule())
    out = capsys.readouterr().out
    assert "Sanity Checking" not in out and "Validation" not in out and "\x1b[" not in out, out
    lines = [line.split(" | ")[0] for line in out.splitlines() if line.strip()]
    steps = ["linear step 1/2", "linear step 2/2"]
    assert lines == [steps[0], "linear validation at step 1/2", steps[1], "linear validation at step 2/2"]


class SlowValidation(LinearModule):
    """A validation long enough for the watcher to report on it."""

    def validation_step(self, batch, batch_idx) -> None:
        time.sleep(0.3)
        super().validation_step(batch, batch_idx)


def test_the_watcher_names_validation_while_a_validation_runs(capsys, tmp_path):
    """A validation between the steps of a fit is no training step: the watcher's lines during it said
    ``(in the step)``. From the first line that names the validation to the line that ends it, every line does."""
    bar = StageProgressBar(poll_s=0.05, name="linear")
    bar.plain_every_s = bar._lines.every_s = 0.0
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[bar], limit_val_batches=1,
                        val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(SlowValidation())
    lines = capsys.readouterr().out.splitlines()
    ended = next(i for i, line in enumerate(lines) if line.startswith("linear validation at step 1/1"))
    watched = [line.rsplit(" (", 1)[1] for line in lines[:ended] if line.endswith(")")]
    assert "in validation)" in watched, lines  # 0.3 s of validation, a line every 0.05 s
    assert set(watched[watched.index("in validation)") :]) == {"in validation)"}, lines
