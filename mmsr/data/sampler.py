"""A sampler and data loader that resume mid-epoch from a checkpoint.

Lightning saves ``state_dict()`` of every train dataloader that has ``state_dict`` / ``load_state_dict``
in the checkpoint (``loops.fit_loop.combined_loader``) and loads it before the first ``iter()`` on
resume. A sized loader is not prefetched by Lightning, so when a checkpoint is written after batch
``b`` the sampler has handed out exactly the indices of batches ``0..b``: the resumed run continues
with batch ``b + 1`` of the same permutation, never repeating or skipping a prompt, on any number of
ranks and with any batch size (a checkpoint of an older mmsr, which did not record its number of ranks:
on that number only).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from itertools import chain, cycle, islice
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """A per-epoch permutation (seeded by ``seed + epoch``) that remembers how far it got.

    With ``num_replicas > 1`` each rank takes every ``num_replicas``-th index of the permutation,
    starting at ``rank``, so ranks that have each handed out ``position`` indices have together handed
    out the permutation's first ``position x num_replicas``. Every rank takes the same count (ranks that
    take different numbers of steps hang in a collective): the permutation is padded to a multiple of
    ``num_replicas`` with its own first indices, as torch's ``DistributedSampler`` does without
    ``drop_last``, so an epoch trains every row and up to ``num_replicas - 1`` of them twice (the cut
    tail left some rows out of every epoch: unshuffled, always the same ones). One rank pads nothing.
    Subclasses take another ``share`` (``WholeBatchSampler``: whole steps, the tail cut or topped up).

    State: ``epoch``, ``position`` (indices of this rank's share handed out in that epoch), ``offset``
    (where in the permutation that share starts: 0 but in an epoch resumed on another shape),
    ``num_replicas``, ``share`` and ``shuffle``. A checkpoint of another number of ranks or another share
    (e.g. another batch size of ``WholeBatchSampler``) goes on from the indices all its ranks handed out:
    the rest of that epoch's permutation is split over this run's ranks and shares, so no prompt of the
    epoch is repeated or skipped (but the padding or the cut tail). Lightning still counts that epoch's
    batches as the checkpoint's run did, so when the split leaves more batches than it expects, the extra
    ones make a short next Lightning epoch (fewer end it early). A checkpoint of the other ``shuffle``
    finishes its epoch in its own order (warned): its handed-out indices are of that permutation.
    Checkpoints without ``num_replicas`` (older mmsr) are taken to be of this many ranks (warned: saved
    on another number, they repeat or skip prompts of their epoch).
    A new ``iter()`` after a finished epoch starts the next one.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.position = 0
        self.offset = 0
        self.epoch_shuffle = shuffle  # the current epoch's order: a resumed checkpoint's until it ends

    def __len__(self) -> int:
        return self.share(self.size)

    def share(self, count: int) -> int:
        """How many of ``count`` indices each rank takes: all of them, padded to an equal count."""
        return -(-count // self.num_replicas)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``, in order (the current epoch's from ``offset`` on): every
        ``num_replicas``-th of the rest of the permutation, cut or padded (wrapping around to the
        permutation's start) to ``share x num_replicas``."""
        current = epoch == self.epoch
        shuffle = self.epoch_shuffle if current else self.shuffle
        if shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.size, generator=generator).tolist()
        else:
            perm = list(range(self.size))
        start = self.offset if current else 0
        length = self.share(self.size - start) * self.num_replicas
        return list(islice(chain(perm[start:], cycle(perm)), length))[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self.position >= self.share(self.size - self.offset):  # the previous epoch was used up
            self.epoch, self.position, self.offset = self.epoch + 1, 0, 0
            self.epoch_shuffle = self.shuffle
        order = self.order(self.epoch)
        while self.position < len(order):
            # counted before the yield: the index is handed out once it is yielded
            self.position += 1
            yield order[self.position - 1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed,
                "offset": self.offset, "num_replicas": self.num_replicas,
                "share": self.share(self.size - self.offset), "shuffle": self.epoch_shuffle}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("size") != self.size or state.get("seed") != self.seed:
            raise ValueError(
                f"cannot resume the data order: the checkpoint's sampler had size {state.get('size')} and seed "
                f"{state.get('seed')}, this run has {self.size} and {self.seed} (the training data changed?)"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.offset = int(state.get("offset", 0))
        share = int(state.get("share", self.share(self.size - self.offset)))  # older mmsr: taken to be this one
        midway = (self.offset > 0 or self.position > 0) and self.position < share
        self._resume_order(bool(state.get("shuffle", self.shuffle)), midway)
        if "num_replicas" not in state:
            self._warn_unknown_ranks()
        replicas = int(state.get("num_replicas", self.num_replicas))
        if self._share_changed(state, share, midway) or replicas != self.num_replicas:
            self._split_rest(replicas, share)

    def _resume_order(self, saved: bool, midway: bool) -> None:
        """The order of the checkpoint's epoch: its ``shuffle`` while the epoch is ``midway`` (the indices
        handed out are of its permutation: another would repeat and skip prompts); this run's after."""
        self.epoch_shuffle = saved if midway else self.shuffle
        if saved != self.shuffle and midway and self.rank == 0:
            warnings.warn(f"the checkpoint's data.shuffle is {saved}, this run's {self.shuffle}: the rest of epoch "
                          f"{self.epoch} goes on in the checkpoint's order, this run's from epoch {self.epoch + 1}")

    def _share_changed(self, state: dict[str, Any], share: int, midway: bool) -> bool:
        """Whether the checkpoint took another ``share`` of the rest of its epoch than this sampler takes (a
        subclass's, or an older mmsr's cut tail): its ``position`` is then not one of this share. ``midway``:
        its epoch was begun and not finished (where a subclass warns of what it changes)."""
        return share != self.share(self.size - self.offset)

    def _warn_unknown_ranks(self) -> None:
        """An older mmsr's ``position`` counts one rank's share without saying of how many ranks; taken to be
        this run's, it goes on exactly on as many ranks only, and nothing here knows how many saved it."""
        if self.position == 0 or self.rank != 0:  # nothing handed out in this epoch yet: exact on any number
            return
        warnings.warn(f"the checkpoint's data position (epoch {self.epoch}, {self.position} prompts into each rank's "
                      f"share) is of an older mmsr that did not record its number of ranks: it is taken to be this "
                      f"run's {self.num_replicas}. If it was saved on another number of ranks, the rest of epoch "
                      f"{self.epoch} repeats (fewer ranks now) or skips (more) some of its prompts; resume it on "
                      f"the number of ranks that saved it to go on exactly")  # fmt: skip

    def _split_rest(self, replicas: int, share: int) -> None:
        """Go on from a state of ``replicas`` ranks, each ``position`` into its ``share`` of the epoch: its
        position counts that rank's indices only, which are not this run's."""
        if self.position >= share:  # they finished the epoch: the next iter() starts the next one
            self.offset, self.position = 0, len(self)
        else:
            self.offset, self.position = self.offset + self.position * replicas, 0


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a ``ResumableSampler``, exposing its state to Lightning checkpoints."""

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.resumable_sampler = sampler

    def state_dict(self) -> dict[str, int]:
        return self.resumable_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumable_sampler.load_state_dict(state)
