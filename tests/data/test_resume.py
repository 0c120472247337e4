"""The train loader resumes mid-epoch: a resumed run sees exactly the prompts an uninterrupted one sees."""

import warnings

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
    perm = ResumableSampler(10, seed=1).order(0)  # padded to 12 with its first two: 4 a rank, every row
    assert all(len(s) == 4 for s in shards) and sorted(sum(shards, [])) == sorted(perm + perm[:2])
    with pytest.raises(ValueError, match="size 10 and seed 1, this run has 11 and 1"):
        ResumableSampler(11, seed=1).load_state_dict(ResumableSampler(10, seed=1).state_dict())
    assert list(ResumableSampler(4, shuffle=False)) == [0, 1, 2, 3]


def _ranks(world: int, batch: int, state: dict | None = None) -> list:
    """The 19-row ``WholeBatchSampler`` of each of ``world`` ranks (``batch`` prompts a rank), loaded from ``state``."""
    from mmsr.data.datamodule import WholeBatchSampler

    samplers = [WholeBatchSampler(batch, 19, True, 5, world, r) for r in range(world)]
    for s in samplers if state is not None else ():
        s.load_state_dict(state)
    return samplers


def _steps(samplers: list, batch: int, steps: int) -> tuple[list[int], dict]:
    """The indices all ranks hand out in ``steps`` steps, and the state a checkpoint then keeps (rank 0's)."""
    its = [iter(s) for s in samplers]
    return [next(it) for _ in range(steps) for it in its for _ in range(batch)], samplers[0].state_dict()


def test_a_checkpoint_resumes_on_another_number_of_ranks_without_repeating_a_prompt():
    """2 ranks x 2 (an epoch of 19 rows: 4 steps), resumed on 1 rank x 4 after one step (on the other 15 rows:
    3 steps), that resumed after one step on 3 ranks x 1 (11 rows left: 3 steps): epoch 0 hands out its
    permutation's first 17 indices once each; the next epoch is the 3 ranks' own. Each rank's ``position``
    counted its own share: 1 rank x 4 went on from index 2 of its order, repeating indices 2 and 3."""
    perm = ResumableSampler(19, seed=5).order(0)
    first, state = _steps(_ranks(2, 2), 2, 1)
    second, state = _steps(_ranks(1, 4, state), 4, 1)
    three = _ranks(3, 1, state)
    third, state = _steps(three, 1, 3)
    epoch = first + second + third
    assert sorted(epoch) == sorted(perm[:17]) and state["epoch"] == 0
    fresh = _ranks(3, 1)
    _steps(fresh, 1, 6)
    assert _steps(three, 1, 6)[0] == _steps(fresh, 1, 6)[0]
    # a finished epoch goes on with the next one, as the new ranks would have
    ended = _steps(_ranks(2, 2), 2, 4)[1]
    assert _steps(_ranks(1, 4, ended), 4, 4)[0] == ResumableSampler(19, seed=5).order(1)[:16]


def test_an_older_checkpoint_without_the_number_of_ranks_resumes_as_before():
    full = _steps(_ranks(2, 2), 2, 4)[0]
    first, state = _steps(_ranks(2, 2), 2, 1)
    old = {k: state[k] for k in ("epoch", "position", "size", "seed")}
    with pytest.warns(UserWarning, match="did not record its number of ranks") as warned:
        resumed = _ranks(2, 2, old)
    assert len(warned) == 1  # rank 0's
    assert first + _steps(resumed, 2, 3)[0] == full


def test_an_older_checkpoint_on_another_number_of_ranks_is_warned_of_the_prompts_it_repeats():
    """2 ranks x 2, one step, resumed on 1 rank x 4: the old ``position`` 2 is read as one rank's, so the rank
    goes on from index 2 of the whole permutation, rolling out 2 of the 4 prompts trained in the first step
    again. The warning says so; the restored RNG warning (of another number of ranks) says the rest of the
    epoch is split over the new ranks, which holds for states that record their ranks only."""
    first, state = _steps(_ranks(2, 2), 2, 1)
    old = {k: state[k] for k in ("epoch", "position", "size", "seed")}
    with pytest.warns(UserWarning, match=r"epoch 0, 2 prompts into each rank's share.*this run's 1.*repeats"):
        resumed = _ranks(1, 4, old)
    assert len(set(first) & set(_steps(resumed, 4, 1)[0])) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ranks(1, 4, state)  # it records its ranks: split exactly, nothing to warn of
        _ranks(1, 4, {**old, "position": 0})  # nothing handed out yet in the epoch: exact on any number


