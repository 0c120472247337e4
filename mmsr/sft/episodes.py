"""What the warm start's episodes trained of their teachers' turns: the shares cut at a token limit or ended
before the last turn (``sft/truncated_episodes``, ``sft/unfinished_episodes``), and a warning naming the row and
the setting to raise, once a cause on each rank.

A teacher writes its turns without running the loop, so an episode can end before them (a rollout limit, an
unparsed or early-answering turn, a context that is full): those turns then go untrained unless counted here.
"""

from __future__ import annotations

import warnings

import torch

from mmsr.parallel import all_reduce_sums
from mmsr.rollout.loop import RolloutLoop
from mmsr.rollout.trajectory import Trajectory


class EpisodeAccounts:
    """Counts and warns of the episodes of ``loop`` (the warm start's) that did not train all their teacher's turns."""

    def __init__(self, loop: RolloutLoop) -> None:
        self.loop = loop
        self.warned: set[str] = set()  # the causes this rank has warned of

    def counts(self, trajs: list[Trajectory], written: dict[str, list[str]], device: torch.device) -> dict[str, float]:
        """``rollout/turns`` (turns an episode), ``sft/truncated_episodes`` (the share with a teacher turn cut at a
        token limit) and ``sft/unfinished_episodes`` (the share that ended before the teacher's last turn was trained
        whole, cut ones included), over every rank's episodes (rank 0's alone before). Each rank warns of the first
        episode it meets of each cause, naming the row and the setting (``unfinished``)."""
        ended = [self.unfinished(t, len(written[t.sample_id])) for t in trajs]
        for cause, message in filter(None, ended):
            if cause not in self.warned:
                self.warned.add(cause)
                warnings.warn(message, stacklevel=2)
        cut = sum(any(u.truncated for u in t.turns) for t in trajs)
        local = (len(trajs), sum(len(t.turns) for t in trajs), cut, sum(e is not None for e in ended))
        n, turns, cut, unfinished = all_reduce_sums(local, device)
        return {"rollout/turns": turns / n, "sft/truncated_episodes": cut / n, "sft/unfinished_episodes": unfinished / n}

    def unfinished(self, traj: Trajectory, written: int) -> tuple[str, str] | None:
        """``(cause, warning)`` when ``traj`` ended before training the last of the ``written`` teacher turns whole:
        a turn cut at a token limit, or the episode ending early (a rollout limit, an unparsed or early answering
        turn); None when it trained them all."""
        turns, s = traj.turns, self.loop.settings
        if turns and turns[-1].truncated:
            start, end = turns[-1].span
            # the turn's budget is the smaller of its own and the context's room (RolloutLoop._request)
            by_context = s.max_context_tokens - start < s.max_tokens_per_turn
            cause = (f"rollout.max_context_tokens={s.max_context_tokens}" if by_context
                     else f"rollout.max_tokens_per_turn={s.max_tokens_per_turn}")  # fmt: skip
            return cause, (f"the teacher's turn {len(turns)} of {written} of row {traj.sample_id!r} ({end - start} tokens "
                           f"kept) was cut at {cause}: its episode trains the cut turn and ends there "
                           f"(sft/truncated_episodes and sft/unfinished_episodes count them); raise the limit")  # fmt: skip
        if len(turns) >= written:
            return None
        cause, why = self._early_end(traj)
        return cause, (f"row {traj.sample_id!r}: the teacher wrote {written} turns, its episode ended after {len(turns)} "
                       f"({why}): the later turns are not trained (sft/unfinished_episodes counts such episodes)")  # fmt: skip

    def _early_end(self, traj: Trajectory) -> tuple[str, str]:
        """The cause (a setting, or what the teacher wrote) and account of an episode that ended before its teacher's
        last turn, by ``traj.finish_reason``."""
        turns, s, limit = traj.turns, self.loop.settings, f"rollout.max_context_tokens={self.loop.settings.max_context_tokens}"
        if traj.finish_reason == "truncated":  # not a cut turn: the prompt, or an observation, did not fit the context
            what = f"the observation of turn {len(turns)}'s {turns[-1].tool_call.kind} call" if turns else "the prompt"
            return limit, f"{what} did not fit in {limit}, raise it"
        if traj.finish_reason == "max_rounds":
            return f"rollout.max_rounds={s.max_rounds}", f"rollout.max_rounds={s.max_rounds}, raise it"
        action = turns[-1].action
        if traj.finish_reason == "search_limit":
            spec = next(spec for spec in self.loop.specs if spec.name == action.tool)
            return f"{spec.name} limit", (f"turn {len(turns)} called {spec.name} over its limit of {s.limit(spec)} an episode, "
                                          f"raise it: {self._limit_settings(spec.name)}")  # fmt: skip
        if traj.finish_reason == "answer":
            return "answer", f"turn {len(turns)} is an answer, which ends the episode"
        return "no_action", f"turn {len(turns)} is no tool call or answer ({getattr(action, 'reason', action)}): fix the teacher"

    def _limit_settings(self, name: str) -> str:
        """The settings that set tool ``name``'s calls an episode (``RolloutSettings.limit``): ``rollout.tool_limits``,
        and ``rollout.<name>_limit`` where it is set (MMSearch-R1's pair alone has one: naming ``rollout.crop_limit``
        sent the user to a setting that does not exist; set, it overrides the entry's ``limit:``), else the entry's."""
        pair = f"{name}_limit"
        tool_limits = f"rollout.tool_limits: {{{name}: N}}"
        if getattr(self.loop.settings, pair, None) is not None:  # set, it overrides the entry's (and refuses one)
            return f"rollout.{pair} or {tool_limits}"
        return f"limit: in its tools entry or {tool_limits}"
