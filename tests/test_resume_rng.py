"""A resumed run draws from the global RNGs what the run it resumes drew (``checkpoint.rank_states``): user code that
draws from ``torch``, ``numpy`` or ``random`` (a reward, an engine, dropout) continues its stream. The kill -9 test
cannot see it: nothing of the shipped path draws from them. The torch stream went on one draw ahead: the epoch's
data iterator, started after the states were put back, drew its base seed from it."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mmsr.checkpoint import restore_rank_state, rng_state
from mmsr.data.datamodule import MMSRDataModule
from mmsr.rollout.engine import ScriptedEngine
from mmsr.rollout.vllm_engine import VLLMEngine
from tests.conftest import FVQA
from tests.test_module import make_module, script


class DrawingEngine(ScriptedEngine):
    """The scripted engine, drawing from each global RNG at every call (``draws``)."""

    draws: list[tuple[float, float, float]] = []

    def generate(self, requests, sampling):
        DrawingEngine.draws.append((torch.rand(1).item(), float(np.random.rand()), random.random()))
        return super().generate(requests, sampling)


def fit(root, ckpt: str | None = None) -> list[tuple[float, float, float]]:
    DrawingEngine.draws = []
    data = MMSRDataModule([str(FVQA / "fvqa_dev.jsonl")], prompts_per_step=1, seed=0)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)])  # fmt: skip
    trainer.fit(make_module(engine=DrawingEngine(script)), data, ckpt_path=ckpt)
    return DrawingEngine.draws


def test_a_resumed_run_continues_the_global_rng_streams(tmp_path):
    whole = fit(tmp_path / "whole")
    torch.manual_seed(7), np.random.seed(7), random.seed(7)  # another process's state before the resume
    resumed = fit(tmp_path / "resumed", str(tmp_path / "whole" / "epoch=0-step=1.ckpt"))
    assert len(resumed) >= 2 and resumed == whole[-len(resumed):]


def test_each_rank_gets_its_own_states_back():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    ranks = [{"rng": rng_state(), "engine": None}]
    first = (torch.rand(1).item(), float(np.random.rand()), random.random())
    ranks.append({"rng": rng_state(), "engine": None})
    second = (torch.rand(1).item(), float(np.random.rand()), random.random())
    for rank, expected in ((1, second), (0, first)):
        restore_rank_state(ranks, rank, 2, None)
        assert (torch.rand(1).item(), float(np.random.rand()), random.random()) == expected


def test_a_rank_state_without_an_engine_state_restores_silently_into_an_engine_that_cannot_load_one(recwarn):
    """An engine without ``state_dict`` saved ``None``: restoring it into one without ``load_state_dict`` (the
    scripted engine, every resume of such a run) has nothing to warn of. A state it cannot load is warned."""
    restore_rank_state([{"rng": rng_state(), "engine": None}], 0, 1, ScriptedEngine(script))
    assert [str(w.message) for w in recwarn] == []
    restore_rank_state([{"rng": rng_state(), "engine": {"calls": 3}}], 0, 1, ScriptedEngine(script))
    assert "ScriptedEngine has no load_state_dict(state): not restored" in str(recwarn.pop(UserWarning).message)


def test_the_vllm_engine_s_sampler_state_round_trips_without_starting_vllm():
    engine = VLLMEngine(seed=5)
    engine.calls = 3
    resumed = VLLMEngine(seed=11)
    resumed.load_state_dict(engine.state_dict())
    assert (resumed.seed, resumed.calls) == (5, 3) and resumed.state_dict() == {"seed": 5, "calls": 3}
