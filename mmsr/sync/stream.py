"""Streaming the trainer's weights into an engine, a bucket at a time.

The parameters are handed to ``engine.update_weights`` as one iterator, produced in buckets of
``bucket_mb``: when the trainer's parameters are FSDP2-sharded (``DTensor``), each bucket's shards are
flattened into one buffer and all-gathered with one collective (every rank runs it in the same order)
right before the bucket is handed over, so at most one bucket of full tensors exists at a time.
``dtype`` casts the shards before they travel (bf16 for a bf16 engine halves the bytes of fp32 master
weights).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.tensor import DTensor, Shard

from mmsr.rollout.engine import Engine

DEFAULT_BUCKET_MB = 256.0
DType = Literal["float32", "bfloat16", "float16"]
# Wrapper modules (activation checkpointing, torch.compile, FSDP1) insert these into parameter
# names; the engine knows the checkpoint names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass(frozen=True)
class SyncStats:
    """One sync: wall seconds, bytes of full tensors sent, buckets and tensors."""

    seconds: float
    bytes: int
    buckets: int = 0
    tensors: int = 0


def engine_name(name: str) -> str:
    """The checkpoint name of a trainer parameter (wrapper segments removed)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_nbytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes of the whole tensor (a ``DTensor``'s global shape, not its local shard), in ``dtype``
    if given (the dtype it is sent in)."""
    itemsize = dtype.itemsize if dtype is not None else tensor.element_size()
    return tensor.numel() * itemsize


def weight_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                   dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:  # fmt: skip
    """Consecutive groups of tensors of at most ``bucket_bytes`` (a bigger tensor goes alone); a
    change of dtype starts a new group, so a bucket can travel as one flat buffer."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = full_nbytes(tensor, dtype)
        if bucket and (size + nbytes > bucket_bytes or bucket[-1][1].dtype != tensor.dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor: all-gathered if sharded (every rank must call), detached."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _row_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    """All FSDP2 shards on dim 0 of the same 1-D mesh: one all-gather can serve them all."""
    if not tensors or not all(isinstance(t, DTensor) for t in tensors):
        return False
    mesh = tensors[0].device_mesh
    return mesh.ndim == 1 and all(t.device_mesh == mesh and t.placements == (Shard(0),) for t in tensors)


def gather_bucket(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Full tensors of one bucket, cast to ``dtype`` (if given) before they travel.

    FSDP2 row shards (``torch.chunk`` layout: ``c = ceil(rows / W)`` rows per rank, fewer or none on
    the last ranks) are padded to ``c`` rows, flattened into one ``[L]`` buffer per rank and
    all-gathered once (``[W, L]``), then split and unpadded: one collective per bucket instead of one
    per parameter (~700 for a 7B model). Anything else is gathered tensor by tensor.
    """
    tensors = [t.detach() for t in tensors]
    if not _row_sharded(tensors):
        return [gather(t if dtype is None else t.to(dtype)) for t in tensors]  # a DTensor casts its shard, then gathers
    world, group = tensors[0].device_mesh.size(), tensors[0].device_mesh.get_group()
    rows = [-(-t.shape[0] // world) for t in tensors]  # c per tensor
    flat = torch.cat([_padded(t.to_local(), c, dtype).reshape(-1) for t, c in zip(tensors, rows)])
    out = flat.new_empty(world * flat.numel())
    _all_gather_single(out, flat, group=group)
    return _unflatten(out.view(world, -1), tensors, rows)


def _all_gather_single(out: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """``out`` ``[W * L]`` = every rank's ``tensor`` ``[L]`` (torch 2.13 renamed the collective)."""
    dist = torch.distributed
    collective = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    collective(out, tensor, group=group)


def _padded(local: torch.Tensor, rows: int, dtype: torch.dtype | None) -> torch.Tensor:
    """``local`` ``[r, ...]`` zero-padded to ``[rows, ...]`` (and cast)."""
    local = local.to(dtype) if dtype is not None else local
    if local.shape[0] == rows:
        return local
    return torch.cat([local, local.new_zeros(rows - local.shape[0], *local.shape[1:])])


def _unflatten(gathered: torch.Tensor, tensors: Sequence[torch.Tensor], rows: Sequence[int]) -> list[torch.Tensor]:
    """Rebuild each full tensor from the ``[W, L]`` gathered buffers (rank r holds rows ``r*c ...``)."""
    out, offset = [], 0
    for t, c in zip(tensors, rows):
        tail = t.shape[1:]
        size = c * tail.numel()
        parts = gathered[:, offset : offset + size].reshape(gathered.shape[0], c, *tail)
        out.append(parts.reshape(-1, *tail)[: t.shape[0]])
        offset += size
    return out


class _Counter:
    def __init__(self) -> None:
        self.bytes = self.buckets = self.tensors = 0


def stream_weights(model: torch.nn.Module, bucket_bytes: int, counter: _Counter | None = None,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """``(checkpoint name, full tensor)`` for every parameter (tied ones once), a bucket at a time,
    cast to ``dtype`` if given (e.g. bf16 for a bf16 engine: half the bytes of fp32 master weights)."""
    counter = counter if counter is not None else _Counter()
    for bucket in weight_buckets(model.named_parameters(), bucket_bytes, dtype):
        full = gather_bucket([p for _, p in bucket], dtype)
        counter.buckets += 1
        counter.tensors += len(full)
        counter.bytes += sum(full_nbytes(t) for t in full)
        yield from ((engine_name(name), t) for (name, _), t in zip(bucket, full))
        del full  # release the gathered bucket before the next one is gathered


def sync_weights(model: torch.nn.Module, engine: Engine, bucket_mb: float = DEFAULT_BUCKET_MB,
                 dtype: torch.dtype | None = None) -> SyncStats:  # fmt: skip
    """Stream ``model``'s parameters into ``engine.update_weights`` in ``bucket_mb`` buckets; nothing to an
    engine that generates with ``model`` itself (``generates_with``)."""
    start, counter = time.perf_counter(), _Counter()
    if getattr(engine, "generates_with", lambda _: False)(model):
        return SyncStats(time.perf_counter() - start, 0, 0, 0)
    engine.update_weights(stream_weights(model, int(bucket_mb * 2**20), counter, dtype))
    return SyncStats(time.perf_counter() - start, counter.bytes, counter.buckets, counter.tensors)


