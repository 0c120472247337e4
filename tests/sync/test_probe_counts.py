"""The probe's checks against an engine that hands back the wrong number of values: a ``StaleWeightsError``
(the engine is not serving the trainer's policy), which ``WeightSync`` puts through ``agree`` like any failed
probe, never a shape error that one rank raises alone while the others wait in their next collective."""

import dataclasses
import re

import pytest
import torch

import mmsr.sync
from mmsr.rollout.engine import GenerationOutput
from mmsr.sync import StaleWeightsError, WeightSync, probe_inputs, verify_sampling, verify_sync
from mmsr.sync.probe import trainer_logits
from tests.test_sync import CopyEngine


class ShortScores(CopyEngine):
    """Scores the probe one token short (e.g. an engine that drops a token of the prompt)."""

    def score(self, input_ids, vision=()):
        return super().score(input_ids, vision)[:-1]


class LongScores(CopyEngine):
    """Scores the probe one token too many (e.g. an engine that adds a token to the prompt)."""

    def score(self, input_ids, vision=()):
        return [*super().score(input_ids, vision), 0.0]


class ShortLogprobs(CopyEngine):
    """Continues the probe with one log-prob fewer than tokens; keeps its last outputs."""

    def generate(self, requests, sampling):
        self.last = [dataclasses.replace(o, logprobs=o.logprobs[:-1]) for o in super().generate(requests, sampling)]
        return self.last


class OutOfVocabulary(CopyEngine):
    """Continues the probe with its last token replaced by an id ``past`` the trainer's last (``vocab - 1``)."""

    past = 6

    def generate(self, requests, sampling):
        out = super().generate(requests, sampling)
        vocab = self.copy.model.get_input_embeddings().num_embeddings
        return [dataclasses.replace(o, token_ids=[*o.token_ids[:-1], vocab - 1 + self.past]) for o in out]


class AtVocabulary(OutOfVocabulary):
    """The first id outside: ids run 0 .. vocab - 1, the embedding cannot look up ``vocab`` itself."""

    past = 1


class NoTokens(CopyEngine):
    """Continues the probe with nothing: nothing compared is no proof."""

    def generate(self, requests, sampling):
        return [dataclasses.replace(o, token_ids=[], logprobs=[]) for o in super().generate(requests, sampling)]


class TooMany(CopyEngine):
    """Continues the probe one token (and log-prob) past what it was asked for."""

    def generate(self, requests, sampling):
        out = super().generate(requests, sampling)
        return [dataclasses.replace(o, token_ids=[*o.token_ids, o.token_ids[-1]], logprobs=[*o.logprobs, o.logprobs[-1]])
                for o in out]  # fmt: skip


@pytest.mark.parametrize("engine_type, off", [(ShortScores, -1), (LongScores, 1)])
def test_an_engine_that_scores_one_token_too_few_or_many_is_stale(trainer, engine_type, off):
    ids, vision = probe_inputs(trainer)
    n = len(ids) - 1  # tokens 1.. are scored
    with pytest.raises(StaleWeightsError, match=rf"engine scored {n + off} tokens .* where the trainer scored {n}\b"):
        verify_sync(trainer, engine_type(trainer), ids, 1e-3, vision)


def test_an_engine_with_fewer_logprobs_than_tokens_is_stale_after_the_trainers_forward(trainer):
    engine = ShortLogprobs(trainer)  # copied before the hook: it counts the trainer's forwards only
    forwards = []
    trainer.model.register_forward_hook(lambda *_: forwards.append(1))
    ids, vision = probe_inputs(trainer)
    with pytest.raises(StaleWeightsError, match="log-probs") as raised:
        verify_sampling(trainer, engine, ids, 1e-3, vision)
    (out,) = engine.last
    assert f"{len(out.token_ids)} tokens and {len(out.token_ids) - 1} log-probs" in str(raised.value)
    assert forwards == [1]  # under FSDP2 the forward is collectives: every rank runs it, whatever it finds


@pytest.mark.parametrize("engine_type", [ShortScores, ShortLogprobs])
def test_weight_sync_puts_a_count_mismatch_through_agree(trainer, monkeypatch, engine_type):
    verdicts, real = [], mmsr.sync.agree
    monkeypatch.setattr(mmsr.sync, "agree", lambda error, device: verdicts.append(error) or real(error, device))
    sync = WeightSync(verify_every=1)
    with pytest.raises(StaleWeightsError) as raised:
        sync(trainer, engine_type(trainer))
    assert verdicts == [raised.value]  # all ranks learn of it, as of a stale probe
    assert sync.last_sampling_check is not None or engine_type is ShortLogprobs  # both checks ran
    assert sync.last_check is not None or engine_type is ShortScores


