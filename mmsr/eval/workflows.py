"""The paper's three inference workflows, as settings of the one rollout loop.

- ``on-demand``: the MMSearch-R1 prompt; the policy decides whether and how to search.
- ``direct``: no tools; one turn, the direct-answer prompt, and the turn opens with a forced
  ``<answer>`` so a model that ignores tags still gives a parsable answer.
- ``rag``: always image search, then text search (paper Table 5/6 baseline). Turn 1 is forced to
  ``<search><img></search>`` (the model is not asked); the image results come back with the RAG
  prompt asking for a query; turn 2 opens with a forced ``<text_search>`` and the model writes the
  query (an empty one is replaced by the question itself, ``ForcedTurn.question_if_empty``); the text
  results come back and turn 3 opens with a forced ``<answer>`` and the model writes the answer.
  Exactly 2 calls per question, so its search ratio is 100% by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from mmsr.eval.forced import ForcedTurn
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.loop import RolloutSettings
from mmsr.tools.spec import MMSEARCH_R1_TOOLS, ToolSpec, declared

Workflow = Literal["on-demand", "direct", "rag"]
WORKFLOWS: tuple[Workflow, ...] = ("on-demand", "direct", "rag")


@dataclass(frozen=True)
class WorkflowSetup:
    """What the loop runs for one workflow.

    Attributes:
        prompts: the user-side templates.
        settings: episode limits.
        forced: ``turn index -> ForcedTurn`` (empty: the model writes every turn).
        use_tools: whether the search tools are wired in.
        allowed_calls: the most searches a response may make (denominator of the calls search ratio).
    """

    prompts: PromptBuilder
    settings: RolloutSettings
    forced: dict[int, ForcedTurn]
    use_tools: bool
    allowed_calls: int


def limits_for(settings: RolloutSettings, tools: dict[str, object]) -> RolloutSettings:
    """``settings`` whose ``tool_limits`` name only ``tools``' (``mmsr eval --ckpt ... --tools``): the run's limit of a
    tool the evaluation does not load limits nothing, and the loop refuses a name it has not."""
    names = {spec.name for spec in declared(tools)}
    return replace(settings, tool_limits={k: v for k, v in settings.tool_limits.items() if k in names})


def setup(workflow: Workflow, settings: RolloutSettings, prompts: PromptBuilder | None = None,
          specs: tuple[ToolSpec, ...] = MMSEARCH_R1_TOOLS) -> WorkflowSetup:  # fmt: skip
    """The prompts, limits and forced turns of ``workflow``; ``settings``/``prompts`` are on-demand's, ``specs``
    the tools on-demand may call (its allowed calls add up their limits)."""
    if workflow == "on-demand":
        allowed = min(settings.max_rounds - 1, sum(settings.limit(spec) for spec in specs))
        return WorkflowSetup(prompts or PromptBuilder(), settings, {}, True, max(allowed, 0))
    if workflow == "direct":
        # no tools run, and a run's limit of a tool (``tool_limits``) names none the loop has
        one_turn = replace(settings, max_rounds=1, image_search_limit=0, text_search_limit=0, tool_limits={})
        builder = PromptBuilder(round1="direct_answer.txt")
        return WorkflowSetup(builder, one_turn, {0: ForcedTurn("<answer>", "</answer>")}, False, 0)
    if workflow == "rag":
        # its fixed calls, not a run's ``tool_limits`` (which outrank the two fields)
        fixed = replace(settings, max_rounds=3, image_search_limit=1, text_search_limit=1, tool_limits={})
        builder = PromptBuilder("rag_round1.txt", "rag_after_image_search.txt", "rag_after_text_search.txt")
        forced = {0: ForcedTurn("<search><img></search>"),
                  1: ForcedTurn("<text_search>", "</text_search>", question_if_empty=True),
                  2: ForcedTurn("<answer>", "</answer>")}  # fmt: skip
        return WorkflowSetup(builder, fixed, forced, True, 2)
    raise ValueError(f"unknown workflow {workflow!r}; expected one of {WORKFLOWS}")
