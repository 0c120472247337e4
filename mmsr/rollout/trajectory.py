"""Typed records the rollout stage produces: one ``Trajectory`` per (prompt, sample index)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmsr.models.vision import VisionInput
from mmsr.rollout.actions import Action
from mmsr.tools.base import ToolResult
from mmsr.tools.spec import MMSEARCH_R1_TOOLS, ToolSpec

__all__ = ["FinishReason", "ToolCall", "Trajectory", "Turn", "VisionInput"]

FinishReason = Literal["answer", "no_action", "max_rounds", "search_limit", "truncated"]


@dataclass
class ToolCall:
    """One executed tool call: what was asked and what came back."""

    kind: str  # the tool's name
    query: str
    result: ToolResult


@dataclass
class Turn:
    """One assistant turn.

    Attributes:
        text: the decoded sampled text (special tokens skipped).
        action: the parsed action.
        span: ``(start, end)`` token positions of the sampled tokens in ``Trajectory.input_ids``.
        truncated: the turn hit its token budget before an action or end-of-turn.
        tool_call: the executed call, if the action was a search that ran.
    """

    text: str
    action: Action
    span: tuple[int, int]
    truncated: bool = False
    tool_call: ToolCall | None = None


@dataclass
class Trajectory:
    """A whole multi-turn episode, exactly as the policy saw and produced it.

    The token ids are the ones fed to the model (never re-tokenized from text), with image tokens
    expanded. Sequences of length L:

    Attributes:
        sample_id: ``Sample.id`` of the prompt.
        group_id: index of the prompt in the step's batch; the GRPO group.
        input_ids: ``[L]`` prompt, sampled turns, templates and observations.
        loss_mask: ``[L]`` 1 on tokens sampled by the policy, 0 elsewhere (prompt, chat scaffolding,
            observations, image tokens).
        logprobs: ``[L]`` the engine's log-prob of each sampled token (0.0 where ``loss_mask`` is 0).
        vision: images in context order (question image first, then every image a tool returned).
        prompt_len: number of tokens of the first prompt.
        turns: the assistant turns in order.
        finish_reason: why the episode ended.
        tools: the tools the episode was rolled out with (their grammar; the format reward reads it).
        context: what the context budget cut or dropped, one line each (``mmsr.rollout.context``).
    """

    sample_id: str
    group_id: int
    input_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    vision: list[VisionInput]
    prompt_len: int
    turns: list[Turn] = field(default_factory=list)
    finish_reason: FinishReason = "no_action"
    tools: tuple[ToolSpec, ...] = MMSEARCH_R1_TOOLS
    context: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def assistant_texts(self) -> list[str]:
        """The assistant turns' texts in order (what the reward reads)."""
        return [t.text for t in self.turns]

    def num_calls(self, tool: str) -> int:
        """Calls of tool ``tool`` that ran."""
        return sum(getattr(t.action, "tool", None) == tool and t.tool_call is not None for t in self.turns)

    @property
    def num_tool_calls(self) -> int:
        """Calls of any tool that ran."""
        return sum(t.tool_call is not None for t in self.turns)

    @property
    def num_image_searches(self) -> int:
        return self.num_calls("image_search")

    @property
    def num_text_searches(self) -> int:
        return self.num_calls("text_search")

    @property
    def num_sampled_tokens(self) -> int:
        return sum(self.loss_mask)
