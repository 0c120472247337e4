"""Prompt batches for the trainer: each batch is a ``list[Sample]`` (one GRPO group per sample).

The train loader resumes mid-epoch from a checkpoint (``mmsr.data.sampler``). Loading runs in the
main process (no workers): rows are small records, and a worker's prefetching would run the sampler
ahead of the batches actually trained on.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mmsr.checks import refuse_out_of_range, run_seed
from mmsr.data.loaders import load_samples
from mmsr.data.sample import Sample
from mmsr.data.sampler import ResumableDataLoader, ResumableSampler

# Lightning's distributed sampler would stand in for the module's own: refused here, and by ``mmsr fit`` at start
DISTRIBUTED_SAMPLER = ("multi-process training needs `trainer.use_distributed_sampler: false`: the data module "
                       "splits prompts over ranks itself (and resumes mid-epoch)")


class SampleDataset(Dataset):
    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def load_distinct(files: list[str], skip_invalid: bool, key: str) -> list[Sample]:
    """The samples of ``files``, concatenated; an id met twice is refused, naming it and its files. Ids key
    ``SFTModule``'s teacher turns, the rollout's sampling streams and replayed tool results: of two questions
    with one id, SFT trained one on the other's answer, without a word (e.g. two exports that each number
    their rows' ``data_id`` from 0)."""
    samples, where = [], {}
    for index, file in enumerate(files):
        for sample in load_samples(file, skip_invalid):
            if sample.id in where:  # a file listed twice says so: its name, twice
                first = where[sample.id]
                places = f"twice in {file}" if first == index else f"in {files[first]} and in {file}"
                raise ValueError(f"data.{key}: sample id {sample.id!r} is {places}; ids key teacher turns, "
                                 f"sampling streams and replayed searches, so they must differ: give each row its "
                                 f"own data_id")  # fmt: skip
            where[sample.id] = index
            samples.append(sample)
    return samples


def collate_samples(samples: list[Sample]) -> list[Sample]:
    """Samples stay records: no tensors until the rollout has produced tokens."""
    return list(samples)


