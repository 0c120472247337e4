"""Micro-batches: every sequence once, within the token budget, cut where lengths drop so that the
padded tokens plus a fixed cost per pass are least (checked against every possible cut)."""

import itertools
import random

import pytest

from mmsr.train.batch import PASS_COST_TOKENS, pack_by_tokens


def cost(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) + PASS_COST_TOKENS for b in batches)


def cheapest_cut(order: list[int], budget: int, cost, size=None) -> float:
    """The least ``cost`` of any packing into runs of ``order`` (a run whose ``size``, by default its cost, is
    over ``budget`` only alone), by trying every set of cuts."""
    size = size or cost
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        runs, run = [], [order[0]]
        for i, cut in zip(order[1:], cuts):
            runs, run = (runs + [run], [i]) if cut else (runs, run + [i])
        runs.append(run)
        if all(len(r) == 1 or size([r]) - PASS_COST_TOKENS <= budget for r in runs):
            best = min(best or cost(runs), cost(runs))
    return best


def test_the_warm_start_batch_splits_where_its_lengths_drop():
    lengths = [234] * 10 + [326] * 5 + [329]  # the CPU demo's warm start: answers at once vs after searching
    assert pack_by_tokens(lengths, 8192) == [[15, 10, 11, 12, 13, 14], list(range(10))]


def test_equal_lengths_take_the_fewest_passes_and_long_ones_their_own():
    assert [len(b) for b in pack_by_tokens([100] * 10, 350)] == [1, 3, 3, 3]
    assert pack_by_tokens([5000, 10, 10], 4096) == [[0], [1, 2]]
    assert pack_by_tokens([], 100) == []


def test_packings_are_complete_within_budget_and_the_cheapest_cut():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([rng.randint(10, 60), rng.randint(200, 900)]) for _ in range(rng.randint(1, 9))]
        budget = rng.randint(300, 3000)
        batches = pack_by_tokens(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in batches)
        longest_first = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        assert cost(batches, lengths) == cheapest_cut(longest_first, budget, lambda b: cost(b, lengths)), (lengths, budget)


def packed_cost(batches: list[list[int]], lengths: list[int], prompts: list[tuple[int, int]], pairs_per_token: float = 0.0,
                tokens: bool = False) -> float:  # fmt: skip
    """Each micro-batch as it runs: its groups' packed rows (a group's prompt once, then its rows' turns) x the
    longest where that saves at least ``PASS_COST_TOKENS`` tokens and costs less than its rows x the longest
    (each way plus its padded rows' pairs x ``pairs_per_token``), else its rows x the longest; that size
    (``tokens``) or its cost with the pairs, plus ``PASS_COST_TOKENS``."""
    total = 0
    for b in batches:
        rows: dict[int, list[int]] = {}
        for i in b:
            rows.setdefault(prompts[i][0], []).append(i)
        packed = [prompts[r[0]][1] + sum(lengths[i] - prompts[i][1] for i in r) for r in rows.values()]
        saved = sum((len(r) - 1) * prompts[r[0]][1] for r in rows.values())
        (n, width), (g, packed_width) = (len(b), max(lengths[i] for i in b)), (len(packed), max(packed))
        pays = saved >= PASS_COST_TOKENS and g * packed_width * (1 + pairs_per_token * packed_width) < n * width * (1 + pairs_per_token * width)
        rows, wide = (g, packed_width) if pays else (n, width)
        total += (rows * wide if tokens else rows * wide * (1 + pairs_per_token * wide)) + PASS_COST_TOKENS
    return total


def random_groups(rng: random.Random) -> tuple[list[int], list[tuple[int, int]]]:
    """GRPO groups of 1-4 episodes: one prompt length per group, each episode its own turns after it."""
    lengths, prompts = [], []
    for g in range(rng.randint(1, 4)):
        prompt = rng.randint(50, 400)
        for _ in range(rng.randint(1, 4)):
            lengths.append(prompt + rng.choice([rng.randint(5, 40), rng.randint(100, 600)]))
            prompts.append((g, prompt))
    order = list(range(len(lengths)))
    rng.shuffle(order)  # episodes arrive in any order
    return [lengths[i] for i in order], [prompts[i] for i in order]


