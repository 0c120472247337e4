"""The narrow interface between the rollout loop and whatever generates tokens.

An engine takes token contexts (with their images) and returns sampled token ids with their
log-probs. It never sees text it must re-tokenize, so the ids it returns are the ids trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from mmsr.models.vision import VisionInput
from mmsr.rollout.actions import STOP_STRINGS


@dataclass(frozen=True)
class SamplingParams:
    """Per-turn sampling settings.

    Attributes:
        temperature: 0 means greedy; log-probs are of ``softmax(logits / temperature)`` (temperature
            1 when greedy), the same distribution the trainer scores.
        top_p, top_k: nucleus / top-k filtering (1.0 / 0 disable them).
        max_tokens: most tokens sampled in one turn.
        stop: generation stops right after any of these strings is completed.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = STOP_STRINGS

    def __post_init__(self) -> None:
        # Out of range the engines disagree (vLLM refuses top_p=0, HFEngine filtered every token out and
        # drew id 0), so none of them sees such a value. A NaN fails every comparison: refused too.
        limits = [("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
                  ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 disables it)"),
                  ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 is greedy)"),
                  ("max_tokens", self.max_tokens, self.max_tokens >= 1, ">= 1")]  # fmt: skip
        bad = [f"{name}={value!r} (must be {rule})" for name, value, ok, rule in limits if not ok]
        if bad:
            raise ValueError(f"SamplingParams: {'; '.join(bad)}")


@dataclass(frozen=True)
class GenerationRequest:
    """One context to continue.

    Attributes:
        input_ids: ``[L]`` the whole context with image tokens expanded.
        vision: the context's images in order.
        key: the trajectory's id (``sample_id#k``), for scripted engines, logs and sampling streams.
        turn: index of the assistant turn being generated (0-based).
        max_tokens: a per-request cap (remaining context budget), below ``SamplingParams.max_tokens``;
            ``None``: none. At least 1 (``turn_budget``): the loop always leaves room for a token.
        stream: the rollout this request belongs to (``RolloutLoop`` counts its runs); with ``key`` and
            ``turn`` it picks the request's sampling stream (``mmsr.rollout.sampling``).
    """

    input_ids: Sequence[int]
    vision: Sequence[VisionInput] = ()
    key: str = ""
    turn: int = 0
    max_tokens: int | None = None
    stream: int = 0


