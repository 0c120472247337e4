"""One training run, one search budget: every rank and every resume of a run share its caches' ``run_id``
(``assign_run_id``, set by ``GRPOModule``); by default each process was a run of its own, so 8 ranks could spend
8x ``max_calls`` and a resumed run started its budget over."""

from __future__ import annotations

import asyncio

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

import mmsr.tools.cache as cache_module
from mmsr.tools import ToolRequest
from mmsr.tools.cache import CachedTool, assign_run_id, cached_tools
from mmsr.tools.crop import CropSearch
from mmsr.tools.spec import ImageSearchTool, TextSearchTool
from tests.rollout.test_loop import FakeImageSearch, FakeTextSearch
from tests.test_module import make_module

from .test_cache import CountingTool


def _search(tool: CachedTool, query: str) -> bool:
    return asyncio.run(tool(ToolRequest("text_search", query))).ok


def test_two_processes_given_one_run_id_spend_one_budget(tmp_path, monkeypatch):
    path, ranks = str(tmp_path / "c.sqlite"), []
    for rank in range(2):  # each its own process: its own default id
        monkeypatch.setattr(cache_module, "PROCESS_RUN_ID", f"process-{rank}")
        ranks.append(CachedTool(CountingTool(), path, max_calls=3))
        assert assign_run_id({"text_search": ranks[-1]}, "the-run") == [ranks[-1]]
    spent = [_search(ranks[i % 2], f"q{i}") for i in range(6)]
    assert spent == [True] * 3 + [False] * 3  # 3 calls in all, not 3 a rank
    assert [tool.metrics()["tools/text_search/run_api_calls"] for tool in ranks] == [3.0, 3.0]


def test_every_cache_among_the_tools_gets_the_id_but_a_configured_one():
    inner, crop = CachedTool(CountingTool(), "unused.sqlite"), CachedTool(CountingTool(), "unused.sqlite")
    outer, mine = CachedTool(inner, "unused.sqlite"), CachedTool(CountingTool(), "unused.sqlite", run_id="mine")
    tools = {"image_search": ImageSearchTool(outer), "text_search": TextSearchTool(mine),
             "crop_search": CropSearch(crop), "again": ImageSearchTool(outer), "none": None}  # fmt: skip
    assert cached_tools(tools) == [outer, mine, crop, inner]  # each once, wherever it is wrapped
    assert assign_run_id(tools, "run-1") == [outer, crop, inner]
    assert assign_run_id(tools, "run-2") == [outer, crop, inner]  # a checkpoint's id replaces a fresh one
    assert [t.run_id for t in (outer, crop, inner, mine)] == ["run-2"] * 3 + ["mine"]


def _fit(module, samples, max_steps: int = 1, ckpt_path=None) -> L.Trainer:
    loader = torch.utils.data.DataLoader(samples, batch_size=len(samples), collate_fn=list)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def samples(fvqa_samples):
    return [s for s in fvqa_samples if s.image is not None][:2]


@pytest.mark.parametrize("restore_after_setup", [False, True], ids=["ddp_order", "fsdp2_order"])
def test_a_resumed_run_spends_the_budget_its_checkpoint_names(samples, tmp_path, monkeypatch, restore_after_setup):
    # ModelParallelStrategy restores the checkpoint after on_fit_start, DDP before: either way the resumed id wins
    path = str(tmp_path / "c.sqlite")
    first = CachedTool(FakeImageSearch(), path, max_calls=1)
    trainer = _fit(make_module(image_search=first), samples[:1])  # the one paid image search
    assert first.run_id != cache_module.PROCESS_RUN_ID and first.metrics()["tools/image_search/run_api_calls"] == 1
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    monkeypatch.setattr(cache_module, "PROCESS_RUN_ID", "relaunched")  # the resume is another process
    monkeypatch.setattr(SingleDeviceStrategy, "restore_checkpoint_after_setup", restore_after_setup)
    backend = FakeImageSearch()
    resumed = CachedTool(backend, path, max_calls=1)
    _fit(make_module(image_search=resumed), samples[1:], max_steps=2, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.run_id == first.run_id and resumed.counts["image_search/budget_refusals"] == 1
    assert backend.requests == []  # another image: a miss, refused, the run's one call spent before the resume


def test_every_rank_of_a_run_spends_rank_zeros_budget(samples, tmp_path, monkeypatch):
    path = str(tmp_path / "c.sqlite")
    zero = CachedTool(FakeImageSearch(), path, max_calls=1)
    _fit(make_module(image_search=zero), samples[:1])
    # rank 1: another process, whose broadcast from rank 0 answers rank 0's id (DDP's broadcast_object_list)
    monkeypatch.setattr(cache_module, "PROCESS_RUN_ID", "rank-1")
    monkeypatch.setattr(SingleDeviceStrategy, "broadcast", lambda self, obj, src=0: zero.run_id)
    backend, mine = FakeImageSearch(), CachedTool(FakeTextSearch(), path, run_id="configured")
    one = CachedTool(backend, path, max_calls=1)
    _fit(make_module(image_search=one, text_search=mine), samples[1:])
    assert one.run_id == zero.run_id and one.counts["image_search/budget_refusals"] == 1 and backend.requests == []
    assert mine.run_id == "configured"  # a run_id set in the config is kept
