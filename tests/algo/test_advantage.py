import math

import pytest
import torch

from mmsr.algo import group_advantages


def test_grpo_single_group_hand_worked():
    # rewards [1, 0, 0, 1]: mean 0.5, deviations +-0.5
    # Bessel variance = (4 * 0.25) / (4 - 1) = 1/3, std = 0.57735
    # advantage = +-0.5 / 0.57735 = +-0.866025
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(adv, torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-5, rtol=0)


def test_drgrpo_single_group_hand_worked():
    # r - mean = r - 0.5
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), "drgrpo")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_rloo_single_group_hand_worked():
    # r=1: others [0, 0, 1] mean 1/3 -> 1 - 1/3 = 2/3
    # r=0: others [1, 0, 1] mean 2/3 -> 0 - 2/3 = -2/3
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), "rloo")
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))


# rewards [1, 2, 3, 10, 20] in groups [7, 3, 7, 3, 5] (unsorted, non-contiguous):
#   group 7 = {1, 3}: mean 2, deviations -1, +1, std sqrt((1 + 1) / 1) = 1.41421
#   group 3 = {2, 10}: mean 6, deviations -4, +4, std sqrt((16 + 16) / 1) = 5.65685
#   group 5 = {20}: alone -> 0
# grpo:   -1/1.41421, -4/5.65685, +1/1.41421, +4/5.65685, 0 = -0.70711, -0.70711, 0.70711, 0.70711, 0
# drgrpo: -1, -4, 1, 4, 0
# rloo:   1 - 3 = -2, 2 - 10 = -8, 3 - 1 = 2, 10 - 2 = 8, 0
@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("grpo", [-0.707107, -0.707107, 0.707107, 0.707107, 0.0]),
        ("drgrpo", [-1.0, -4.0, 1.0, 4.0, 0.0]),
        ("rloo", [-2.0, -8.0, 2.0, 8.0, 0.0]),
    ],
)
def test_non_contiguous_groups_hand_worked(estimator, expected):
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0])
    groups = torch.tensor([7, 3, 7, 3, 5])
    adv = group_advantages(rewards, groups, estimator)
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_singleton_groups_get_zero(estimator):
    adv = group_advantages(torch.tensor([3.0, -1.0, 0.5]), torch.tensor([0, 1, 2]), estimator)
    assert torch.equal(adv, torch.zeros(3))


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_all_equal_rewards_give_zero_not_nan(estimator):
    adv = group_advantages(torch.full((6,), 0.7), torch.tensor([0, 0, 0, 1, 1, 1]), estimator)
    assert torch.equal(adv, torch.zeros(6))


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("reward, n", [(0.91, 8), (0.9, 8), (0.1, 8), (0.81, 16)])
def test_a_group_of_equal_rewards_gets_zero_whatever_float32_rounds(estimator, reward, n):
    # The mean of eight float32 0.91s is an ulp off 0.91; GRPO's dev / (std + eps) made it +0.056 for every
    # episode (0.9: -0.056, 0.1: -0.0074), a push whose sign came from rounding, not from the rewards.
    rewards = torch.full((n,), reward)
    adv = group_advantages(torch.cat([rewards, torch.tensor([1.0, 0.0])]), torch.tensor([0] * n + [1, 1]), estimator)
    assert torch.equal(adv[:n], torch.zeros(n)) and adv[n] > 0 > adv[n + 1]


def test_grpo_large_offset_is_accurate_in_float32():
    # 1e4 + [0, 1]: deviations +-0.5, std sqrt(0.5) = 0.70711 -> +-0.70711
    adv = group_advantages(torch.tensor([1e4, 1e4 + 1]), torch.tensor([0, 0]))
    torch.testing.assert_close(adv, torch.tensor([-0.707107, 0.707107]), atol=1e-5, rtol=0)


def test_integer_rewards_give_float_advantages():
    adv = group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]), "drgrpo")
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))


def test_empty_batch():
    adv = group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert adv.shape == (0,)


def _loop_reference(rewards, groups, estimator, eps):
    out = []
    for i in range(len(rewards)):
        members = [j for j in range(len(rewards)) if groups[j] == groups[i]]
        group = torch.tensor([rewards[j] for j in members], dtype=torch.float64)
        if len(members) == 1:
            out.append(0.0)
        elif estimator == "grpo":
            out.append(((rewards[i] - group.mean()) / (group.std() + eps)).item())
        elif estimator == "drgrpo":
            out.append((rewards[i] - group.mean()).item())
        else:
            others = [rewards[j] for j in members if j != i]
            out.append(rewards[i] - sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("seed", range(5))
def test_vectorized_matches_python_loop(estimator, seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=gen))
    groups = torch.randint(0, max(1, n // 3), (n,), generator=gen) * 5 - 7  # sparse, negative ids
    rewards = torch.randn(n, generator=gen, dtype=torch.float64)
    if seed % 2:
        rewards = (rewards > 0).double()  # binary rewards produce all-equal groups
    adv = group_advantages(rewards, groups, estimator)
    expected = _loop_reference(rewards.tolist(), groups.tolist(), estimator, 1e-6)
    torch.testing.assert_close(adv, expected)
    assert not math.isnan(adv.sum().item())


def test_errors():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), "ppo")
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.zeros(2), torch.zeros(2))