@dataclass(frozen=True)
class GenerationOutput:
    """Sampled continuation: ``token_ids`` ``[K]`` and their ``logprobs`` ``[K]``.

    ``finish``: ``"stop"`` (a stop string completed), ``"eos"`` (end-of-turn token sampled, kept in
    ``token_ids``) or ``"length"`` (token budget hit: the turn is truncated).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish: Literal["stop", "eos", "length"]


class Engine(Protocol):
    """What the loop needs from a generation engine:

    - ``generate(requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]``: one
      batched generation, one output per request in their order (``generated`` checks what comes back);
    - ``update_weights(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None``: load the trainer's weights.

    Any class with these two methods is one, whatever its parameters' names and annotations: they are positional
    and ``Any`` here because jsonargparse checks a config's ``class_path`` against this protocol and wants an
    implementation's names and annotations to equal the protocol's (it refused the README's
    ``generate(self, requests, sampling) -> list[GenerationOutput]``, and the exact annotations above in a module
    without ``from __future__ import annotations``). The typed view is the checked one: ``generated`` and
    ``checked_output`` return ``list[GenerationOutput]`` / ``GenerationOutput``."""

    def generate(self, requests: Any, sampling: Any, /) -> Any: ...

    def update_weights(self, named_tensors: Any, /) -> Any: ...


class IncrementalEngine(Protocol):
    """An engine that takes requests while others are generating and hands each one back the moment its
    turn ends (vLLM's continuous batching): no turn waits for the slowest of a batch, and a request
    submitted between two steps joins the running batch at the next one."""

    def submit(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[str]:
        """Queue ``requests``; returns one ticket per request, unique among those in flight."""
        ...

    def step(self) -> list[tuple[str, GenerationOutput]]:
        """Advance the queued requests (at least one decode step) and return the ``(ticket, output)``
        of every request that finished."""
        ...

    def cancel(self, tickets: Iterable[str]) -> None:
        """Drop submitted requests that have not finished (a rollout that failed part way)."""
        ...


class WholeBatches:
    """``IncrementalEngine`` over an engine that only has ``generate`` (``HFEngine``, ``ScriptedEngine``):
    a step generates everything submitted since the last step as one batch, in submission order."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.queue: list[tuple[list[str], Sequence[GenerationRequest], SamplingParams]] = []
        self.submitted = 0

    def submit(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[str]:
        tickets = [str(self.submitted + i) for i in range(len(requests))]
        self.submitted += len(requests)
        self.queue.append((tickets, requests, sampling))
        return tickets

    def step(self) -> list[tuple[str, GenerationOutput]]:
        queued, self.queue = [q for q in self.queue if q[1]], []
        return [pair for tickets, requests, sampling in queued
                for pair in zip(tickets, generated(self.engine, requests, sampling), strict=True)]  # fmt: skip

    def cancel(self, tickets: Iterable[str]) -> None:
        drop = set(tickets)
        self.queue = [([t for t in ts if t not in drop], [r for t, r in zip(ts, rs) if t not in drop], sampling)
                      for ts, rs, sampling in self.queue]  # fmt: skip


def engine_name(engine: object) -> str:
    """The engine's class: what the errors about what it returned say."""
    return type(engine).__qualname__


def generated(engine: Engine, requests: Sequence[GenerationRequest],
              sampling: SamplingParams) -> list[GenerationOutput]:  # fmt: skip
    """``[len(requests)]`` ``engine.generate(requests, sampling)``, checked (``checked_output``): anything but a list
    of one ``GenerationOutput`` per request is a ValueError naming the engine and a request. A user's engine that
    returned one output short failed in the loop as ``zip() argument 2 is shorter than argument 1``."""
    outputs, name = engine.generate(requests, sampling), engine_name(engine)
    if not isinstance(outputs, (list, tuple)):
        raise ValueError(f"engine {name}.generate returned a {type(outputs).__name__}, not a list of one "
                         f"GenerationOutput per request ({len(requests)} requests)")  # fmt: skip
    if len(outputs) != len(requests):
        missing = f"; request {requests[len(outputs)].key!r} has none" if len(outputs) < len(requests) else ""
        raise ValueError(f"engine {name}.generate returned {len(outputs)} outputs for {len(requests)} requests"
                         f"{missing}: it returns one GenerationOutput per request, in their order")  # fmt: skip
    return [checked_output(engine, r.key, out) for r, out in zip(requests, outputs)]


def submitted(engine: IncrementalEngine, requests: Sequence[GenerationRequest], sampling: SamplingParams,
              in_flight: Container) -> list[Hashable]:  # fmt: skip
    """``engine.submit(requests, sampling)``'s tickets, checked: one per request, each hashable, none repeated nor
    among those ``in_flight``; else a ValueError naming the engine. Tickets one short failed as ``zip() argument 2
    is shorter than argument 1``, and a repeated ticket lost an episode without a word (its turn never came back)."""
    tickets, name = engine.submit(requests, sampling), engine_name(engine)
    if not isinstance(tickets, (list, tuple)) or len(tickets) != len(requests):
        got = len(tickets) if isinstance(tickets, (list, tuple)) else f"a {type(tickets).__name__}, not a list of"
        raise ValueError(f"engine {name}.submit returned {got} tickets for {len(requests)} requests: it returns "
                         "one ticket per request, in their order")  # fmt: skip
    seen: set[Hashable] = set()
    for ticket in tickets:
        if not isinstance(ticket, Hashable) or ticket in seen or ticket in in_flight:
            raise ValueError(f"engine {name}.submit returned ticket {ticket!r:.60}, unhashable or already taken: each "
                             "ticket names one request among those in flight")  # fmt: skip
        seen.add(ticket)
    return list(tickets)


def checked_output(engine: object, key: str, output: object) -> GenerationOutput:
    """``output``, which ``engine`` returned for request ``key``, if it is a ``GenerationOutput`` with one log-prob
    per token id; else a ValueError naming both. A tuple failed in the loop as ``'tuple' object has no attribute
    'token_ids'``, log-probs one short as a tensor size error in the trainer's batch, neither naming the engine."""
    where = f"engine {engine_name(engine)} on request {key!r}"
    if not isinstance(output, GenerationOutput):
        raise ValueError(f"{where}: returned a {type(output).__name__}, not a "
                         "GenerationOutput(token_ids, logprobs, finish) (mmsr.rollout.engine)")  # fmt: skip
    ids, lps = output.token_ids, output.logprobs
    if not isinstance(ids, Sized) or not isinstance(lps, Sized) or len(lps) != len(ids):
        count = [len(v) if isinstance(v, Sized) else repr(v) for v in (ids, lps)]
        raise ValueError(f"{where}: returned {count[0]} token ids and {count[1]} log-probs; "
                         "a GenerationOutput has the log-prob of each sampled token, in their order")  # fmt: skip
    return output


def incremental(engine: Engine | IncrementalEngine) -> IncrementalEngine:
    """``engine`` itself when it takes requests one by one (``submit``, ``step``, ``cancel``), else ``WholeBatches``."""
    if all(callable(getattr(engine, method, None)) for method in ("submit", "step", "cancel")):
        return engine
    return WholeBatches(engine)


def turn_budget(request: GenerationRequest, sampling: SamplingParams) -> int:
    """Most tokens ``request`` may sample: ``sampling.max_tokens`` under the request's own cap.

    Every engine checks its requests with this before any work. An empty context has nothing to continue
    (batched, its row would attend only to padding), and a cap below 1 is refused as vLLM refuses
    ``max_tokens < 1`` (0 is a cap, not "unset": it must not become ``sampling.max_tokens``).
    """
    if not len(request.input_ids):
        raise ValueError(f"request {request.key!r}: empty prompt (input_ids has no token to continue)")
    if request.max_tokens is None:
        return sampling.max_tokens
    if request.max_tokens < 1:
        raise ValueError(f"request {request.key!r}: max_tokens={request.max_tokens}, must be >= 1 (or None: no cap)")
    return min(sampling.max_tokens, request.max_tokens)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """End index of the earliest completed stop string in ``text``, or None."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


def _lookup(script: dict[str, list[str]], request: GenerationRequest) -> str:
    turns = script.get(request.key) or script.get(request.key.rsplit("#", 1)[0])
    if turns is None:
        raise KeyError(f"ScriptedEngine has no script for {request.key!r}")
    return turns[min(request.turn, len(turns) - 1)]


class ScriptedEngine:
    """Replays scripted turn texts, tokenized with the policy's tokenizer (tests, warm-start data).

    Args:
        script: ``script(request) -> text`` for the turn to produce, or a mapping
            ``key -> [turn texts]`` (key ``sample_id#k``, or ``sample_id`` for every k).
            Text is cut after the first stop string, or before the first ``eos_token``, whichever comes
            first, as a real engine would (an eos in the text is sampled there and ends the turn, "eos").
        tokenizer: turns scripted text into ids; ``bind(policy)`` sets it when omitted.
        eos_token: ends the turn ("eos", counted as sampled): where the text first spells it, else appended
            when the turn has no stop string.
        logprob: the log-prob reported for every scripted token.
        record: keep every request in ``requests`` (tests inspect them). A warm start turns it off: each
            request holds its context's pixel tensors, ~5 MB a step in the CPU demo, kept for the whole run.
    """

    def __init__(self, script: Callable[[GenerationRequest], str] | dict[str, list[str]], tokenizer=None,
                 eos_token: str = "<|im_end|>", logprob: float = -1.0, record: bool = True) -> None:  # fmt: skip
        self.script = script if callable(script) else (lambda r: _lookup(script, r))
        self.eos_token, self.logprob, self.record = eos_token, logprob, record
        self.tokenizer = None
        if tokenizer is not None:
            self.bind_tokenizer(tokenizer)
        self.requests: list[GenerationRequest] = []
        self.weight_updates = 0

    def bind_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.convert_tokens_to_ids(self.eos_token)

    def bind(self, policy) -> None:
        if self.tokenizer is None:
            self.bind_tokenizer(policy.tokenizer)

    def _one(self, request: GenerationRequest, sampling: SamplingParams) -> GenerationOutput:
        text = self.script(request)
        cut, eos = first_stop(text, sampling.stop), text.find(self.eos_token)
        if eos >= 0 and (cut is None or eos < cut):
            # a real engine samples the eos token and stops there: what the script writes after it is never sampled
            text, cut = text[:eos], None
        ids = self.tokenizer.encode(text[:cut] if cut else text, add_special_tokens=False)
        finish = "stop" if cut else "eos"
        if not cut:
            ids = ids + [self.eos_id]
        budget = turn_budget(request, sampling)
        if len(ids) > budget:
            ids, finish = ids[:budget], "length"
        return GenerationOutput(ids, [self.logprob] * len(ids), finish)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        for r in requests:
            turn_budget(r, sampling)  # refuse the whole call, as the other engines do, before recording any
        if self.record:
            self.requests.extend(requests)
        return [self._one(r, sampling) for r in requests]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for _ in named_tensors:
            pass
        self.weight_updates += 1
