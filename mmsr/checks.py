"""Range checks of settings, refused before anything is built: every layer's settings (``RolloutSettings``,
``UpdateSettings``, the modules' optimizer arguments) name each field out of range in one error."""

from __future__ import annotations

import os
from collections.abc import Iterable

Limit = tuple[str, object, bool, str]  # (field, value, within range, the rule in words)


def run_seed(seed: int | None) -> int:
    """A seed setting: ``seed``, or for None the run's ``seed_everything`` (``PL_GLOBAL_SEED``, which Lightning's
    ``seed_everything`` sets; 0 in a run seeded by none), so that a run's seed changes its rollouts (the engines'
    sampling seed) and its prompt order (``data.seed``)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed


def refuse_out_of_range(owner: str, limits: Iterable[Limit]) -> None:
    """Raise one error naming every field out of range (a NaN fails every comparison, so it is refused too).

    Raises:
        ValueError: ``"<owner>: lr=0.0 (must be > 0); ..."``.
    """
    bad = [f"{name}={value!r} (must be {rule})" for name, value, ok, rule in limits if not ok]
    if bad:
        raise ValueError(f"{owner}: {'; '.join(bad)}")
