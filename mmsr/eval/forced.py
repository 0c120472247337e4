"""Forced turn openings: how the fixed workflows (direct answer, RAG) run on the unchanged rollout loop.

``ForcedTurnsEngine`` wraps any engine. For a turn with a ``ForcedTurn`` spec it writes the spec's
text into the assistant turn itself instead of asking the model:
- a *complete* forced turn (``close=None``) is the whole turn, e.g. ``<search><img></search>``: the
  model is not called, and the loop executes the action as if the model had written it;
- an *opening* (``close`` set), e.g. ``<text_search>``, is followed by the model's own tokens,
  sampled with ``close`` as the only stop string; if the model ends its turn without writing
  ``close``, its end-of-turn token is replaced by ``close`` so the loop can parse the action. The
  model's tokens are the forced tag's content, so the action tags it writes itself are dropped and the
  turn's action is the forced one: a query turn answered with ``<answer>x</answer>`` searches ``x`` (it
  had ended RAG's episode after one call, where the workflow always makes both searches), and a forced
  ``<answer>`` the model writes again (the direct-answer prompt asks for the tags) is kept once:
  ``<answer><answer>x</answer>`` would grade as ``<answer>x`` (spec extraction), not ``x``. A turn
  edited so is re-tokenized. A turn with ``question_if_empty`` (RAG's query turn) whose content is empty, or
  only whitespace, action tags and an image tool's argument (``<img>``, ``IMAGE_ARGUMENT``), gets the episode's
  question as its content instead (``questions``, cut to the turn's budget): ``<text_search></text_search>``
  parsed as an empty query and ended RAG's episode after one call, where the workflow always makes two, and a
  query turn of ``<search><img></search>`` searched the text ``<img>``.
The forced tokens count against the turn's budget (``turn_budget``), the opening's and the closing's: the
model samples what they leave, and a turn the budget cuts is still closed, so its action runs (RAG makes its
two searches whatever the query's length, spec §9: a cut query turn had ended the episode after one). An
opening and closing that leave the model no token make the whole turn, the opening cut to the budget and
truncated. Turns without a spec are the model's alone.
Forced and re-tokenized tokens get log-prob 0; evaluation never trains on them (they would carry
loss-mask 1 in a ``Trajectory``, so this engine is not for training).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from mmsr.rollout.engine import (Engine, GenerationOutput, GenerationRequest, SamplingParams, generated,
                                 turn_budget)
from mmsr.tools.spec import IMAGE_SEARCH, ToolSpec


def call_argument(spec: ToolSpec) -> str:
    """The argument of ``spec``'s call as prompts write it (``ToolSpec.call`` without its tags)."""
    return spec.call.removeprefix(f"<{spec.tag}>").removesuffix(spec.stop)


# what an image tool's tag holds (``<img>``, the parser's grammar for every ``"image"`` argument): in a query it is
# no text, so a query of nothing else is empty
IMAGE_ARGUMENT = call_argument(IMAGE_SEARCH)


@dataclass(frozen=True)
class ForcedTurn:
    """``text`` opens (or, with ``close=None``, is) the assistant turn; ``close`` ends the model's part;
    ``question_if_empty``: an empty part becomes the episode's question (an opening only)."""

    text: str
    close: str | None = None
    question_if_empty: bool = False


