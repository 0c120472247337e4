"""Forced turn openings: how the fixed workflows (direct answer, RAG) run on the unchanged rollout loop.

``ForcedTurnsEngine`` wraps any engine. For a turn with a ``ForcedTurn`` spec it writes the spec's
text into the assistant turn itself instead of asking the model:
- a *complete* forced turn (``close=None``) is the whole turn, e.g. ``<search><img></search>``: the
  model is not called, and the loop executes the action as if the model had written it;
- an *opening* (``close`` set), e.g. ``<text_search>``, is followed by the model's own tokens,
  sampled with ``close`` as the only stop string; if the model ends its turn without writing
  ``close``, its end-of-turn token is replaced by ``close`` so the loop can parse the action. A model
  that writes the opening again itself (the direct-answer prompt asks for ``<answer>`` tags) has it kept
  once: ``<answer><answer>x</answer>`` would grade as ``<answer>x`` (spec extraction), not ``x``.
Turns without a spec are the model's alone. Forced tokens get log-prob 0; evaluation never trains on
them (they would carry loss-mask 1 in a ``Trajectory``, so this engine is not for training).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from mmsr.rollout.engine import Engine, GenerationOutput, GenerationRequest, SamplingParams


@dataclass(frozen=True)
class ForcedTurn:
    """``text`` opens (or, with ``close=None``, is) the assistant turn; ``close`` ends the model's part."""

    text: str
    close: str | None = None


class ForcedTurnsEngine:
    """An ``Engine`` that forces the start (or all) of chosen turns; see the module docstring.

    Args:
        inner: the engine that samples the model's tokens.
        tokenizer: the policy's tokenizer (forced text is tokenized once with it).
        turns: ``turn index -> ForcedTurn``.
        eos_ids: end-of-turn token ids the inner engine may end a turn with.
    """

    def __init__(self, inner: Engine, tokenizer, turns: Mapping[int, ForcedTurn], eos_ids: Iterable[int]) -> None:
        self.inner, self.turns, self.eos_ids, self.tokenizer = inner, dict(turns), set(eos_ids), tokenizer
        self.ids = {t: tokenizer.encode(f.text, add_special_tokens=False) for t, f in self.turns.items()}
        self.close_ids = {t: tokenizer.encode(f.close, add_special_tokens=False) for t, f in self.turns.items() if f.close}

    def bind(self, policy) -> None:
        if hasattr(self.inner, "bind"):
            self.inner.bind(policy)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.inner.update_weights(named_tensors)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        by_stop: dict[tuple[str, ...], list[int]] = {}  # requests sampled together share stop strings
        for i, r in enumerate(requests):
            spec = self.turns.get(r.turn)
            if spec is not None and spec.close is None:
                outputs[i] = GenerationOutput(list(self.ids[r.turn]), [0.0] * len(self.ids[r.turn]), "stop")
            else:
                by_stop.setdefault((spec.close,) if spec else sampling.stop, []).append(i)
        for stop, idx in by_stop.items():
            inner = [self._continue(requests[i], sampling) for i in idx]
            for i, out in zip(idx, self.inner.generate(inner, replace(sampling, stop=stop))):
                outputs[i] = self._finish(requests[i].turn, out)
        return outputs  # type: ignore[return-value]

    def _continue(self, r: GenerationRequest, sampling: SamplingParams) -> GenerationRequest:
        prefix = self.ids.get(r.turn, [])
        budget = (r.max_tokens or sampling.max_tokens) - len(prefix)
        return replace(r, input_ids=tuple(r.input_ids) + tuple(prefix), max_tokens=max(budget, 1))

    def _finish(self, turn: int, out: GenerationOutput) -> GenerationOutput:
        prefix = [] if self._repeats_opening(turn, out.token_ids) else self.ids.get(turn, [])
        ids, lps, finish = prefix + list(out.token_ids), [0.0] * len(prefix) + list(out.logprobs), out.finish
        if turn in self.close_ids and finish == "eos":
            if ids and ids[-1] in self.eos_ids:
                ids, lps = ids[:-1], lps[:-1]
            ids, lps, finish = ids + self.close_ids[turn], lps + [0.0] * len(self.close_ids[turn]), "stop"
        return GenerationOutput(ids, lps, finish)

    def _repeats_opening(self, turn: int, ids: Sequence[int]) -> bool:
        """Whether the model's own tokens begin (after whitespace) with the turn's forced opening."""
        spec = self.turns.get(turn)
        return spec is not None and self.tokenizer.decode(list(ids)).lstrip().startswith(spec.text)
