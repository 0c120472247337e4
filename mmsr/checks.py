"""Range checks of settings, refused before anything is built: every layer's settings (``RolloutSettings``,
``UpdateSettings``, the modules' optimizer arguments) name each field out of range in one error."""

from __future__ import annotations

from collections.abc import Iterable

Limit = tuple[str, object, bool, str]  # (field, value, within range, the rule in words)


def refuse_out_of_range(owner: str, limits: Iterable[Limit]) -> None:
    """Raise one error naming every field out of range (a NaN fails every comparison, so it is refused too).

    Raises:
        ValueError: ``"<owner>: lr=0.0 (must be > 0); ..."``.
    """
    bad = [f"{name}={value!r} (must be {rule})" for name, value, ok, rule in limits if not ok]
    if bad:
        raise ValueError(f"{owner}: {'; '.join(bad)}")