def _fit(root, max_steps, ckpt=None, drop_last=True, reload=0):
    """Train a do-nothing module on ``MMSRDataModule`` (a new train loader every ``reload`` epochs); returns the
    sample ids and the Lightning epoch of every step."""
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
                        enable_model_summary=False, callbacks=[save], default_root_dir=root,
                        reload_dataloaders_every_n_epochs=reload)  # fmt: skip
    trainer.fit(model, dm, ckpt_path=ckpt)
    return model.seen, model.epochs


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("drop_last", [True, False])
def test_lightning_resumes_mid_epoch(tmp_path, drop_last):
    """20 prompts, 3 per step: an epoch is 6 whole steps (18 prompts), or 7 without ``drop_last``, the last
    topped up with the epoch's first prompt (it was a step of 2). Stopped mid-epoch 1, at the end of epoch 1
    and mid-epoch 2, the resumed run goes on as the uninterrupted one; no epoch is empty (the DataLoader's
    ``drop_last`` made every other one so)."""
    steps, per_epoch = 14, 6 if drop_last else 7
    reference, epochs = _fit(tmp_path / "ref", steps, drop_last=drop_last)
    for stop in (4, per_epoch, per_epoch + 3):
        head, _ = _fit(tmp_path / f"a{stop}", stop, drop_last=drop_last)
        (ckpt,) = (tmp_path / f"a{stop}").glob(f"epoch=*-step={stop}.ckpt")
        tail, _ = _fit(tmp_path / f"b{stop}", steps, ckpt=str(ckpt), drop_last=drop_last)
        assert head + tail == reference
    assert [len(b) for b in reference[:per_epoch]] == [3] * per_epoch
    assert epochs == [e for e in range(3) for _ in range(per_epoch)][:steps]
    first = sum(reference[:per_epoch], [])
    assert len(set(first)) == (18 if drop_last else 20) and first != sum(reference[per_epoch : 2 * per_epoch], [])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_train_loader_reloaded_every_epoch_reshuffles_as_one_kept_for_the_fit(tmp_path):
    """``trainer.reload_dataloaders_every_n_epochs: 1`` asks for a new train loader every epoch; its new sampler
    began at epoch 0, so every epoch trained epoch 0's order. It goes on as the kept loader does, and resumes at
    an epoch's end and mid-epoch as exactly (20 prompts, 3 a step: 6 steps an epoch)."""
    reference, _ = _fit(tmp_path / "ref", 14)
    reloaded, epochs = _fit(tmp_path / "reloaded", 14, reload=1)
    assert epochs == [e for e in range(3) for _ in range(6)][:14]
    assert sum(reloaded[:6], []) != sum(reloaded[6:12], []) and reloaded == reference
    for stop in (6, 8):
        head, _ = _fit(tmp_path / f"a{stop}", stop, reload=1)
        (ckpt,) = (tmp_path / f"a{stop}").glob(f"epoch=*-step={stop}.ckpt")
        tail, _ = _fit(tmp_path / f"b{stop}", 14, ckpt=str(ckpt), reload=1)
        assert head + tail == reference


def test_every_step_of_the_paper_recipe_has_its_512_prompts():
    """FVQA-train's 4,856 rows on the 4x8 recipe's 32 ranks x 16: 151.75 rows a rank, 9 whole steps (as verl),
    or without ``drop_last`` 10, the epoch topped up to 5,120 with its first 264 rows: every 10th step trained
    8 prompts a rank (256 of 512), each of its mini-batches half the others'."""
    from types import SimpleNamespace

    from mmsr.data.datamodule import MMSRDataModule

    def sizes(rank, **kw):
        dm = MMSRDataModule(["unused"], prompts_per_step=16, **kw)
        dm.train, dm.trainer = list(range(4856)), SimpleNamespace(world_size=32, global_rank=rank)
        loader = dm.train_dataloader()
        return len(loader), [len(b) for _ in range(3) for b in loader]

    assert sizes(0) == sizes(31) == (9, [16] * 27)
    assert sizes(0, drop_last=False) == sizes(31, drop_last=False) == (10, [16] * 30)


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


