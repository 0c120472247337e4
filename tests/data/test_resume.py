"""The train loader resumes mid-epoch: a resumed run sees exactly the prompts an uninterrupted one sees."""

import pytest
import torch

from mmsr.data.sampler import ResumableSampler
from tests.conftest import FVQA


def test_sampler_state_continues_the_same_permutation():
    full = ResumableSampler(10, seed=3)
    first_two_epochs = list(full) + list(full)
    assert sorted(first_two_epochs[:10]) == list(range(10)) and first_two_epochs[:10] != first_two_epochs[10:]

    a = ResumableSampler(10, seed=3)
    it = iter(a)
    head = [next(it) for _ in range(4)]
    b = ResumableSampler(10, seed=3)
    b.load_state_dict(a.state_dict())
    assert head + list(b) + list(b) == first_two_epochs
    assert b.state_dict()["epoch"] == 1


def test_sampler_shards_by_rank_and_refuses_other_data():
    shards = [list(ResumableSampler(10, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(s) == 3 for s in shards) and len(set(sum(shards, []))) == 9
    with pytest.raises(ValueError, match="size 10 and seed 1, this run has 11 and 1"):
        ResumableSampler(11, seed=1).load_state_dict(ResumableSampler(10, seed=1).state_dict())
    assert list(ResumableSampler(4, shuffle=False)) == [0, 1, 2, 3]


def _fit(root, max_steps, ckpt=None):
    """Train a do-nothing module on ``MMSRDataModule``; returns the sample ids of every step."""
    import lightning as L

    from mmsr.data.datamodule import MMSRDataModule

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append([s.id for s in batch])
            return (self.w - 1).pow(2).sum()

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = MMSRDataModule([str(FVQA / "fvqa_dev.jsonl")], prompts_per_step=3, seed=7)
    model = Recorder()
    save = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[save], default_root_dir=root)  # fmt: skip
    trainer.fit(model, dm, ckpt_path=ckpt)
    return model.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_resumes_mid_epoch(tmp_path):
    # 20 prompts, 3 per step: an epoch is 7 steps; stop at step 4 (mid-epoch 1) and at 9 (mid-epoch 2)
    reference = _fit(tmp_path / "ref", 12)
    for stop in (4, 9):
        head = _fit(tmp_path / f"a{stop}", stop)
        tail = _fit(tmp_path / f"b{stop}", 12, ckpt=str(tmp_path / f"a{stop}" / f"epoch={stop // 7}-step={stop}.ckpt"))
        assert head + tail == reference
    assert sorted(sum(reference[:7], [])) == sorted({i for b in reference for i in b})  # epoch 1 = all 20


def test_fewer_held_out_rows_than_ranks_are_refused_naming_the_files():
    """A rank without a held-out row would skip validation while the others wait for it in a collective."""
    from types import SimpleNamespace

    from mmsr.data.datamodule import MMSRDataModule

    files = [str(FVQA / "fvqa_dev.jsonl")]
    dm = MMSRDataModule(train_files=files, val_files=files, prompts_per_step=2)
    dm.setup("fit")
    dm.val = dm.val[:3]
    dm.trainer = SimpleNamespace(world_size=4, global_rank=1)
    with pytest.raises(ValueError, match=r"fvqa_dev.jsonl'\]: 3 held-out row\(s\) for 4 ranks; every rank .* at least one"):
        dm.val_dataloader()
    dm.trainer = SimpleNamespace(world_size=3, global_rank=2)  # one row each
    assert [s.id for batch in dm.val_dataloader() for s in batch] == [dm.val[2].id]
