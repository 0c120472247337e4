"""``mmsr.checkpoint`` cases a mutation audit found untested: a full-state save through the atomic strategy, a
file checkpoint replaced by a sharded one, integer buffers in ``adopt_dtypes``, CUDA left uninitialized by
``rng_state`` and a checkpoint of more ranks than the resumed run has."""

import random

import numpy as np
import pytest
import torch

from mmsr.checkpoint import AtomicModelParallelStrategy, adopt_dtypes, restore_rank_state, rng_state
from tests.test_checkpoint import FakeCuda, _checkpoint, _save_dir

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # DCP in one process


def test_a_full_state_save_of_the_atomic_strategy_writes_one_file(tmp_path):
    """``save_distributed_checkpoint=False`` asks for a single-file checkpoint (what eval / export read without a
    process group): it is Lightning's save, not the sharded-directory rename dance, which has no ``meta.pt`` in a
    file to sync and failed the save."""
    target = tmp_path / "last.ckpt"
    AtomicModelParallelStrategy(save_distributed_checkpoint=False).save_checkpoint(_checkpoint(2.0), target)
    assert target.is_file() and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    saved = torch.load(target, weights_only=True)
    assert saved["global_step"] == 2 and torch.equal(saved["state_dict"]["model.w"], torch.full((4, 3), 2.0))


def test_a_sharded_save_over_a_file_checkpoint_leaves_no_old_copy(tmp_path):
    """A run that switched to sharded saves replaces its single-file ``last.ckpt``: the old file is renamed aside
    and must be deleted then, as a replaced directory is. The later sweep of ``.NAME.old-*`` removes folders only,
    so a file left aside stayed for good, a whole checkpoint's size at every such switch."""
    target = tmp_path / "last.ckpt"
    torch.save(_checkpoint(1.0), target)
    _save_dir(target, 2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert target.is_dir() and torch.load(target / "meta.pt", weights_only=True)["global_step"] == 2


class WithCounter(torch.nn.Module):
    """A float parameter and an integer buffer (as a step counter or position ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.register_buffer("count", torch.zeros(2, dtype=torch.int64))


def test_adopt_dtypes_keeps_integer_buffers_dtype():
    """Only floating tensors take the checkpoint's dtype (its precision): an integer buffer saved as int32 (or one the
    checkpoint holds as float) keeps the module's integer dtype, which the code indexing with it relies on, and a
    floating parameter the checkpoint holds as integers stays floating (load_state_dict converts the values)."""
    module = WithCounter()
    adopt_dtypes(module, {"w": torch.ones(2, dtype=torch.float64), "count": torch.tensor([3, 4], dtype=torch.int32)})
    assert (module.w.dtype, module.count.dtype) == (torch.float64, torch.int64)
    adopt_dtypes(module, {"count": torch.tensor([3.0, 4.0])})
    assert module.count.dtype == torch.int64
    adopt_dtypes(module, {"w": torch.tensor([1, 2])})
    assert module.w.dtype == torch.float64


def test_rng_state_does_not_initialize_cuda(monkeypatch):
    """CUDA available but not initialized (a CPU-only phase, or before vLLM starts): reading its RNG states would
    initialize it in this process, which breaks a later fork and holds memory on the device. No CUDA states then."""
    FakeCuda(monkeypatch, initialized=False)

    def initializes():
        raise AssertionError("rng_state() initialized CUDA")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", initializes)
    assert "cuda" not in rng_state()


def test_a_checkpoint_of_more_ranks_than_now_is_warned_and_not_restored():
    """Three ranks saved, two resume: rank 0's saved state is not this rank 0's stream (the data split differs), and
    the run must say random draws will differ rather than restore some rank's state silently."""
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    ranks = [{"rng": rng_state(), "engine": None} for _ in range(3)]
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    expected = rng_state()
    with pytest.warns(UserWarning, match="RNG states of 3 ranks, this run has a different number"):
        restore_rank_state(ranks, 0, 2, None)
    assert torch.equal(torch.get_rng_state(), expected["torch"]) and random.getstate() == expected["python"]
