"""Rewards: the MMSearch-R1 reward and its parts, plus the ``Reward`` protocol."""

from mmsr.reward.answer import exact_match, extract_answer, normalize_answer, sub_exact_match
from mmsr.reward.base import Reward, WeightedRewards
from mmsr.reward.format import format_ok, penalized_count, search_count
from mmsr.reward.mmsearch_r1 import MMSearchR1Reward, mmsearch_r1_reward

__all__ = [
    "MMSearchR1Reward",
    "Reward",
    "WeightedRewards",
    "exact_match",
    "extract_answer",
    "format_ok",
    "mmsearch_r1_reward",
    "normalize_answer",
    "penalized_count",
    "search_count",
    "sub_exact_match",
]