@pytest.mark.parametrize("pairs_per_token", [0.0, 2e-3])
def test_with_packed_rows_a_group_stays_together_and_the_cuts_are_the_cheapest(pairs_per_token):
    rng = random.Random(1)
    for _ in range(150):
        lengths, prompts = random_groups(rng)
        budget = rng.randint(400, 4000)
        batches = pack_by_tokens(lengths, budget, prompts, pairs_per_token)
        cost = lambda b: packed_cost(b, lengths, prompts, pairs_per_token)  # noqa: E731
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        size = lambda b: packed_cost(b, lengths, prompts, pairs_per_token, tokens=True)  # noqa: E731
        assert all(len(b) == 1 or size([b]) - PASS_COST_TOKENS <= budget for b in batches)
        # the order the packing cuts: groups by packed length, each group's rows longest first
        whole = {g: [i for i in range(len(lengths)) if prompts[i][0] == g] for g, _ in prompts}
        key = {g: prompts[rows[0]][1] + sum(lengths[i] - prompts[i][1] for i in rows) for g, rows in whole.items()}
        order = [i for g in sorted(whole, key=lambda g: -key[g]) for i in sorted(whole[g], key=lambda i: -lengths[i])]
        assert cost(batches) == pytest.approx(cheapest_cut(order, budget, cost, size)), (lengths, prompts, budget)


def test_a_group_that_trains_whole_is_budgeted_whole():
    """4 episodes of 4,000 tokens after a 999-token shared prompt: packed, 13,003 tokens fit a 15,000 budget,
    but at 7B sizes (3.08e-5 tokens a pair) they cost 18,207 against 17,968 as whole rows, so they would run
    whole, 16,000 tokens, over the budget. Two pairs, each packed (7,001 tokens, 8,507 with its pairs against
    8,984 whole), cost 17,014; one alone and three packed 4,492 + 13,079."""
    lengths, prompts = [4000] * 4, [(0, 999)] * 4
    assert pack_by_tokens(lengths, 15000, prompts) == [[0, 1, 2, 3]]  # tokens alone: packing pays
    assert pack_by_tokens(lengths, 15000, prompts, 3.0758e-5) == [[0, 1], [2, 3]]
    assert pack_by_tokens(lengths, 16000, prompts, 3.0758e-5) == [[0, 1], [2, 3]]  # whole rows fit, cost more


def test_groups_that_length_would_split_stay_together():
    """Two groups of a 300-token prompt, two direct answers and two searches each: by length, each
    micro-batch holds half of each group (and runs both prompts); packed, a group's rows go together."""
    lengths = [310, 500, 310, 500, 500, 310, 500, 310]
    prompts = [(0, 300), (0, 300), (1, 300), (1, 300), (0, 300), (0, 300), (1, 300), (1, 300)]
    assert [sorted({prompts[i][0] for i in b}) for b in pack_by_tokens(lengths, 2048)] == [[0, 1], [0, 1]]
    assert pack_by_tokens(lengths, 2048, prompts) == [[1, 4, 0, 5, 3, 6, 2, 7]]  # 2 packed rows of 720 tokens
    assert pack_by_tokens(lengths, 1000, prompts) == [[1, 4, 0, 5], [3, 6, 2, 7]]


def test_one_episode_a_group_packs_as_whole_rows():
    rng = random.Random(2)
    for _ in range(100):
        lengths = [rng.randint(10, 900) for _ in range(rng.randint(1, 12))]
        prompts = [(i, rng.randint(1, n)) for i, n in enumerate(lengths)]
        budget = rng.randint(300, 3000)
        assert pack_by_tokens(lengths, budget, prompts) == pack_by_tokens(lengths, budget)