class WholeBatchSampler(ResumableSampler):
    """A ``ResumableSampler`` whose share of each epoch is whole batches of ``batch_size``, so every step has
    ``batch_size`` prompts on every rank. With ``drop_last`` the permutation's tail past ``world x batch_size
    x (size // world // batch_size)`` is left out (verl's ``drop_last``); without, the permutation is topped up
    to whole steps with its own first indices (wrapping around), as the base pads it to equal shares: the
    short last step it left made each of ``GRPOModule``'s ``mini_batches`` updates of that step from a few
    episodes at the full learning rate, and fewer episodes than ``mini_batches`` (1 prompt x 2 generations in
    4 updates) raised at the end of the first epoch, hours into a run.

    Not the ``DataLoader``'s ``drop_last``: Lightning ends an epoch after ``len(loader)`` batches without
    exhausting the iterator, so the cut tail would stay in the sampler, and the next ``iter()`` would hand
    out only those indices, all dropped: an empty Lightning epoch every other epoch.

    A checkpoint of another ``batch_size`` (``data.prompts_per_step``; its state records it) keeps its
    place: the rest of its epoch, from the prompts all its ranks had taken, is cut or topped up to whole
    batches of this one, as a fresh epoch's tail is (warned). Going on in its share, cut to its batches,
    left a short step.

    A ``seed`` of None is the run's (``run_seed``), and a checkpoint's seed is kept: a run resumed under another
    ``seed_everything`` goes on in the checkpoint's order.
    """

    def __init__(self, batch_size: int, size: int, shuffle: bool, seed: int | None, num_replicas: int, rank: int,
                 drop_last: bool = True) -> None:  # fmt: skip
        super().__init__(size, shuffle, run_seed(seed), num_replicas, rank)
        self.batch_size, self.drop_last, self.seed_of_run = batch_size, drop_last, seed is None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.seed_of_run and "seed" in state:
            self.seed = int(state["seed"])
        super().load_state_dict(state)

    def share(self, count: int) -> int:
        step = self.num_replicas * self.batch_size
        return (count // step if self.drop_last else -(-count // step)) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {**super().state_dict(), "batch_size": self.batch_size}

    def _share_changed(self, state: dict[str, Any], share: int, midway: bool) -> bool:
        """Another batch size changes the share; warned where it changes a step's prompts too (not 2 ranks x 2
        resumed on 1 x 4, nor 1 x 4 on 2 x 4: the rest is split as on any other number of ranks)."""
        saved = int(state.get("batch_size", self.batch_size))  # older mmsr: taken to be this one
        replicas = int(state.get("num_replicas", self.num_replicas))
        stepped = saved * replicas != self.batch_size * self.num_replicas
        if saved != self.batch_size and stepped and midway and self.rank == 0:
            tail = ("leaving out the rows past the last one" if self.drop_last
                    else "the last one topped up with the epoch's first rows")  # fmt: skip
            warnings.warn(f"the checkpoint's steps are {saved} prompts x {replicas} rank(s), this run's "
                          f"{self.batch_size} x {self.num_replicas} (data.prompts_per_step): the rest of epoch "
                          f"{self.epoch} goes on in whole steps of this run's, {tail}, as every epoch does "
                          f"(data.drop_last)")  # fmt: skip
        return saved != self.batch_size or super()._share_changed(state, share, midway)


def own_generator() -> torch.Generator:
    """A loader's own generator: every iterator a ``DataLoader`` starts draws its workers' base seed from it, from the
    global torch generator without one. A resumed run started its epoch's iterator after the checkpoint's RNG states
    were put back, so a reward or engine drawing from ``torch`` went on one draw ahead of the run it resumes (and each
    validation moved the training's draws). The loaders run in this process (no workers): the seed is unused."""
    return torch.Generator().manual_seed(0)


class MMSRDataModule(L.LightningDataModule):
    """Serves the training prompts.

    Args:
        train_files: parquet / jsonl files or saved ``datasets`` directories (see ``mmsr.data.loaders``),
            concatenated.
        val_files: held-out files: ``GRPOModule`` rolls them out greedily in Lightning's validation loop
            (``trainer.val_check_interval``) and logs ``val/`` metrics, ``SFTModule`` scores its teacher's
            turns on them (``val/sft_loss``); split over the ranks, in order.
        prompts_per_step: prompts per training step and rank (each is rolled out ``num_generations`` times).
            Fewer training rows than one step of all ranks are refused.
        drop_last: train on whole steps only, as upstream verl (``drop_last=True``): each epoch leaves out the
            rows past the last whole step of every rank (FVQA-train's 4,856 rows on 32 ranks x 16: 248 rows,
            a different 248 each epoch when shuffled). ``False`` trains every row: the epoch is topped up to
            whole steps with its first rows (wrapping around), as torch's ``DistributedSampler`` pads to equal
            shares (there: 10 steps, 264 rows trained twice). Every step keeps ``prompts_per_step`` prompts a
            rank either way, so each of ``mini_batches`` updates has the episodes it is sized for (a short last
            step with fewer episodes than ``mini_batches`` raised at the end of the first epoch), and every
            rank takes as many steps (ranks taking different numbers hang in a collective). The held-out
            loader keeps every row, once, either way.
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch).
        seed: shuffling seed; None: the run's ``seed_everything`` (``run_seed``), as the engine's sampling seed.
            A checkpoint keeps its seed.
        skip_invalid: drop invalid rows with a warning instead of failing.
    """

    def __init__(
        self,
        train_files: list[str],
        val_files: list[str] | None = None,
        prompts_per_step: int = 4,
        shuffle: bool = True,
        seed: int | None = None,
        skip_invalid: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        # 0 divided by it deep in the sampler; a negative count failed in torch
        refuse_out_of_range("MMSRDataModule", [("prompts_per_step", prompts_per_step, prompts_per_step >= 1, ">= 1")])
        self.train_files, self.val_files = train_files, val_files or []
        self.prompts_per_step, self.shuffle, self.seed = prompts_per_step, shuffle, seed
        self.drop_last = drop_last
        self.skip_invalid = skip_invalid
        self.train: list[Sample] = []
        self.val: list[Sample] = []
        self._train_sampler: tuple[Any, ResumableSampler] | None = None  # (its trainer, it): see ``_sampler``

    def setup(self, stage: str | None = None) -> None:
        if not self.train:
            self.train = load_distinct(self.train_files, self.skip_invalid, "train_files")
            self.val = load_distinct(self.val_files, self.skip_invalid, "val_files")
        if not self.train:
            raise ValueError(f"no training samples in {self.train_files}")

    def train_dataloader(self) -> DataLoader:
        replicas, rank = self._ranks()
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if replicas > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(DISTRIBUTED_SAMPLER)
        sampler = self._sampler(replicas, rank)
        return ResumableDataLoader(SampleDataset(self.train), sampler, batch_size=self.prompts_per_step,
                                   collate_fn=collate_samples, drop_last=False, generator=own_generator())  # fmt: skip

    def _sampler(self, replicas: int, rank: int) -> ResumableSampler:
        """This trainer's sampler, built once: ``trainer.reload_dataloaders_every_n_epochs`` asks for a new loader
        every epoch, and a new sampler began at epoch 0, so every epoch repeated epoch 0's order. The kept one goes
        on as a loader kept for the whole fit does (and from the state a checkpoint loaded into it)."""
        if self._train_sampler is not None and self._train_sampler[0] is self.trainer:
            kept = self._train_sampler[1]
            if (kept.num_replicas, kept.rank) == (replicas, rank):
                return kept
        self._refuse_less_than_a_step(replicas)
        sampler = WholeBatchSampler(self.prompts_per_step, len(self.train), self.shuffle, self.seed, replicas, rank,
                                    self.drop_last)  # fmt: skip
        self._train_sampler = (self.trainer, sampler)
        return sampler

    def _refuse_less_than_a_step(self, replicas: int) -> None:
        """Fewer rows than one step (``replicas x prompts_per_step``) are refused, ``drop_last`` or not: with it no
        step is whole and nothing trains; without, the step was topped up by wrapping around the rows, so it held
        a row twice, and both copies rolled out the same episodes (sampling streams are keyed by the row's id and
        episode), counted twice in the update."""
        step = replicas * self.prompts_per_step
        if len(self.train) < step:
            raise ValueError(f"data.train_files {self.train_files}: {len(self.train)} training row(s) for {replicas} "
                             f"rank(s) x {self.prompts_per_step} data.prompts_per_step = {step} prompts a step; a step "
                             f"needs {step} distinct rows: add rows, or lower data.prompts_per_step or the number of "
                             f"ranks (trainer.devices x trainer.num_nodes)")  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the held-out rows (rank r: rows r, r + world, ...), in order. Fewer rows than
        ranks are refused: a rank without one skips validation while the others wait for it in a collective
        (on 2 gloo ranks with 1 row the run died of "Connection closed by peer")."""
        replicas, rank = self._ranks()
        if 0 < len(self.val) < replicas:
            raise ValueError(f"data.val_files {self.val_files}: {len(self.val)} held-out row(s) for {replicas} ranks; "
                             f"every rank validates its share and needs at least one: add rows or drop val_files")  # fmt: skip
        return DataLoader(SampleDataset(self.val[rank::replicas]), batch_size=self.prompts_per_step,
                          collate_fn=collate_samples, generator=own_generator())  # fmt: skip

    def _ranks(self) -> tuple[int, int]:
        """(world size, this rank) of the trainer; (1, 0) outside one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