@pytest.mark.parametrize("engine_type, reason", [
    (OutOfVocabulary, r"ids \[\d+\] outside"),
    (AtVocabulary, r"ids \[(\d+)\] outside the trainer's vocabulary of \1\)"),
    (TooMany, r"9 tokens and 9 log-probs \(asked for 8"),
    (NoTokens, "continued the probe with 0 tokens and 0 log-probs"),
])  # fmt: skip
def test_an_out_of_vocabulary_extra_or_missing_token_is_stale_after_the_trainers_forward(trainer, engine_type, reason):
    engine = engine_type(trainer)
    forwards = []
    trainer.model.register_forward_hook(lambda *_: forwards.append(1))
    ids, vision = probe_inputs(trainer)
    with pytest.raises(StaleWeightsError, match=reason):  # not an IndexError in the embedding, on one rank
        verify_sampling(trainer, engine, ids, 1e-3, vision, tokens=8)
    assert forwards == [1]


class NaNScores(CopyEngine):
    """Scores and samples the probe with NaN log-probs: weights loaded as garbage."""

    def score(self, input_ids, vision=()):
        return [float("nan")] * len(super().score(input_ids, vision))

    def generate(self, requests, sampling):
        return [dataclasses.replace(o, logprobs=[float("nan")] * len(o.logprobs)) for o in super().generate(requests, sampling)]


def test_an_engine_answering_nan_is_stale_and_a_nan_tolerance_is_refused(trainer):
    # ``nan > tolerance`` is False: both checks passed such an engine, and a NaN tolerance turned them off
    ids, vision = probe_inputs(trainer)
    with pytest.raises(StaleWeightsError, match="scoring"):
        verify_sync(trainer, NaNScores(trainer), ids, 1e-3, vision)
    with pytest.raises(StaleWeightsError, match="greedy sampling"):
        verify_sampling(trainer, NaNScores(trainer), ids, 1e-3, vision, tokens=4)
    for tolerance in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="tolerance finite and > 0"):
            WeightSync(tolerance=tolerance)


class NotGreedy(CopyEngine):
    """Reports each token's log-prob under the synced weights, right, but samples the 5th likeliest token, not the
    argmax: e.g. a sampler that ignores ``temperature=0``."""

    def generate(self, requests, sampling):
        (request,) = requests
        ids, logprobs = list(request.input_ids), []
        for _ in range(sampling.max_tokens):
            logp = torch.log_softmax(trainer_logits(self.copy, ids, request.vision, banned=True)[-1], -1)
            token = int(logp.topk(5).indices[-1])
            ids, logprobs = ids + [token], logprobs + [float(logp[token])]
        return [GenerationOutput(ids[len(request.input_ids) :], logprobs, "length")]


def test_an_engine_with_the_right_log_probs_but_not_the_greedy_token_is_stale(trainer):
    ids, vision = probe_inputs(trainer)
    with pytest.raises(StaleWeightsError, match=r"greedy sampling .* below the trainer's argmax") as raised:
        verify_sampling(trainer, NotGreedy(trainer), ids, 1e-3, vision, tokens=3)
    mean_diff = float(re.search(r"mean \|dlogp\| (\S+)", str(raised.value)).group(1))
    assert mean_diff < 1e-5  # its log-probs are right: only the argmax clause catches it



class GreedyButOnce(CopyEngine):
    """Greedy, with each token's log-prob right, except at its 2nd token: there the likeliest token more than
    ``below`` under the argmax (that gap kept in ``gap``). One flipped token of a continuation: a mean hides it."""

    def __init__(self, policy, below: float):
        super().__init__(policy)
        self.below, self.gap = below, None

    def generate(self, requests, sampling):
        (request,) = requests
        ids, logprobs = list(request.input_ids), []
        for i in range(sampling.max_tokens):
            logp = torch.log_softmax(trainer_logits(self.copy, ids, request.vision, banned=True)[-1], -1)
            gaps = logp.max() - logp
            token = int(gaps.masked_fill(gaps <= self.below, float("inf")).argmin()) if i == 1 else int(logp.argmax())
            self.gap = float(gaps[token]) if i == 1 else self.gap
            ids, logprobs = ids + [token], logprobs + [float(logp[token])]
        return [GenerationOutput(ids[len(request.input_ids) :], logprobs, "length")]


def test_one_token_off_the_argmax_by_more_than_the_tolerance_is_stale(trainer):
    ids, vision = probe_inputs(trainer)
    tolerance = 0.2  # the tiny model's runner-up tokens lie ~0.5 under its argmax
    engine = GreedyButOnce(trainer, below=tolerance)
    with pytest.raises(StaleWeightsError, match=r"greedy sampling .* below the trainer's argmax"):
        verify_sampling(trainer, engine, ids, tolerance, vision, tokens=4)
    assert tolerance < engine.gap <= 4 * tolerance  # the flip's gap averaged over the 4 tokens is within it
