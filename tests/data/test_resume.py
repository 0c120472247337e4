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


def _fit(root, max_steps, ckpt=None, drop_last=True):
    """Train a do-nothing module on ``MMSRDataModule``; returns the sample ids and the Lightning epoch of every step."""
    import lightning as L

    from mmsr.data.datamodule import MMSRDataModule

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[str]] = []
            self.epochs: list[int] = []

        def training_step(self, batch, batch_idx):
            self.seen.append([s.id for s in batch])
            self.epochs.append(self.current_epoch)
            return (self.w - 1).pow(2).sum()

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = MMSRDataModule([str(FVQA / "fvqa_dev.jsonl")], prompts_per_step=3, seed=7, drop_last=drop_last)
    model = Recorder()
    save = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[save], default_root_dir=root)  # fmt: skip
    trainer.fit(model, dm, ckpt_path=ckpt)
    return model.seen, model.epochs


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("drop_last", [True, False])
def test_lightning_resumes_mid_epoch(tmp_path, drop_last):
    """20 prompts, 3 per step: an epoch is 6 whole steps (18 prompts), or 7 with a last step of 2 without
    ``drop_last``. Stopped mid-epoch 1, at the end of epoch 1 and mid-epoch 2, the resumed run goes on as the
    uninterrupted one; no epoch is empty (the DataLoader's ``drop_last`` made every other one so)."""
    steps, per_epoch = 14, 6 if drop_last else 7
    reference, epochs = _fit(tmp_path / "ref", steps, drop_last=drop_last)
    for stop in (4, per_epoch, per_epoch + 3):
        head, _ = _fit(tmp_path / f"a{stop}", stop, drop_last=drop_last)
        (ckpt,) = (tmp_path / f"a{stop}").glob(f"epoch=*-step={stop}.ckpt")
        tail, _ = _fit(tmp_path / f"b{stop}", steps, ckpt=str(ckpt), drop_last=drop_last)
        assert head + tail == reference
    assert [len(b) for b in reference[:per_epoch]] == [3] * 6 + [2] * (not drop_last)
    assert epochs == [e for e in range(3) for _ in range(per_epoch)][:steps]
    first = sum(reference[:per_epoch], [])
    assert len(set(first)) == (18 if drop_last else 20) and first != sum(reference[per_epoch : 2 * per_epoch], [])


def test_every_step_of_the_paper_recipe_has_its_512_prompts():
    """FVQA-train's 4,856 rows on the 4x8 recipe's 32 ranks x 16: each rank's share is 151 = 9 x 16 + 7, so
    without ``drop_last`` every 10th step trained 7 prompts a rank (224 of 512). Whole steps only, as verl."""
    from types import SimpleNamespace

    from mmsr.data.datamodule import MMSRDataModule

    def sizes(rank, **kw):
        dm = MMSRDataModule(["unused"], prompts_per_step=16, **kw)
        dm.train, dm.trainer = list(range(4856)), SimpleNamespace(world_size=32, global_rank=rank)
        loader = dm.train_dataloader()
        return len(loader), [len(b) for _ in range(3) for b in loader]

    assert sizes(0) == sizes(31) == (9, [16] * 27)
    assert sizes(0, drop_last=False) == (10, ([16] * 9 + [7]) * 3)
    dm = MMSRDataModule(["f.jsonl"], prompts_per_step=16)
    dm.train, dm.trainer = list(range(500)), SimpleNamespace(world_size=32, global_rank=0)  # 15 rows a rank
    with pytest.raises(ValueError, match=r"f.jsonl'\]: 500 row\(s\) for 32 rank\(s\) x 16 .* data.drop_last: false"):
        dm.train_dataloader()


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
