"""Sampling settings and requests out of range are refused, the same way by every engine, before any work."""

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from mmsr.models.policy import Policy
from mmsr.rollout.engine import GenerationRequest, SamplingParams, ScriptedEngine, turn_budget
from mmsr.rollout.hf_engine import HFEngine, sample_tokens
from mmsr.rollout.vllm_engine import VLLMEngine
from mmsr.rollout.vllm_inputs import GridImages, ImageTokenIds, ImageTokenMismatch

PROMPT = (5, 6, 7, 8)


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.5), ("top_p", math.nan), ("top_k", -1),
     ("temperature", -0.1), ("temperature", math.nan), ("max_tokens", 0)],
)  # fmt: skip
def test_sampling_params_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams: {field}={value!r} \(must be"):
        SamplingParams(**{field: value})


def test_sampling_params_at_the_edges_of_their_range_are_kept():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=1)
    SamplingParams(temperature=2.0, top_p=1e-9, top_k=1)


def test_top_p_filter_keeps_the_most_likely_token():
    """Even a top_p that keeps no probability mass (SamplingParams refuses it) leaves the top token: the
    filter once set every logit to -inf, and the Gumbel argmax of such a row is id 0."""
    logits = torch.zeros(2, 10)
    logits[:, 7] = 20.0
    seeds, positions = torch.tensor([1, 2]), torch.tensor([0, 0])
    for top_p in (0.0, 1e-9):
        tokens, logprobs = sample_tokens(logits, SimpleNamespace(temperature=1.0, top_p=top_p, top_k=0), seeds, positions)
        assert tokens.tolist() == [7, 7] and torch.isfinite(logprobs).all()


def test_turn_budget_reads_a_zero_cap_as_a_cap():
    sampling = SamplingParams(max_tokens=8)
    assert turn_budget(GenerationRequest(PROMPT), sampling) == 8
    assert turn_budget(GenerationRequest(PROMPT, max_tokens=3), sampling) == 3
    assert turn_budget(GenerationRequest(PROMPT, max_tokens=30), sampling) == 8
    for cap in (0, -2):
        with pytest.raises(ValueError, match=rf"request 'q#0': max_tokens={cap}, must be >= 1"):
            turn_budget(GenerationRequest(PROMPT, key="q#0", max_tokens=cap), sampling)


@pytest.mark.parametrize(
    ("bad", "message"),
    [(GenerationRequest(PROMPT, key="capped#0", max_tokens=0), r"request 'capped#0': max_tokens=0"),
     (GenerationRequest((), key="empty#0"), r"request 'empty#0': empty prompt")],
)  # fmt: skip
def test_hf_engine_refuses_a_bad_request_alone_or_batched(tiny_policy, bad, message):
    engine = HFEngine(max_batch_size=1)
    engine.bind(tiny_policy)
    sampling = SamplingParams(max_tokens=2, stop=())
    for batch in ([bad], [GenerationRequest(PROMPT, key="ok#0"), bad]):
        with pytest.raises(ValueError, match=message):
            engine.generate(batch, sampling)
    assert engine.calls == 0  # refused before a call's sampling stream was drawn
    assert len(engine.generate([GenerationRequest(PROMPT, key="ok#0", max_tokens=1)], sampling)[0].token_ids) == 1


def test_scripted_engine_refuses_a_bad_request_before_recording_any(tiny_policy):
    engine = ScriptedEngine(lambda r: "<answer>x</answer>", tiny_policy.tokenizer)
    for bad in (GenerationRequest(PROMPT, key="capped#0", max_tokens=0), GenerationRequest((), key="empty#0")):
        with pytest.raises(ValueError, match=bad.key):
            engine.generate([GenerationRequest(PROMPT, key="ok#0"), bad], SamplingParams())
    assert engine.requests == []


def test_vllm_engine_refuses_a_bad_request_before_submitting_any():
    added = []
    engine = VLLMEngine()
    engine.llm = SimpleNamespace(llm_engine=SimpleNamespace(add_request=lambda *a: added.append(a)))
    for bad in (GenerationRequest(PROMPT, key="capped#0", max_tokens=0), GenerationRequest((), key="empty#0")):
        with pytest.raises(ValueError, match=bad.key):
            engine.submit([GenerationRequest(PROMPT, key="ok#0"), bad], SamplingParams())
    assert added == [] and not engine.in_flight and engine.calls == 0


def framed(tokenizer, *runs: int) -> list[int]:
    """A context of ``<|vision_start|> <|image_pad|>*n <|vision_end|>`` per run, between text tokens."""
    pad, start, end = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])
    return [5] + [t for n in runs for t in (start, *[pad] * n, end, 6)]


@pytest.fixture(scope="module")
def images(tiny_policy):
    """A 16-token and a 4-token image (112x112 and 56x56 within the tiny model's pixel bounds)."""
    big, small = (tiny_policy.process_image(Image.new("RGB", (side, side), "red")) for side in (112, 56))
    assert (big.num_tokens, small.num_tokens) == (16, 4)
    return big, small