@pytest.mark.parametrize("drop_last", [True, False])
def test_fewer_training_rows_than_one_step_are_refused_naming_the_files(drop_last):
    """500 rows on 32 ranks x 16 (512 a step): with ``drop_last`` no step is whole; without, the step was topped up
    by wrapping around, 12 rows twice in it, each copy rolling out the same episodes (sampling streams are keyed
    by the row's id), counted twice. 3 rows on 1 rank x 4: step [r, s, t, r]; 3 rows on 4 ranks x 1: every rank's
    share was empty (the run trained nothing and exited 0). Exactly one step trains every row once."""
    from types import SimpleNamespace

    from mmsr.data.datamodule import MMSRDataModule

    for rows, world, batch in ((500, 32, 16), (3, 1, 4), (3, 4, 1)):
        dm = MMSRDataModule(["f.jsonl", "g.jsonl"], prompts_per_step=batch, drop_last=drop_last)
        dm.train, dm.trainer = list(range(rows)), SimpleNamespace(world_size=world, global_rank=0)
        words = (rf"\['f.jsonl', 'g.jsonl'\]: {rows} training row\(s\) for {world} rank\(s\) x {batch} "
                 rf"data.prompts_per_step = {world * batch} prompts a step.*lower data.prompts_per_step or the number "
                 rf"of ranks \(trainer.devices x trainer.num_nodes\)")  # fmt: skip
        with pytest.raises(ValueError, match=words):
            dm.train_dataloader()
    steps = [[b for b in loader] for loader in _loaders(8, 2, 4, drop_last=drop_last)]
    assert [len(s) for s in steps] == [1, 1] and sorted(sum(sum(steps, []), [])) == list(range(8))


def _loaders(size: int, world: int, batch: int, drop_last: bool, shuffle: bool = True, state: dict | None = None):
    """Every rank's train loader of ``MMSRDataModule`` over rows ``0..size-1`` (seed 5), loaded from ``state``."""
    from types import SimpleNamespace

    from mmsr.data.datamodule import MMSRDataModule

    loaders = []
    for rank in range(world):
        dm = MMSRDataModule(["rows.jsonl"], prompts_per_step=batch, shuffle=shuffle, seed=5, drop_last=drop_last)
        dm.train, dm.trainer = list(range(size)), SimpleNamespace(world_size=world, global_rank=rank)
        loaders.append(dm.train_dataloader())
        if state is not None:
            loaders[-1].load_state_dict(state)
    return loaders


def test_without_drop_last_every_rank_trains_as_many_steps_and_every_row_each_epoch():
    """10 rows on 4 ranks x 2: the cut tail (10 % 4) left rows 8 and 9 out of every unshuffled epoch. Padded with
    the epoch's first rows to whole steps: 2 steps a rank, rows 0-5 twice. A checkpoint after one step resumes
    exactly; resumed on 3 ranks, the rest (rows 8 and 9) is split over them, padded with rows 0-3."""
    fresh = _loaders(10, 4, 2, drop_last=False, shuffle=False)
    epochs = [[b for loader in fresh for b in loader] for _ in range(2)]
    assert epochs[0] == epochs[1] == [[0, 4], [8, 2], [1, 5], [9, 3], [2, 6], [0, 4], [3, 7], [1, 5]]
    shuffled = _loaders(11, 4, 1, drop_last=False)
    perm = ResumableSampler(11, seed=5).order(0)
    assert [len(loader) for loader in shuffled] == [3] * 4
    assert sorted(i for loader in shuffled for b in loader for i in b) == sorted(perm + perm[:1])
    ranks = _loaders(10, 4, 2, drop_last=False, shuffle=False)
    head = [next(iter(loader)) for loader in ranks]
    state = ranks[0].state_dict()
    assert head + [b for loader in _loaders(10, 4, 2, False, False, state) for b in loader] == [
        [0, 4], [1, 5], [2, 6], [3, 7], [8, 2], [9, 3], [0, 4], [1, 5]]  # fmt: skip
    assert [b for loader in _loaders(10, 3, 2, False, False, state) for b in loader] == [[8, 1], [9, 2], [0, 3]]


