"""``mmsr.checkpoint``: reading weights back (single file, distributed directory, clear errors), atomic
single-file and distributed saves, and CUDA RNG state in the per-rank RNG record."""

import warnings

import pytest
import torch

import mmsr.checkpoint
from mmsr.checkpoint import (
    AtomicCheckpointIO,
    AtomicModelParallelStrategy,
    adopt_dtypes,
    load_weights,
    rng_state,
    set_rng_state,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # DCP in one process


def _checkpoint(scale: float) -> dict:
    """A Lightning-shaped checkpoint: weights, an optimizer state, loop state."""
    weights = {"model.w": torch.full((4, 3), scale), "model.b": torch.arange(3.0) * scale}
    optim = {"state": {0: {"exp_avg": torch.full((4, 3), -scale), "step": torch.tensor(1.0)}},
             "param_groups": [{"lr": 0.1, "params": [0]}]}  # fmt: skip
    return {"state_dict": weights, "optimizer_states": [optim], "global_step": int(scale)}


def _save_dir(path, scale: float) -> None:
    """One process, no process group: the strategy writes a DCP directory + meta.pt."""
    AtomicModelParallelStrategy().save_checkpoint(_checkpoint(scale), path)


def test_load_weights_from_file_directory_and_state_dict(tmp_path, monkeypatch):
    torch.save(_checkpoint(2.0), tmp_path / "one.ckpt")
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    _save_dir(tmp_path / "dist.ckpt", 3.0)
    assert (tmp_path / "dist.ckpt").is_dir() and (tmp_path / "dist.ckpt" / "meta.pt").is_file()
    read = []  # the items the DCP reader is asked for: weights only, never the optimizer's
    reader = torch.distributed.checkpoint.FileSystemReader
    original = reader.read_data

    def recording(self, plan, planner):
        read.extend(item.dest_index.fqn for item in plan.items)
        return original(self, plan, planner)

    monkeypatch.setattr(reader, "read_data", recording)
    assert torch.equal(load_weights(tmp_path / "one.ckpt")["model.w"], torch.full((4, 3), 2.0))
    assert list(load_weights(tmp_path / "plain.pt")) == ["w"]
    dist = load_weights(tmp_path / "dist.ckpt")
    assert dist.keys() == {"model.w", "model.b"} and torch.equal(dist["model.b"], torch.arange(3.0) * 3)
    assert read and all(k.startswith("state_dict.") for k in read)


def test_load_weights_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'nope.ckpt'} does not exist"):
        load_weights(tmp_path / "nope.ckpt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder is a directory but not a distributed checkpoint"):
        load_weights(tmp_path / "folder")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not a checkpoint torch.load can read"):
        load_weights(tmp_path / "notes.txt")
    torch.save({"global_step": 3}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match="meta.pt holds no weights"):
        load_weights(tmp_path / "meta.pt")


def test_adopt_dtypes_loads_exactly_in_the_checkpoint_dtype():
    model = torch.nn.Linear(3, 2)
    weights = {"weight": torch.randn(2, 3).to(torch.bfloat16), "bias": torch.randn(2)}
    adopt_dtypes(model, weights)
    model.load_state_dict(weights)
    assert model.weight.dtype == torch.bfloat16 and model.bias.dtype == torch.float32
    assert torch.equal(model.weight, weights["weight"]) and torch.equal(model.bias, weights["bias"])


