"""Prompt batches for the trainer: each batch is a ``list[Sample]`` (one GRPO group per sample).

The train loader resumes mid-epoch from a checkpoint (``mmsr.data.sampler``). Loading runs in the
main process (no workers): rows are small records, and a worker's prefetching would run the sampler
ahead of the batches actually trained on.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from mmsr.data.loaders import load_samples
from mmsr.data.sample import Sample
from mmsr.data.sampler import ResumableDataLoader, ResumableSampler


class SampleDataset(Dataset):
    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def collate_samples(samples: list[Sample]) -> list[Sample]:
    """Samples stay records: no tensors until the rollout has produced tokens."""
    return list(samples)


class MMSRDataModule(L.LightningDataModule):
    """Serves the training prompts.

    Args:
        train_files: parquet / jsonl files or saved ``datasets`` directories (see ``mmsr.data.loaders``),
            concatenated.
        val_files: held-out files: ``GRPOModule`` rolls them out greedily in Lightning's validation loop
            (``trainer.val_check_interval``) and logs ``val/`` metrics, ``SFTModule`` scores its teacher's
            turns on them (``val/sft_loss``); split over the ranks, in order.
        prompts_per_step: prompts per training step (each is rolled out ``num_generations`` times).
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch).
        seed: shuffling seed.
        skip_invalid: drop invalid rows with a warning instead of failing.
    """

    def __init__(
        self,
        train_files: list[str],
        val_files: list[str] | None = None,
        prompts_per_step: int = 4,
        shuffle: bool = True,
        seed: int = 0,
        skip_invalid: bool = False,
    ) -> None:
        super().__init__()
        self.train_files, self.val_files = train_files, val_files or []
        self.prompts_per_step, self.shuffle, self.seed = prompts_per_step, shuffle, seed
        self.skip_invalid = skip_invalid
        self.train: list[Sample] = []
        self.val: list[Sample] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.train:
            self.train = [s for f in self.train_files for s in load_samples(f, self.skip_invalid)]
            self.val = [s for f in self.val_files for s in load_samples(f, self.skip_invalid)]
        if not self.train:
            raise ValueError(f"no training samples in {self.train_files}")

    def train_dataloader(self) -> DataLoader:
        replicas, rank = self._ranks()
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if replicas > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError("multi-process training needs `trainer.use_distributed_sampler: false`: the data "
                             "module splits prompts over ranks itself (and resumes mid-epoch)")  # fmt: skip
        sampler = ResumableSampler(len(self.train), self.shuffle, self.seed, replicas, rank)
        return ResumableDataLoader(SampleDataset(self.train), sampler, batch_size=self.prompts_per_step,
                                   collate_fn=collate_samples, drop_last=False)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        """This rank's share of the held-out rows (rank r: rows r, r + world, ...), in order. Fewer rows than
        ranks are refused: a rank without one skips validation while the others wait for it in a collective
        (on 2 gloo ranks with 1 row the run died of "Connection closed by peer")."""
        replicas, rank = self._ranks()
        if 0 < len(self.val) < replicas:
            raise ValueError(f"data.val_files {self.val_files}: {len(self.val)} held-out row(s) for {replicas} ranks; "
                             f"every rank validates its share and needs at least one: add rows or drop val_files")  # fmt: skip
        return DataLoader(SampleDataset(self.val[rank::replicas]), batch_size=self.prompts_per_step,
                          collate_fn=collate_samples)  # fmt: skip

    def _ranks(self) -> tuple[int, int]:
        """(world size, this rank) of the trainer; (1, 0) outside one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
