"""What ``VLLMEngine.bind`` and ``generate`` hand vLLM, checked against a stand-in ``vllm`` module: the
start-up kwargs, the per-request seeds and prompts, the stop ids and the ban. No vLLM is started."""

import copy
import dataclasses
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from PIL import Image

from mmsr.rollout.engine import GenerationRequest, SamplingParams
from mmsr.rollout.sampling import request_seed
from mmsr.rollout.vllm_engine import VLLMEngine
from mmsr.rollout.vllm_inputs import ImageTokenIds
from tests.rollout.test_vllm_engine_cpu import completion

SAMPLE = SamplingParams(temperature=1.0, max_tokens=4)


class FakeLLM:
    """``vllm.LLM`` as far as ``bind`` and ``generate`` use it: the kwargs it started with, and the prompts and
    sampling params (keyword dicts) of each ``generate`` call."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []

    def generate(self, prompts, params, use_tqdm):
        self.calls.append((list(prompts), list(params)))
        return [SimpleNamespace(outputs=[completion([5], "stop", None)]) for _ in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A ``vllm`` module of ``FakeLLM`` and a ``SamplingParams`` that returns its keywords; the environment
    variable ``bind`` sets is put back afterwards."""
    fake, fake_params = ModuleType("vllm"), ModuleType("vllm.sampling_params")
    fake.LLM, fake.SamplingParams = FakeLLM, lambda **kw: kw
    fake_params.RequestOutputKind = SimpleNamespace(FINAL_ONLY="final_only")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", fake_params)
    monkeypatch.setitem(sys.modules, "vllm.triton_utils", None)  # no kernel scan to patch
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")


def bound(policy, **engine_args) -> VLLMEngine:
    """An engine bound to ``policy`` over ``FakeLLM`` (``model`` given, so no config directory is written)."""
    engine = VLLMEngine(model="/m", **engine_args)
    engine.bind(policy)
    assert isinstance(engine.llm, FakeLLM)
    return engine


def seeds(engine, requests) -> list[int]:
    engine.generate(requests, SAMPLE)
    return [p["seed"] for p in engine.llm.calls[-1][1]]


def test_a_generated_prompt_carries_bounds_that_hold_its_images_training_grid(tiny_policy, fake_vllm):
    """``score``'s probe and ``generate``'s requests build their prompts alike: a 1000x10 banner trains at a 2x40
    grid (28x560 pixels, over the policy's max_pixels 112*112); within the policy's bounds alone vLLM re-grids it to
    2x34 and the prompt's image tokens no longer match (see test_vllm_inputs' banner test)."""
    engine = bound(tiny_policy, seed=0)
    v = tiny_policy.process_image(Image.new("RGB", (1000, 10), "gray"))
    assert v.grid_thw == (1, 2, 40) and v.num_tokens == 20
    ids = ImageTokenIds.from_tokenizer(tiny_policy.tokenizer)
    request = GenerationRequest((3, ids.start, *[ids.pad] * 20, ids.end, 4), vision=(v,), key="q#0")
    assert len(engine.generate([request], SAMPLE)) == 1
    ((prompt,), _) = engine.llm.calls[-1]
    assert prompt["prompt_token_ids"] == [3, ids.start, ids.pad, ids.end, 4]
    assert prompt["mm_processor_kwargs"] == {"min_pixels": 56 * 56, "max_pixels": 28 * 560}


def test_requests_are_seeded_by_their_stream_and_keyless_ones_by_call_and_place(tiny_policy, fake_vllm):
    """Each rollout (``stream``) must draw afresh: the same episode key in the next rollout reusing its seed would
    repeat the last rollout's tokens. Requests with no key (probes, evaluation) get a seed per call and position,
    so two of one call do not draw alike, nor the same request in two calls."""
    engine = bound(tiny_policy, seed=3)
    keyed = [GenerationRequest((1, 2, 3), key="q#0", stream=s) for s in (0, 1, 2)]
    assert seeds(engine, keyed) == [request_seed(3, s, "q#0", 0) for s in (0, 1, 2)]
    assert len(set(seeds(engine, keyed))) == 3
    keyless = [GenerationRequest((1, 2, 3)), GenerationRequest((1, 2, 3))]
    first, second = seeds(engine, keyless), seeds(engine, keyless)  # calls 3 and 4 of this engine
    assert first == [request_seed(3, 0, f"call3/{i}", 0) for i in (0, 1)]
    assert second == [request_seed(3, 0, f"call4/{i}", 0) for i in (0, 1)]
    assert len({*first, *second}) == 4


