"""Checkpoints that never lose work: atomic writes, the RNG / engine state a resumed run needs to
continue exactly where the interrupted one stopped, and reading the weights back for eval / export.

Lightning saves weights, optimizer, LR schedule, step and (with ``ResumableDataLoader``) the data
position. ``GRPOModule`` adds, per rank (``rank_states``): the torch, numpy, python and (when CUDA is in use) CUDA RNG
states and the rollout engine's sampler state, so the next batch is rolled out with the same random
draws. The search cache is a SQLite file on disk (``CachedTool``) and keeps its own state, budget
counters included.

Atomic saves: ``AtomicCheckpointIO`` for single-file checkpoints (every strategy that goes through
``CheckpointIO``), ``AtomicModelParallelStrategy`` for the sharded directories of
``ModelParallelStrategy`` (which bypasses ``CheckpointIO``). Remote (``scheme://``) paths are written
by Lightning / fsspec as usual, without these guarantees.
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from mmsr.data.paths import shared_mode


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint to a temporary file in the same folder, fsyncs it, then renames it
    over the target and fsyncs the folder: a kill during a save leaves the previous checkpoint intact,
    never a torn file. Temporaries of killed saves (``.NAME.<random>.tmp``) are deleted by the next
    save into the same folder (only rank 0 writes through ``CheckpointIO``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_torn_saves(target.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.fchmod(fd, shared_mode())  # mkstemp makes it 0600: others' eval jobs could not read the checkpoint
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            _fsync(target.parent)  # the rename itself survives a power loss
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# What the atomic saves below name their temporaries: ``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")``'s
# 8 random characters (a file), ``.NAME.tmp-<8 hex>`` (a sharded save's folder), ``.NAME.old-<8 hex>`` (the
# sharded checkpoint a save of NAME replaced, renamed aside until deleted).
_TORN_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
_TORN_FOLDER = re.compile(r"\..+\.tmp-[0-9a-f]{8}")
_REPLACED = re.compile(r"\.(.+)\.old-[0-9a-f]{8}")


def remove_torn_saves(folder: str | os.PathLike, name: str = "*") -> None:
    """Delete the temporaries of killed saves of ``name`` (a glob: every checkpoint by default) in ``folder``:
    a save killed with SIGKILL never reaches its ``except`` and leaves a checkpoint-sized hidden file (of
    ``AtomicCheckpointIO``) or folder (of ``AtomicModelParallelStrategy``) for good; so does a kill while a
    replaced checkpoint is deleted (``.NAME.old-<id>``, deleted only once ``NAME`` is back: before that it is the
    one whole checkpoint). Several ranks may run it at once: what another rank deleted first is skipped."""
    for stale in Path(folder).glob(f".{name}.tmp*"):
        if stale.is_dir() and _TORN_FOLDER.fullmatch(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.is_file() and _TORN_FILE.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
    for old in Path(folder).glob(f".{name}.old-*"):
        if (kept := _REPLACED.fullmatch(old.name)) and old.is_dir() and (old.parent / kept[1]).exists():
            shutil.rmtree(old, ignore_errors=True)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose distributed (sharded) checkpoints are written atomically.

    Every rank writes its shards into a hidden sibling directory ``.NAME.tmp-<id>``; after a barrier
    rank 0 renames it to ``NAME``. An existing ``NAME`` (``last.ckpt`` saved again) is first renamed
    aside to ``.NAME.old-<id>``, then the new one is renamed in, then the old one is deleted. A kill at
    any point leaves either the previous or the new checkpoint at ``NAME``, except in the one window
    between those two renames (two ``rename`` calls, microseconds): then ``NAME`` is missing and the
    previous checkpoint is complete at ``.NAME.old-<id>`` (rename it back to resume). Temporaries of
    killed saves are deleted by the next save into the same folder. Full-state (single-file) saves
    (``save_distributed_checkpoint=False``) and remote paths are left to Lightning.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint or "://" in str(filepath) or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(filepath))
        if self.global_rank == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_torn_saves(target.parent)
        tmp = Path(self.broadcast(str(target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")))
        try:
            super().save_checkpoint(checkpoint, tmp)
            if self.global_rank == 0:
                _fsync(tmp / "meta.pt")
            self.barrier("atomic_checkpoint_written")  # every rank's shards are on disk
            if self.global_rank == 0:
                _replace(tmp, target)
                # a checkpoint a crash left aside while NAME was missing (kept by the sweep above): NAME is back now
                remove_torn_saves(target.parent, glob.escape(target.name))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier("atomic_checkpoint_renamed")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, target: Path) -> None:
    """Rename directory ``tmp`` to ``target``; an existing ``target`` is renamed aside, then deleted."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync(target.parent)
    if old is not None:
        old.unlink() if old.is_symlink() or old.is_file() else shutil.rmtree(old)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint, keyed by the LightningModule's state-dict names, on CPU.

    ``path``: a single-file Lightning checkpoint (its ``state_dict``), a plain state-dict file, or a
    ``ModelParallelStrategy`` distributed checkpoint directory (DCP shards + ``meta.pt``), read in
    this one process without a process group. Optimizer states are not read: a file is memory-mapped
    and only its weights are touched; from a directory only the ``state_dict`` entries are loaded.
    Tensors keep the checkpoint's dtype. Files are unpickled: load only your own checkpoints.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise ValueError(f"{path} is a directory but not a distributed checkpoint (no .metadata file of "
                             "torch.distributed.checkpoint in it)")  # fmt: skip
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        state: dict[str, Any] = {}
        planner = _EmptyStateDictLoadPlanner(keys={"state_dict"})  # the weights, not the optimizer states
        _load_state_dict(state, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
        weights = state.get("state_dict")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:
            raise ValueError(f"{path} is not a checkpoint torch.load can read: {e}") from e
        weights = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not any(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{path} holds no weights (neither a Lightning checkpoint with a 'state_dict' "
                         "nor a state dict)")  # fmt: skip
    return weights


def adopt_dtypes(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Give ``module``'s floating parameters and buffers the dtype of the same-named tensor in
    ``weights``, so ``load_state_dict`` copies them exactly (an fp32 checkpoint into a policy built in
    bf16 stays fp32, and a bf16 one into an fp32-built policy stays bf16)."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            w = weights.get(name)
            if w is not None and t.is_floating_point() and w.is_floating_point() and w.dtype != t.dtype:
                t.data = t.data.to(w.dtype)


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy, python and (when CUDA is initialized) per-device CUDA RNG states,
    in types ``torch.load(weights_only=True)`` accepts (Lightning loads checkpoints that way)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
    state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialize CUDA just for this
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``. CUDA states are restored when CUDA is available and this process sees
    as many devices as the saving one did, else a warning says they are not. A state without CUDA
    states (saved before CUDA was initialized, or by an older mmsr) leaves the CUDA generators as
    they are, silently: ``GRPOModule.start_engine`` puts back a state taken before vLLM initializes
    CUDA, and must not warn on every start."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        warnings.warn(f"the checkpoint has CUDA RNG states of {len(cuda)} devices but CUDA is not available "
                      "here: they are not restored")  # fmt: skip
    elif len(cuda) != torch.cuda.device_count():
        warnings.warn(f"the checkpoint has CUDA RNG states of {len(cuda)} devices, this process sees "
                      f"{torch.cuda.device_count()}: they are not restored, CUDA random draws will differ")  # fmt: skip
    else:
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Put this process's RNG states back after the block (``set_rng_state(rng_state())``), e.g. around
    starting vLLM, which seeds the global generators: a run then draws the same numbers whatever engine
    it uses, and a resumed run what the interrupted one would."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def gather_per_rank(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a one-element list outside distributed runs)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_states(engine: Any) -> list[dict[str, Any]]:
    """Every rank's RNG state and engine sampler state (``engine.state_dict()`` if it has one), in rank
    order: what a checkpoint keeps so that a resumed run draws what the interrupted one would have."""
    own = engine.state_dict() if hasattr(engine, "state_dict") else None
    return gather_per_rank({"rng": rng_state(), "engine": own})


def restore_rank_state(ranks: list[dict[str, Any]] | None, rank: int, world_size: int, engine: Any) -> None:
    """Put back this rank's entry of ``rank_states``. A checkpoint of another number of ranks restores
    weights and optimizer only (warned); one without the states (older mmsr), nothing; an engine state
    that ``engine`` has no ``load_state_dict`` for, nothing of it (warned, on rank 0: once a resume)."""
    if not ranks:
        return
    if len(ranks) != world_size:
        rank_zero_warn(f"checkpoint has RNG states of {len(ranks)} ranks, this run has a different number: "
                       "weights, optimizer and the data position are restored (the epoch's remaining prompts "
                       "split over this run's ranks, unless the data sampler warns that the checkpoint did not "
                       "record its number of ranks), random draws will differ")  # fmt: skip
        return
    set_rng_state(ranks[rank]["rng"])
    if ranks[rank]["engine"] is None:
        return
    if hasattr(engine, "load_state_dict"):
        engine.load_state_dict(ranks[rank]["engine"])
    else:  # an engine with state_dict() alone saved its state and silently never got it back
        name = type(engine).__qualname__
        rank_zero_warn(f"the checkpoint holds the state of {name} (its state_dict()), but {name} has no "
                       "load_state_dict(state): not restored, the resumed run goes on with it as built")  # fmt: skip
