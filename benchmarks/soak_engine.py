"""The soak's engine: every episode searches, so a tiny random-weight policy drives the search tools.

A random-weight policy almost never writes a search action (the smoke config logs ``tools/*_calls`` of 0), so
a soak of the search path with it alone would call no tool. ``AlwaysSearch`` wraps the run's engine and writes
the first two assistant turns itself: ``<search><img></search>``, then ``<text_search>QUERY</text_search>``;
later turns are the policy's own, sampled by the wrapped engine (on contexts that hold the returned
thumbnails and summaries). Even episodes ask ``soak <sample id>``, the same every epoch (the search server's
cache answers it once it has a result); odd ones add the rollout and episode, a new query on every call, so
half the text searches reach the provider at every step.

Forced tokens carry log-prob 0 and are trained on like sampled ones: the trainer scores them itself, only
``is_correction`` would read the engine's log-probs (leave it off). Weight-sync probes are not forced.
Load it by ``class_path: benchmarks.soak_engine.AlwaysSearch`` with the repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mmsr.rollout.engine import Engine, GenerationOutput, GenerationRequest, SamplingParams
from mmsr.sync.probe import PROBE_KEY


def forced_turn(request: GenerationRequest) -> str | None:
    """The text of the request's turn when the soak writes it (turns 0 and 1), else None."""
    if request.key == PROBE_KEY or request.turn > 1:
        return None
    if request.turn == 0:
        return "<search><img></search>"
    sample, _, episode = request.key.rpartition("#")
    fresh = episode.isdigit() and int(episode) % 2 == 1
    query = f"soak {sample} r{request.stream} e{episode}" if fresh else f"soak {sample}"
    return f"<text_search>{query}</text_search>"


class AlwaysSearch:
    """An ``Engine`` that forces an image search and a text search into every episode (module docstring).

    Args:
        inner: the engine that samples the policy's own turns (``HFEngine``).
    """

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.tokenizer: Any = None

    def bind(self, policy: Any) -> None:
        if hasattr(self.inner, "bind"):
            self.inner.bind(policy)
        self.tokenizer = policy.tokenizer

    def state_dict(self) -> dict:
        return self.inner.state_dict() if hasattr(self.inner, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.inner, "load_state_dict"):
            self.inner.load_state_dict(state)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.inner.update_weights(named_tensors)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        own = []
        for i, request in enumerate(requests):
            text = forced_turn(request)
            if text is None:
                own.append(i)
            else:
                outputs[i] = self._forced(text, request.max_tokens or sampling.max_tokens)
        for i, out in zip(own, self.inner.generate([requests[i] for i in own], sampling) if own else []):
            outputs[i] = out
        return outputs  # type: ignore[return-value]

    def _forced(self, text: str, budget: int) -> GenerationOutput:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > budget:  # cut like a real engine; the loop then marks the turn truncated
            return GenerationOutput(ids[:budget], [0.0] * budget, "length")
        return GenerationOutput(ids, [0.0] * len(ids), "stop")