@pytest.mark.parametrize("drop_last", [True, False])
def test_one_process_keeps_its_data_order(drop_last):
    """On one rank epoch ``e`` is ``randperm(size)`` seeded ``seed + e``, as before the padding (the demo's data
    order), cut to whole batches with ``drop_last``, else topped up to them with its first rows."""
    (loader,) = _loaders(23, 1, 4, drop_last=drop_last)
    for epoch in range(3):
        perm = torch.randperm(23, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        expected = perm[:20] if drop_last else perm + perm[:1]
        assert [b for b in loader] == [expected[i : i + 4] for i in range(0, len(expected), 4)]


def test_another_batch_size_on_resume_keeps_the_place_and_whole_steps():
    """Saved at 4 prompts a step after one step, resumed at 6 (24 rows): the shares are equal (24), so only the
    recorded batch size tells the position (4) is not one of whole 6-steps: the rest went [6, 6, 6, 2]. It is
    the permutation's next 18 prompts in 3 steps (the last 2 are left out, as an epoch's tail), warned; the
    next epoch is whole. At 3: the same 18 in 6 steps, where it went [3] * 6 + [2]."""
    perm = ResumableSampler(24, seed=5).order(0)
    (old,) = _loaders(24, 1, 4, drop_last=True)
    assert next(iter(old)) == perm[:4]
    for batch, rest in ((6, perm[4:22]), (3, perm[4:22])):
        with pytest.warns(UserWarning, match=rf"steps are 4 prompts x 1 rank\(s\), this run's {batch} x 1"):
            (new,) = _loaders(24, 1, batch, drop_last=True, state=old.state_dict())
        steps = [b for b in new]
        assert steps == [rest[i : i + batch] for i in range(0, len(rest), batch)]
        assert [len(b) for b in new] == [batch] * (24 // batch)


def test_another_shuffle_on_resume_finishes_the_epoch_in_the_checkpoints_order():
    """A shuffled run saved after a step, resumed unshuffled: the rest of epoch 0 went on from index 4 of
    ``0..19``, repeating and skipping prompts; it is the checkpoint's permutation's (warned), then in order."""
    perm = ResumableSampler(20, seed=5).order(0)
    (old,) = _loaders(20, 1, 4, drop_last=True)
    next(iter(old))
    with pytest.warns(UserWarning, match="data.shuffle is True, this run's False: the rest of epoch 0 goes on in"):
        (new,) = _loaders(20, 1, 4, drop_last=True, shuffle=False, state=old.state_dict())
    assert [i for b in new for i in b] == perm[4:]
    assert [i for b in new for i in b] == list(range(20))
    assert new.state_dict()["shuffle"] is False


def test_without_drop_last_every_step_is_whole_on_any_shape():
    """``drop_last: false`` trained the rows past the last whole step in a short step: 5 rows at 4 a step made a
    step of 1 prompt, whose 2 episodes (``num_generations=2``) ``mini_batches=4`` refused at the end of the first
    epoch. The epoch is topped up to whole steps with its first rows instead, on one rank or several, and so is
    the rest of an epoch resumed on another number of ranks or another ``prompts_per_step`` (warned)."""
    (one,) = _loaders(5, 1, 4, drop_last=False)
    perm = ResumableSampler(5, seed=5).order(0)
    assert [b for b in one] == [perm[:4], perm[4:] + perm[:3]]
    two = [list(loader) for loader in _loaders(11, 2, 4, drop_last=False)]  # 16: 2 steps a rank
    assert [[len(b) for b in steps] for steps in two] == [[4, 4], [4, 4]]
    perm = ResumableSampler(11, seed=5).order(0)
    assert sorted(i for steps in two for b in steps for i in b) == sorted(perm + perm[:5])  # 5 rows twice
    (saved,) = _loaders(11, 1, 4, drop_last=False)
    next(iter(saved))  # 4 of 11 taken: 7 left
    for world, batch in ((3, 3), (1, 3), (2, 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # another batch size: warned, as tested above
            resumed = _loaders(11, world, batch, drop_last=False, state=saved.state_dict())
        sizes = [len(b) for loader in resumed for b in loader]
        assert sizes == [batch] * len(sizes) and len(sizes) == world * -(-7 // (world * batch))


def test_an_unset_data_seed_is_the_runs_seed_everything_and_a_checkpoints_is_kept(monkeypatch):
    """``seed_everything`` changed no data order: ``data.seed`` was 0 unless set. Unset, it is the run's
    (``PL_GLOBAL_SEED``, which ``seed_everything`` sets); a resumed run keeps the checkpoint's order."""
    from mmsr.data.datamodule import MMSRDataModule

    def sampler(run_seed: int, **data_args):
        monkeypatch.setenv("PL_GLOBAL_SEED", str(run_seed))
        dm = MMSRDataModule([str(FVQA / "fvqa_dev.jsonl")], prompts_per_step=2, **data_args)
        dm.setup("fit")
        return dm._sampler(1, 0)

    assert list(sampler(0)) == list(sampler(0, seed=0)) == list(sampler(3, seed=0))
    assert list(sampler(1)) != list(sampler(0))
    killed = sampler(1)
    taken = iter(killed)
    head = [next(taken) for _ in range(4)]
    resumed = sampler(2)  # resumed under another seed_everything
    resumed.load_state_dict(killed.state_dict())
    assert head + list(resumed) == list(sampler(1))
