"""``TrajectoryLogger``'s records hold each trajectory's own reward and advantage, and only rank 0 writes them
(a fake trainer and a hand-made ``StepRollout``: no run needed)."""

from types import SimpleNamespace

import torch

from mmsr.callbacks.trajectory_logger import TrajectoryLogger
from mmsr.data.sample import Sample
from mmsr.report.records import read_records
from mmsr.rollout.actions import Answer
from mmsr.rollout.trajectory import Trajectory, Turn
from mmsr.train.step import StepRollout


def rollout() -> StepRollout:
    """One group of two answers: the right one rewarded 1, the wrong 0; their centred advantages +-0.7071."""
    trajs = [Trajectory(f"s{i}", 0, [1, 2], [0, 1], [0.0, -1.0], [], 1, [Turn("t", Answer("a"), (1, 2))]) for i in range(2)]
    return StepRollout(trajs, [Sample("s0", "q", None, "a")], torch.tensor([1.0, 0.0]), torch.tensor([0.7071, -0.7071]),
                       [{"correct": 1.0}, {"correct": 0.0}])  # fmt: skip


def fake_trainer(tmp_path, rank_zero: bool) -> SimpleNamespace:
    """Step 0 of a run without a logger (its files go to ``default_root_dir``), due under any schedule."""
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0))
    return SimpleNamespace(is_global_zero=rank_zero, fit_loop=loop, global_step=1, loggers=[], default_root_dir=str(tmp_path),
                           log_every_n_steps=1, should_stop=False, fast_dev_run=False)  # fmt: skip


def test_records_hold_each_trajectorys_reward_and_advantage():
    """The reward is the reward, not the advantage: the two differ wherever a group's mean or spread is not 0 and 1."""
    records = TrajectoryLogger().records(rollout(), step=0, global_step=1)
    assert [r.reward for r in records] == [1.0, 0.0]
    assert [r.advantage for r in records] == [float(torch.tensor(0.7071)), float(torch.tensor(-0.7071))]


def test_only_rank_0_writes_the_records(tmp_path):
    """Every rank runs the callback: the others would append their own records to the run directory's file too."""
    logger, module = TrajectoryLogger(), SimpleNamespace(last_rollout=rollout())
    logger.on_train_batch_end(fake_trainer(tmp_path / "rank1", rank_zero=False), module, None, None, 0)
    assert not (tmp_path / "rank1").exists()
    logger.on_train_batch_end(fake_trainer(tmp_path / "rank0", rank_zero=True), module, None, None, 0)
    assert [r.reward for r in read_records(tmp_path / "rank0" / logger.filename)] == [1.0, 0.0]  # the same call writes on rank 0
