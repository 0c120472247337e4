"""Seconds and counts of a rollout: how long it generated, how long it waited for tools, and how
much of the tools' time generation hid (``rollout/overlap``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RolloutStats:
    """Seconds and counts of one ``RolloutLoop.run`` call.

    Attributes:
        generate_s: seconds in ``engine.generate``.
        tools_s: seconds the rollout waited for tool calls: with nothing to generate, or for calls due
            (``RolloutSettings.tool_rejoin_steps``) while turns still generate.
        tool_busy_s: seconds during which at least one tool call was running.
    """

    generate_s: float = 0.0
    tools_s: float = 0.0
    tool_busy_s: float = 0.0
    tool_calls: dict[str, int] = field(default_factory=lambda: {"image_search": 0, "text_search": 0})  # by tool name
    tool_failures: int = 0
    tool_latency_s: list[float] = field(default_factory=list)
    tool_spans: list[tuple[float, float]] = field(default_factory=list)
    sampled_tokens: int = 0

    @property
    def overlap(self) -> float:
        """The share of tool time hidden behind generation (1: the rollout never waited for a tool)."""
        # waiting for a call is timed around it, so with nothing hidden it can exceed the call's own span
        return max(0.0, 1.0 - self.tools_s / self.tool_busy_s) if self.tool_busy_s > 0 else 1.0


def covered_seconds(spans: Sequence[tuple[float, float]]) -> float:
    """Seconds covered by the union of ``(start, end)`` spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total
