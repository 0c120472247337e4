"""StageProgressBar during a validation: the stage reads ``val rollout`` / ``val tools`` / ``val reward`` while the
held-out episodes roll out and are scored (it read ``idle``, or nothing at all under ``mmsr validate``)."""

import asyncio
from types import SimpleNamespace

import lightning as L
import pytest

from mmsr.callbacks.progress import StageProgressBar, step_status
from mmsr.data.datamodule import MMSRDataModule
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.module import GRPOModule
from mmsr.rollout.engine import ScriptedEngine
from mmsr.tools.local import LocalImageSearch, LocalTextSearch
from tests.callbacks.scripted_run import turn_text
from tests.callbacks.test_callback_survivors2 import recorded
from tests.conftest import FVQA

ROWS = str(FVQA / "fvqa_dev.jsonl")


class RecordingTextSearch(LocalTextSearch):
    """The local text search, noting the module's status from inside each call (a call in flight), after waiting
    (5 s at most) until ``shown()`` says the progress bar showed it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.module: GRPOModule | None = None
        self.seen: list[str] = []
        self.shown = lambda: True
        self.waited: list[bool] = []

    async def __call__(self, request):
        self.seen.append(step_status(self.module).stage)
        for _ in range(250):
            if self.shown():
                break
            await asyncio.sleep(0.02)
        self.waited.append(self.shown())
        return await super().__call__(request)


def recording_module() -> tuple[GRPOModule, RecordingTextSearch]:
    """The scripted module (every episode with an even sample number searches the image, then the web), and its
    text search, whose ``seen`` are the stages read: at the start of each rollout, in each text search call and at
    the start of each scoring."""
    search = RecordingTextSearch(corpus=str(FVQA / "search" / "corpus.jsonl"), top_k=2)
    module = GRPOModule(
        policy=TinyQwen2_5_VL(tokenizer_texts=[ROWS, str(FVQA / "search" / "corpus.jsonl")], scaffold=Scaffold(),
                              vocab_size=512, hidden_size=64, num_layers=2, seed=0),
        engine=ScriptedEngine(turn_text),
        image_search=LocalImageSearch(index=str(FVQA / "search" / "image_index.jsonl"), top_k=2),
        text_search=search, num_generations=2, kl_coef=0.0,
    )  # fmt: skip
    search.module, stages = module, search.seen
    run, rewards = module.loop.run, module.compute_rewards

    def recording_run(*args, **kwargs):
        stages.append(step_status(module).stage)
        return run(*args, **kwargs)

    def recording_rewards(*args, **kwargs):
        stages.append(step_status(module).stage)
        return rewards(*args, **kwargs)

    module.loop.run, module.compute_rewards = recording_run, recording_rewards
    return module, search


class AfterValidationStep(L.Callback):
    """Notes the module's stage once each validation step has returned."""

    def __init__(self, stages: list[str]) -> None:
        self.stages = stages

    def on_validation_batch_end(self, trainer, pl_module, *args) -> None:
        self.stages.append(step_status(pl_module).stage)


def test_a_validation_in_a_fit_reads_val_stages_and_restores_the_stage(tmp_path):
    """A fit's step, then its validation of one batch: the module's stage during each part, in order."""
    module, search = recording_module()
    stages = search.seen
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
                        val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        callbacks=[StageProgressBar(poll_s=0, plain=True), AfterValidationStep(stages)])  # fmt: skip
    trainer.fit(module, datamodule=MMSRDataModule(train_files=[ROWS], val_files=[ROWS], prompts_per_step=2))
    distinct = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]  # the calls of a stage, once
    assert distinct == ["rollout", "tools", "reward", "val rollout", "val tools", "val reward", "idle"], stages
    assert module.stage is None


def test_between_its_stages_a_module_reads_the_hooks_stage():
    """GRPOModule's stage is None between its stages (the end of a validation: engine sleep, gathering, logging),
    which read ``idle`` inside a validation; the callback hooks' stage now fills the gaps."""
    between, during = SimpleNamespace(stage=None), SimpleNamespace(stage="val reward")
    assert step_status(between, "validation").stage == "validation" and step_status(between).stage == "idle"
    assert step_status(during, "validation").stage == "val reward"


@pytest.mark.parametrize("plain", [True, False])
def test_mmsr_validate_shows_the_validation_stage(tmp_path, plain):
    """``trainer.validate`` (``mmsr validate``) runs no training loop, so no watcher reported anything while the
    held-out episodes rolled out. Its own watcher now shows the stage in the validation bar, or in plain lines
    (at the step validated: 0 here, no checkpoint loaded). Each search waits until the bar or lines show it."""
    module, search = recording_module()
    bar = recorded(StageProgressBar(poll_s=0.02, plain=plain, plain_every_s=0.0))
    lines = bar.printed
    if plain:
        search.shown = lambda: any(line.startswith("grpo step 0/? | stage val tools | tok/s ") for line in lines)
    else:
        search.shown = lambda: "stage=val tools" in str(getattr(bar._val_progress_bar, "postfix", ""))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=1, callbacks=[bar])  # fmt: skip
    trainer.validate(module, datamodule=MMSRDataModule(train_files=[ROWS], val_files=[ROWS], prompts_per_step=2))
    assert search.waited and all(search.waited), (search.waited, lines, search.seen)
    assert set(search.seen) == {"val rollout", "val tools", "val reward"} and module.stage is None
    if plain:
        assert all(line.endswith("(in validation)") for line in lines[:-1]) and lines[-1].startswith(
            "grpo validation at step 0/?"), lines  # fmt: skip
    assert bar._watcher is None  # stopped with the validation