@pytest.mark.parametrize(
    ("runs", "which", "message"),
    [((4,), (), r"1 <\|image_pad\|> runs but 0 images"),  # pads and no vision input: a TypeError in the model
     ((15,), ("big",), r"image 0 .* needs 16 <\|image_pad\|> tokens but .* has 15"),
     ((), ("big",), r"0 <\|image_pad\|> runs but 1 images"),
     ((16, 4), ("small", "big"), r"image 0 .* needs 4")],  # the right count, in the wrong order
    ids=["pads-without-images", "short-run", "images-without-pads", "wrong-order"],
)  # fmt: skip
def test_hf_engine_refuses_image_pads_that_disagree_with_the_images(tiny_policy, images, runs, which, message):
    """Refused up front, naming the request, as VLLMEngine refuses them (``collapse_image_tokens``)."""
    named = dict(zip(("big", "small"), images))
    bad = GenerationRequest(framed(tiny_policy.tokenizer, *runs), tuple(named[w] for w in which), key="img#0")
    good = GenerationRequest(framed(tiny_policy.tokenizer, 16, 4), images, key="ok#0")
    engine = HFEngine()
    engine.bind(tiny_policy)
    sampling = SamplingParams(max_tokens=2, stop=())
    for batch in ([bad], [good, bad]):
        with pytest.raises(ImageTokenMismatch, match=rf"request 'img#0': .*{message}"):
            engine.generate(batch, sampling)
    assert engine.calls == 0 and len(engine.generate([good], sampling)[0].token_ids) == 2


def test_hf_engine_text_only_policy_refuses_images(tiny_policy, images):
    engine = HFEngine()
    engine.bind(Policy(tiny_policy.model, tiny_policy.tokenizer))  # no image processor: text-only
    with pytest.raises(ImageTokenMismatch, match=r"request 'img#0': a text-only policy got a context with 1 images"):
        engine.generate([GenerationRequest(framed(tiny_policy.tokenizer, 16), images[:1], key="img#0")], SamplingParams())


def test_hf_engine_keeps_turns_within_the_model_context(tiny_policy, monkeypatch):
    """As vLLM with ``max_model_len``: a prompt that leaves no room for a token is refused, a longer turn is
    cut ("length") when the context is full. The limit is ``max_position_embeddings``."""
    monkeypatch.setattr(tiny_policy.model.config.get_text_config(), "max_position_embeddings", 10)
    engine = HFEngine()
    engine.bind(tiny_policy)
    greedy = SamplingParams(temperature=0.0, max_tokens=5, stop=())
    with pytest.raises(ValueError, match=r"request 'full#0': its prompt of 10 tokens .* context of 10 \(max_position"):
        engine.generate([GenerationRequest((5,) * 8, key="ok#0"), GenerationRequest((5,) * 10, key="full#0")], greedy)
    assert engine.calls == 0
    (out,) = engine.generate([GenerationRequest((5,) * 8, key="ok#0")], greedy)
    assert len(out.token_ids) == 2 and out.finish == "length"


@pytest.mark.parametrize("form", [int, list])
def test_hf_engine_stops_on_the_generation_config_eos_ids(tiny_policy, monkeypatch, form):
    """vLLM stops on the eos ids of the model's generation config (an int or a list); so does HFEngine."""
    # the tiny models' (and so the demo's) eos id is already the policy's: their turns end where they did
    assert tiny_policy.model.generation_config.eos_token_id in tiny_policy.stop_token_ids()
    engine = HFEngine()
    engine.bind(tiny_policy)
    # sampled, not greedy (the random tiny model repeats one token): the draws of a keyed request are its stream's
    request, sampling = GenerationRequest(PROMPT, key="e#0"), SamplingParams(max_tokens=8, stop=())
    (free,) = engine.generate([request], sampling)
    k = next(i for i, t in enumerate(free.token_ids) if i > 0 and t not in free.token_ids[:i])
    eos = free.token_ids[k] if form is int else [tiny_policy.tokenizer.eos_token_id, free.token_ids[k]]
    monkeypatch.setattr(tiny_policy.model.generation_config, "eos_token_id", eos)
    (cut,) = engine.generate([request], sampling)
    assert cut.finish == "eos" and cut.token_ids == free.token_ids[: k + 1] and cut.logprobs == free.logprobs[: k + 1]
    # one set of ids for every consumer (HFEngine, VLLMEngine's stop list, eval's forced turns): the policy's
    assert set([eos] if form is int else eos) <= tiny_policy.stop_token_ids()


def test_vllm_engine_names_the_request_whose_image_pads_disagree(tiny_policy, images):
    """As HFEngine: ``engine_input``'s check names the request (a bare message says nothing of whose context,
    among a rollout's), and is made before any request is submitted or a call's sampling stream is drawn."""
    tok, added = tiny_policy.tokenizer, []
    engine = VLLMEngine()  # bind() needs vLLM: set what it would
    engine.llm = SimpleNamespace(llm_engine=SimpleNamespace(add_request=lambda *a: added.append(a)))
    engine.image_ids, engine.grid_images, engine.mm_kwargs = ImageTokenIds.from_tokenizer(tok), GridImages(14), {}
    bad = GenerationRequest(framed(tok, 15), images[:1], key="img#0")
    good = GenerationRequest(framed(tok, 16, 4), images, key="ok#0")
    for batch in ([bad], [good, bad]):
        with pytest.raises(ImageTokenMismatch, match=r"request 'img#0': image 0 .* needs 16 <\|image_pad\|> tokens"):
            engine.submit(batch, SamplingParams())
    engine.image_ids = None  # a text-only policy
    with pytest.raises(ImageTokenMismatch, match=r"request 'img#0': a text-only policy got a context with 1 images"):
        engine.submit([GenerationRequest(framed(tok, 16), images[:1], key="img#0")], SamplingParams())
    assert added == [] and not engine.in_flight and engine.calls == 0