class ForcedTurnsEngine:
    """An ``Engine`` that forces the start (or all) of chosen turns; see the module docstring.

    Args:
        inner: the engine that samples the model's tokens.
        tokenizer: the policy's tokenizer (forced text is tokenized once with it).
        turns: ``turn index -> ForcedTurn``.
        eos_ids: end-of-turn token ids the inner engine may end a turn with.
        tags: the action tags the loop parses (``answer`` and the tools'); the model's part of a forced
            turn loses them.
        questions: ``sample id -> question`` of the episodes (keys ``<sample id>#<k>``), for the turns with
            ``question_if_empty``.
    """

    def __init__(self, inner: Engine, tokenizer, turns: Mapping[int, ForcedTurn], eos_ids: Iterable[int],
                 tags: Iterable[str] = ("answer", "search", "text_search"),
                 questions: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.inner, self.turns, self.eos_ids, self.tokenizer = inner, dict(turns), set(eos_ids), tokenizer
        self.questions = dict(questions or {})
        self.ids = {t: tokenizer.encode(f.text, add_special_tokens=False) for t, f in self.turns.items()}
        self.close_ids = {t: tokenizer.encode(f.close, add_special_tokens=False) for t, f in self.turns.items() if f.close}
        names = sorted({re.escape(tag) for tag in tags}, key=len, reverse=True)
        self.action_tag = re.compile(rf"</?(?:{'|'.join(names)})>")
        self.no_text = re.compile(rf"(?:{re.escape(IMAGE_ARGUMENT)}|\s)*")  # a body of only these is empty

    def bind(self, policy) -> None:
        if hasattr(self.inner, "bind"):
            self.inner.bind(policy)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.inner.update_weights(named_tensors)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        by_stop: dict[tuple[str, ...], list[int]] = {}  # requests sampled together share stop strings
        for i, r in enumerate(requests):
            spec, budget, forced = self.turns.get(r.turn), turn_budget(r, sampling), self.ids.get(r.turn, [])
            if spec is not None and (spec.close is None or self._room(r.turn, budget) < 1):  # no token for the model
                cut, whole = forced[:budget], spec.close is None and len(forced) <= budget
                outputs[i] = GenerationOutput(cut, [0.0] * len(cut), "stop" if whole else "length")
            else:
                by_stop.setdefault((spec.close,) if spec else sampling.stop, []).append(i)
        for stop, idx in by_stop.items():
            inner = [self._continue(requests[i], sampling) for i in idx]
            for i, out in zip(idx, generated(self.inner, inner, replace(sampling, stop=stop))):  # checked: one each
                outputs[i] = self._finish(requests[i], sampling, out)
        return outputs  # type: ignore[return-value]

    def _room(self, turn: int, budget: int) -> int:
        """The model's tokens in a turn of ``budget``: what the forced opening and closing leave."""
        return budget - len(self.ids.get(turn, [])) - len(self.close_ids.get(turn, []))

    def _continue(self, r: GenerationRequest, sampling: SamplingParams) -> GenerationRequest:
        """``r`` after the turn's opening, capped at what the opening and closing leave of its budget (>= 1)."""
        prefix = self.ids.get(r.turn, [])
        room = self._room(r.turn, turn_budget(r, sampling))
        return replace(r, input_ids=tuple(r.input_ids) + tuple(prefix), max_tokens=room)

    def _finish(self, r: GenerationRequest, sampling: SamplingParams, out: GenerationOutput) -> GenerationOutput:
        """The whole turn: the opening, the model's tokens without action tags (or the question in their place,
        ``question_if_empty``), then ``close`` (room was kept)."""
        turn, spec = r.turn, self.turns.get(r.turn)
        if spec is None:
            return out
        ids, lps = list(out.token_ids), list(out.logprobs)
        if out.finish == "eos" and ids and ids[-1] in self.eos_ids:
            ids, lps = ids[:-1], lps[:-1]
        text = self.tokenizer.decode(ids)
        content = text.split(spec.close, 1)[0] if out.finish == "stop" else text  # a token may run past the stop
        body = self.action_tag.sub("", content)
        closing = self.close_ids[turn]
        if spec.question_if_empty and self.no_text.fullmatch(body):
            ids = self._question_ids(r)[: self._room(turn, turn_budget(r, sampling))]
            lps = [0.0] * len(ids)
        elif out.finish == "stop" and text == body + spec.close:
            closing = []  # closed by the model, with no other tag: its tokens stay as sampled
        elif text != body:
            ids = self.tokenizer.encode(body, add_special_tokens=False)
            lps = [0.0] * len(ids)
        prefix = self.ids[turn]
        return GenerationOutput(prefix + ids + closing, [0.0] * len(prefix) + lps + [0.0] * len(closing), "stop")

    def _question_ids(self, r: GenerationRequest) -> list[int]:
        """The tokens of the question of ``r``'s episode, its action tags dropped (it is a tag's content)."""
        sample_id = r.key.rsplit("#", 1)[0]
        if sample_id not in self.questions:
            raise ValueError(f"episode {r.key!r}: no question for sample {sample_id!r} in ForcedTurnsEngine(questions=...), "
                           f"which turn {r.turn} (question_if_empty) writes when the model's part is empty")  # fmt: skip
        return self.tokenizer.encode(self.action_tag.sub("", self.questions[sample_id]), add_special_tokens=False)