def test_distributed_save_replaces_the_previous_one_and_a_failed_save_keeps_it(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    _save_dir(target, 1.0)
    _save_dir(target, 2.0)  # overwrite: the old directory is renamed aside, the new one in, the old deleted
    assert torch.equal(load_weights(target)["model.w"], torch.full((4, 3), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(target / "meta.pt", weights_only=True)["global_step"] == 2

    save = torch.save

    def dies(obj, f, *a, **k):  # meta.pt is written after every shard: the save dies half-way
        if str(f).endswith("meta.pt"):
            raise KeyboardInterrupt
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        _save_dir(target, 3.0)
    monkeypatch.undo()
    assert torch.equal(load_weights(target)["model.w"], torch.full((4, 3), 2.0))  # the previous one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind
    (tmp_path / ".step=9.ckpt.tmp-deadbeef").mkdir()  # what a kill -9 during a save leaves
    # a kill while the replaced last.ckpt was deleted (a 7B one holds ~100 GB): half of it stays aside
    (tmp_path / ".last.ckpt.old-0badc0de").mkdir()
    # a kill between the two renames: the previous step=8.ckpt is whole only here, and is kept
    (tmp_path / ".step=8.ckpt.old-0badc0de").mkdir()
    _save_dir(tmp_path / "step=10.ckpt", 4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step=8.ckpt.old-0badc0de", "last.ckpt", "step=10.ckpt"]


def test_a_save_failing_to_rename_the_new_one_in_keeps_the_previous_one_whole(tmp_path, monkeypatch):
    """The old NAME is renamed aside before the new one comes in and deleted only after: a crash between the two
    renames leaves it whole at ``.NAME.old-<id>``, kept by later saves until NAME is back."""
    target = tmp_path / "last.ckpt"
    _save_dir(target, 1.0)
    replace = mmsr.checkpoint.os.replace

    def dies(src, dst):  # the rename of the new checkpoint in
        if str(src).startswith(str(tmp_path / ".last.ckpt.tmp-")):
            raise OSError("killed between the renames")
        return replace(src, dst)

    monkeypatch.setattr(mmsr.checkpoint.os, "replace", dies)
    with pytest.raises(OSError, match="killed between the renames"):
        _save_dir(target, 2.0)
    monkeypatch.undo()
    (aside,) = tmp_path.glob(".last.ckpt.old-*")
    assert not target.exists() and torch.equal(load_weights(aside)["model.w"], torch.full((4, 3), 1.0))
    _save_dir(target, 3.0)  # kept while NAME was missing, deleted once the new one is in (not a save later: ~100 GB)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.equal(load_weights(target)["model.w"], torch.full((4, 3), 3.0))


def test_file_save_removes_temporaries_of_killed_saves_and_syncs_the_folder(tmp_path, monkeypatch):
    killed = [tmp_path / ".last.ckpt.k1ll3d_0.tmp", tmp_path / ".step=9.ckpt.x9y8z7w6.tmp"]  # what SIGKILL leaves
    for f in killed:
        f.write_bytes(b"x" * 1024)
    others = [tmp_path / ".notes.tmp", tmp_path / "data.k1ll3d_0.tmp"]  # not named as a temporary of ours
    for f in others:
        f.write_text("keep")
    synced = []
    monkeypatch.setattr(mmsr.checkpoint, "_fsync", lambda path: synced.append(path))
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", *(f.name for f in others)])
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"global_step": 3}
    assert synced == [tmp_path]  # the rename is made durable


class FakeCuda:
    """Stands in for two CUDA devices: this tests the wiring of the CUDA RNG states on a CPU machine
    (saved when CUDA is initialized, restored per device, warnings otherwise), not CUDA itself."""

    def __init__(self, monkeypatch, devices: int = 2, initialized: bool = True):
        self.states = [torch.tensor([d, 7], dtype=torch.uint8) for d in range(devices)]
        self.restored = None
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: setattr(self, "restored", states))


def _roundtrip(state: dict, tmp_path) -> dict:
    torch.save(state, tmp_path / "rng.pt")
    return torch.load(tmp_path / "rng.pt", weights_only=True)  # as Lightning loads checkpoints


def test_cuda_rng_states_are_saved_and_restored_when_cuda_is_used(tmp_path, monkeypatch):
    cpu_only = rng_state()
    assert "cuda" not in cpu_only
    cuda = FakeCuda(monkeypatch)
    state = _roundtrip(rng_state(), tmp_path)
    assert [s.tolist() for s in state["cuda"]] == [[0, 7], [1, 7]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_rng_state(state)
    assert [s.tolist() for s in cuda.restored] == [[0, 7], [1, 7]]
    cuda.restored = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_rng_state(cpu_only)  # saved before CUDA was initialized, or by an older mmsr: tolerated
    assert cuda.restored is None
    monkeypatch.undo()
    fewer = FakeCuda(monkeypatch, devices=1)
    with pytest.warns(UserWarning, match="CUDA RNG states of 2 devices, this process sees 1"):
        set_rng_state(state)
    assert fewer.restored is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA is not available"):
        set_rng_state(state)
    assert "cuda" not in rng_state()