def test_an_unset_seed_is_fixed_at_bind_from_the_runs_seed_everything(tiny_policy, fake_vllm, monkeypatch):
    """The engine's sampling seed is the run's (``PL_GLOBAL_SEED``) as it stands at ``bind``: vLLM starts with it and
    every request is seeded from it, and a later ``seed_everything`` changes neither (a resumed run draws alike)."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    engine = bound(tiny_policy)
    monkeypatch.setenv("PL_GLOBAL_SEED", "9")
    assert engine.seed == 7 and engine.llm.kwargs["seed"] == 7 and engine.state_dict()["seed"] == 7
    assert seeds(engine, [GenerationRequest((1, 2, 3), key="q#0")]) == [request_seed(7, 0, "q#0", 0)]


def test_bind_stops_at_the_end_of_turn_and_eos_and_bans_with_the_full_bias(tiny_policy, fake_vllm):
    """A policy whose tokenizer eos is not <|im_end|> still ends its turns there: vLLM stops at its own eos alone
    unless the request names the others. The image specials get vLLM's strongest bias (-100, e^-100 below float32
    resolution, so it matches the trainer's mask); a weaker one leaves them a probability the trainer gives 0."""
    tokenizer = copy.deepcopy(tiny_policy.tokenizer)
    tokenizer.eos_token = "<|endoftext|>"
    im_end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    assert (im_end, tiny_policy.model.generation_config.eos_token_id) == (2, 2)
    assert eos == tokenizer.get_vocab()["<|endoftext|>"] != 2
    engine = bound(dataclasses.replace(tiny_policy, tokenizer=tokenizer), seed=0)
    assert engine.stop_ids == sorted([2, eos])
    vocab = tiny_policy.tokenizer.get_vocab()
    specials = [vocab[t] for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")]
    assert set(specials) <= set(engine.logit_bias) and set(engine.logit_bias.values()) == {-100.0}
    engine.generate([GenerationRequest((1, 2, 3), key="q#0")], SAMPLE)
    (params,) = engine.llm.calls[-1][1]
    assert params["stop_token_ids"] == sorted([2, eos]) and params["logit_bias"][specials[0]] == -100.0


def test_a_tensor_parallel_engine_is_refused():
    """mmsr's rollout is per rank: a tensor-parallel group's ranks would have to roll out the same prompts in
    lockstep, so anything but 1 is refused before vLLM starts rather than sampling wrongly."""
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2\): only 1 is supported"):
        VLLMEngine(tensor_parallel_size=2).llm_kwargs("/m", "float32", on_gpu=False)


def test_vllm_starts_as_configured_in_the_policys_compute_dtype(tiny_policy, fake_vllm):
    """The context length, batch size, prefix cache and eager mode the run asked for reach vLLM, and a policy with
    fp32 master weights that computes in bf16 samples in bf16 (what the trainer's forwards score)."""
    engine = bound(dataclasses.replace(tiny_policy, compute_dtype=torch.bfloat16), max_model_len=640, max_num_seqs=3,
                   enable_prefix_caching=False, enforce_eager=True, seed=0)  # fmt: skip
    kw = engine.llm.kwargs
    assert (kw["max_model_len"], kw["max_num_seqs"]) == (640, 3)
    assert (kw["enable_prefix_caching"], kw["enforce_eager"]) == (False, True)
    assert tiny_policy.model.dtype == torch.float32 and kw["dtype"] == "bfloat16"
    assert bound(tiny_policy, seed=0).llm.kwargs["dtype"] == "float32"  # no compute dtype: the weights'


def test_generating_nothing_returns_nothing(tiny_policy, fake_vllm):
    """A rank whose rollout has no turn left this round still calls ``generate``: it must return [] rather than
    fail unpacking the empty batch's inputs."""
    engine = bound(tiny_policy, seed=0)
    assert engine.generate([], SAMPLE) == []
