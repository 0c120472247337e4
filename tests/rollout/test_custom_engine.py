"""A user's engine as the README writes it: accepted through ``class_path`` whatever its parameters' names and
annotations, its saved state put back only through ``load_state_dict`` (warned without one), and what its
``generate`` / ``step`` returns checked where the loop receives it, the errors naming the engine and the request."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
from jsonargparse._typehints import implements_protocol

from mmsr.checkpoint import restore_rank_state, rng_state
from mmsr.cli import lightning_cli
from mmsr.rollout.engine import Engine, GenerationOutput, ScriptedEngine
from mmsr.rollout.hf_engine import HFEngine
from tests.rollout.test_incremental import Recording, Stepping, rollout
from tests.rollout.test_loop import ANS, TXT

ROOT = Path(__file__).resolve().parents[2]

# The README's engine, word for word, and one copying the protocol's full annotations (list for Sequence too).
README_ENGINE = """
from mmsr.rollout.engine import GenerationOutput

class MyEngine:
    def generate(self, requests, sampling) -> list[GenerationOutput]:
        return []

    def update_weights(self, named_tensors):
        pass
"""
ANNOTATED_ENGINE = """
from collections.abc import Iterable, Sequence
import torch
from mmsr.rollout.engine import GenerationOutput, GenerationRequest, SamplingParams

class MyEngine:
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        return []

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        pass
"""
LIST_ENGINE = ANNOTATED_ENGINE.replace("requests: Sequence[", "requests: list[")


@pytest.mark.parametrize("future", [False, True], ids=["plain", "future_annotations"])
@pytest.mark.parametrize("kind", ["readme", "annotated", "list"])
def test_a_user_engine_parses_through_mmsr_fit(tmp_path, monkeypatch, kind, future):
    # jsonargparse refused each but the annotated one with the future import: "expected Engine | None"
    source = {"readme": README_ENGINE, "annotated": ANNOTATED_ENGINE, "list": LIST_ENGINE}[kind]
    name = f"user_engine_{kind}_{'future' if future else 'plain'}"  # a module name of its own: none cached
    header = "from __future__ import annotations\n" if future else ""
    (tmp_path / f"{name}.py").write_text(header + textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = tmp_path / "engine.yaml"
    extra.write_text(f"model:\n  init_args:\n    engine:\n      class_path: {name}.MyEngine\n")
    cli = lightning_cli(["-c", str(ROOT / "configs" / "smoke.yaml"), "-c", str(extra)], run=False, parse_only=True)
    assert cli.config["model"]["init_args"]["engine"]["class_path"] == f"{name}.MyEngine"


def test_the_shipped_engines_still_implement_the_protocol():
    assert implements_protocol(HFEngine, Engine) and implements_protocol(ScriptedEngine, Engine)
    assert not implements_protocol(GenerationOutput, Engine)  # a class without the methods is still refused


class StateOnly:
    def state_dict(self):
        return {"updates": 3}


class Stateful(StateOnly):
    def load_state_dict(self, state):
        self.loaded = state


def test_an_engine_state_without_load_state_dict_is_warned_not_dropped_silently():
    ranks = [{"rng": rng_state(), "engine": {"updates": 3}}]
    with pytest.warns(UserWarning, match="holds the state of StateOnly .* but StateOnly has no load_state_dict"):
        restore_rank_state(ranks, 0, 1, StateOnly())
    engine = Stateful()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restore_rank_state(ranks, 0, 1, engine)
        restore_rank_state([{"rng": rng_state(), "engine": None}], 0, 1, StateOnly())  # nothing saved: nothing to say
    assert engine.loaded == {"updates": 3}


class Tuples(ScriptedEngine):
    def generate(self, requests, sampling):
        return [(o.token_ids, o.logprobs) for o in super().generate(requests, sampling)]


class OneShort(ScriptedEngine):
    def generate(self, requests, sampling):
        return super().generate(requests, sampling)[:-1]


class LogprobsShort(ScriptedEngine):
    def generate(self, requests, sampling):
        return [GenerationOutput(o.token_ids, o.logprobs[:-1], o.finish) for o in super().generate(requests, sampling)]


class NotAList(ScriptedEngine):
    def generate(self, requests, sampling):
        return iter(super().generate(requests, sampling))


@pytest.mark.parametrize(("cls", "message"), [
    (Tuples, r"engine Tuples on request '{0}#0': returned a tuple, not a GenerationOutput"),
    (OneShort, r"engine OneShort.generate returned 1 outputs for 2 requests; request '{1}#0' has none"),
    (LogprobsShort, r"engine LogprobsShort on request '{0}#0': returned \d+ token ids and \d+ log-probs"),
    (NotAList, r"engine NotAList.generate returned a list_iterator, not a list"),
], ids=["tuples", "one_short", "logprobs_short", "not_a_list"])  # fmt: skip
def test_a_broken_generate_is_named_where_the_loop_receives_it(tiny_policy, fvqa_samples, cls, message):
    # before: 'tuple' object has no attribute 'token_ids'; zip() argument 2 is shorter; a tensor size error in collate
    samples = fvqa_samples[:2]
    engine = cls({s.id: [ANS] for s in samples}, tiny_policy.tokenizer)
    with pytest.raises(ValueError, match=message.format(samples[0].id, samples[1].id)):
        rollout(engine, tiny_policy, samples, Recording())


class BadOutputStep(Stepping):
    def step(self):
        return [(t, (o.token_ids, o.logprobs)) for t, o in super().step()]


class UnknownTicketStep(Stepping):
    def step(self):
        return [(f"x{t}", o) for t, o in super().step()]


class ShortSubmit(Stepping):
    def submit(self, requests, sampling):
        return super().submit(requests, sampling)[:-1]


class RepeatedTicket(Stepping):
    def submit(self, requests, sampling):
        return ["same" for _ in super().submit(requests, sampling)]


@pytest.mark.parametrize(("cls", "message"), [
    (ShortSubmit, r"engine ShortSubmit.submit returned 1 tickets for 2 requests: it returns one ticket per request"),
    (RepeatedTicket, r"engine RepeatedTicket.submit returned ticket 'same', unhashable or already taken"),
], ids=["one_short", "repeated"])  # fmt: skip
def test_a_broken_submit_is_named_where_the_loop_receives_it(tiny_policy, fvqa_samples, cls, message):
    # before: zip() argument 2 is shorter than argument 1; a repeated ticket dropped the first episode's turn
    engine = cls({s.id: [ANS] for s in fvqa_samples[:2]}, tiny_policy.tokenizer, step_s=0)
    with pytest.raises(ValueError, match=message):
        rollout(engine, tiny_policy, fvqa_samples[:2], Recording())


@pytest.mark.parametrize(("cls", "message"), [
    (BadOutputStep, r"engine BadOutputStep on request '{0}#0': returned a tuple, not a GenerationOutput"),
    (UnknownTicketStep, r"engine UnknownTicketStep.step returned \('xt0', .*not a \(ticket, GenerationOutput\)"),
], ids=["tuple_output", "unknown_ticket"])  # fmt: skip
def test_a_broken_step_is_named_where_the_loop_receives_it(tiny_policy, fvqa_samples, cls, message):
    # before: 'tuple' object has no attribute 'token_ids'; KeyError: 'xt0'
    sample = fvqa_samples[0]
    engine = cls({sample.id: [TXT, ANS]}, tiny_policy.tokenizer, step_s=0)
    with pytest.raises(ValueError, match=message.format(sample.id)):
        rollout(engine, tiny_policy, [sample], Recording())
