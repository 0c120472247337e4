"""A step makes exactly ``ppo_epochs x mini_batches`` optimizer updates (what ``trainer.max_steps`` and the
progress count), each on a near-equal part of the step's episodes, or says why it cannot."""

from types import SimpleNamespace

import pytest

from mmsr.train.update import PolicyUpdate, UpdateSettings


def parts(episodes: int, mini_batches: int, ppo_epochs: int = 1) -> list[list[int]]:
    update = PolicyUpdate(None, UpdateSettings(mini_batches=mini_batches, ppo_epochs=ppo_epochs, kl_coef=0.0,
                                               old_logprobs="engine"))  # fmt: skip
    seen = []
    update._optimizer_step = lambda trajs, idx, *rest: seen.append(idx) or {"train/loss": 1.0}
    totals = update.update([object()] * episodes, None, None, SimpleNamespace(global_step=0))  # names skipped updates
    assert totals == {"train/loss": 1.0}  # the mean over updates
    return seen


def test_every_update_gets_a_part_when_the_episodes_do_not_divide():
    assert parts(6, 4) == [[0, 1], [2, 3], [4], [5]]  # torch.chunk gave 3 parts: [0, 1], [2, 3], [4, 5]
    assert parts(64, 4) == [list(range(i, i + 16)) for i in range(0, 64, 16)]
    assert parts(5, 2, ppo_epochs=2) == [[0, 1, 2], [3, 4]] * 2


def test_fewer_episodes_than_mini_batches_is_an_error():
    with pytest.raises(ValueError, match="mini_batches=4 needs at least as many episodes a step on each rank; this step has 3"):
        parts(3, 4)
