"""What ``GRPOModule`` refuses or warns of about its parts before it builds anything (an engine shorter than an
episode, an offered tool nothing serves), and what its ranks tell each other when one stops on an error
(``GRPOModule.stop_every_rank``)."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn

from mmsr.reward.judge import JudgeRefused, refusal_in
from mmsr.rollout.engine import Engine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.tools.base import FatalToolError
from mmsr.tools.spec import Tool


def refuse_short_engine(engine: Engine | None, rollout: RolloutSettings) -> None:
    """Refuse an engine whose context (``max_model_len``) is shorter than an episode's: it failed mid-rollout, at
    the first context past it, in vLLM's words, naming neither the request nor either setting."""
    refuse_short_context(type(engine).__name__, getattr(engine, "max_model_len", None), rollout)


def refuse_short_context(engine: str, limit: int | None, rollout: RolloutSettings) -> None:
    """``refuse_short_engine`` on an engine's class name and ``max_model_len`` (``None``: no such limit), which
    ``mmsr plan`` reads from a config without starting the engine."""
    if limit is not None and limit < rollout.max_context_tokens:
        raise ValueError(f"{engine}(max_model_len={limit}) is below RolloutSettings.max_context_tokens="
                         f"{rollout.max_context_tokens}: episodes would outgrow the engine's context mid-rollout; raise "
                         "max_model_len or lower max_context_tokens")  # fmt: skip


def unserved_tools(loop: RolloutLoop) -> list[str]:
    """The tools the prompt offers (declared, with a per-episode limit above 0) that nothing answers: ``None``, or a
    ``Tool`` with neither a backend nor a ``__call__`` of its own. Each of their calls is a failure observation."""
    def served(tool: object) -> bool:
        bare = isinstance(tool, Tool) and tool.backend is None and type(tool).__call__ is Tool.__call__
        return tool is not None and not bare

    return [s.name for s in loop.specs if loop.settings.limit(s) > 0 and not served(loop.tools.get(s.name))]


def warn_unserved_tools(loop: RolloutLoop) -> None:
    """Warn (rank 0, once a fit) of ``unserved_tools``, naming the setting to add. Not refused: tests and ablations
    train on the failure observations on purpose; but a recipe launched without its tool snippet trained for
    hours on "The search failed (no text_search tool is configured)" without a word."""
    for name in unserved_tools(loop):
        if loop.tools.get(name) is None:  # MMSearch-R1's pair, declared from the module's own two arguments
            snippet = " (e.g. -c configs/tools/web_text_search.yaml)" if name == "text_search" else ""
            fix = f"set model.{name}{snippet}, or model.rollout.{name}_limit: 0"
        else:
            fix = f"give its model.tools entry a backend, or set model.rollout.tool_limits: {{{name}: 0}}"
        rank_zero_warn(f"GRPOModule: the prompt offers {name}, but no backend serves it: every {name} call the "
                       f"policy makes comes back as a failed search and the run trains on that; {fix}")  # fmt: skip


def told_other_ranks(error: Exception) -> tuple[str, str]:
    """What the other ranks are told of the ``error`` this rank stops on (``stopped_elsewhere`` rebuilds it there):
    ``("judge", the refusal)`` for a judge's refusal however a reward wrapped it, ``("tool", "Type: error")`` for a
    tool's ``FatalToolError``, ``("other", "Type: error")`` for any other."""
    if (refusal := refusal_in(error)) is not None:
        return "judge", str(refusal)
    return "tool" if isinstance(error, FatalToolError) else "other", f"{type(error).__name__}: {error}"


def stopped_elsewhere(rank: int, told: tuple[str, str]) -> Exception:
    """The error a rank stops on when ``rank`` stopped on one (``told_other_ranks``): of the same kind where it has
    one (a refused judge, a tool's fatal error), naming ``rank`` and its message."""
    kind, message = told
    if kind == "judge":
        return JudgeRefused(f"rank {rank}'s judge refused, so every rank stops: {message}")
    if kind == "tool":
        return FatalToolError(f"rank {rank}'s tool stopped the run, so every rank stops: {message}")
    return RuntimeError(f"rank {rank} stopped: {message}")
