"""Micro-batches: every sequence once, within the token budget, cut where lengths drop so that the
padded tokens plus a fixed cost per pass are least (checked against every possible cut)."""

import itertools
import random

from mmsr.train.batch import PASS_COST_TOKENS, pack_by_tokens


def cost(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) + PASS_COST_TOKENS for b in batches)


def cheapest_cut(lengths: list[int], budget: int) -> int:
    """The least cost of any packing into runs of the longest-first order, by trying every set of cuts."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        runs, run = [], [order[0]]
        for i, cut in zip(order[1:], cuts):
            runs, run = (runs + [run], [i]) if cut else (runs, run + [i])
        runs.append(run)
        if all(len(r) == 1 or len(r) * lengths[r[0]] <= budget for r in runs):
            best = min(best or cost(runs, lengths), cost(runs, lengths))
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
        assert cost(batches, lengths) == cheapest_cut(lengths, budget), (lengths, budget)
