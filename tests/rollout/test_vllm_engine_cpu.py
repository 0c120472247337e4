"""VLLMEngine's configuration and output mapping, without vLLM installed."""

import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

from mmsr.rollout.engine import GenerationRequest, SamplingParams
from mmsr.rollout.vllm_engine import VLLMEngine, expanded_prompt_logprobs, to_output
from mmsr.rollout.vllm_inputs import GridImages, ImageTokenMismatch


def completion(ids, finish_reason, stop_reason):
    logprobs = [{t: SimpleNamespace(logprob=-0.5 * (k + 1)), 99: SimpleNamespace(logprob=-9.0)} for k, t in enumerate(ids)]
    return SimpleNamespace(token_ids=ids, logprobs=logprobs, finish_reason=finish_reason, stop_reason=stop_reason)


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason", "expected"),
    [("stop", "</search>", "stop"), ("stop", None, "eos"), ("stop", 7, "eos"), ("length", None, "length")],
)
def test_finish_reasons_map_to_the_loops(finish_reason, stop_reason, expected):
    out = to_output(completion([5, 6, 7], finish_reason, stop_reason))
    assert out.finish == expected and out.token_ids == [5, 6, 7]
    assert out.logprobs == [-0.5, -1.0, -1.5]  # the sampled token's entry, not another candidate's


def test_gpu_memory_features_only_on_gpu():
    engine = VLLMEngine(enable_sleep_mode=True, gpu_memory_utilization=0.4, cpu_kv_cache_gb=0.5)
    gpu = engine.llm_kwargs("/m", "bfloat16", on_gpu=True)
    assert gpu["gpu_memory_utilization"] == 0.4 and gpu["enable_sleep_mode"] is True
    assert "kv_cache_memory_bytes" not in gpu
    with pytest.warns(UserWarning, match="needs a GPU"):
        cpu = engine.llm_kwargs("/m", "float32", on_gpu=False)
    assert "enable_sleep_mode" not in cpu and "gpu_memory_utilization" not in cpu
    assert cpu["kv_cache_memory_bytes"] == 2**29
    for kw in (gpu, cpu):
        assert kw["enable_prefix_caching"] and kw["logprobs_mode"] == "processed_logprobs"
    if not torch.cuda.is_available():
        assert not engine.sleep_enabled
        engine.sleep()  # skipped cleanly: nothing to free
        assert not engine.asleep


def test_unbound_engine_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"bind\(policy\)"):
        VLLMEngine().generate([GenerationRequest((1, 2))], SamplingParams())


def test_prompt_logprobs_line_up_with_the_expanded_training_ids():
    """vLLM reports prompt log-probs over the prompt it expanded (pad 7 grown to 3 pads here)."""
    ids = [1, 6, 7, 7, 7, 8, 2]
    entries = [None] + [{t: SimpleNamespace(logprob=-0.1 * k), 99: SimpleNamespace(logprob=-9.0)}
                        for k, t in enumerate(ids[1:], 1)]  # fmt: skip
    out = SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=entries)
    assert expanded_prompt_logprobs(out, ids) == pytest.approx([-0.1 * k for k in range(1, 7)])
    with pytest.raises(ImageTokenMismatch, match="expanded the prompt to 7 tokens"):
        expanded_prompt_logprobs(out, [1, 6, 7, 7, 8, 2])  # an image of another size in training


def test_an_engine_started_from_dummy_weights_normalizes_images_in_the_processor():
    """vLLM's dummy loader also randomizes the device-side image normalization's mean/std buffers,
    which no weight sync sends (see ``VLLMEngine.llm_kwargs``)."""
    engine = VLLMEngine()
    assert engine.llm_kwargs("/m", "float32", on_gpu=True, load_format="dummy")["mm_device_do_normalize"] is False
    assert "mm_device_do_normalize" not in engine.llm_kwargs("/m", "float32", on_gpu=True, load_format="auto")


def captured_params(monkeypatch, requests, stop_ids):
    """The ``vllm.SamplingParams`` (as keyword dicts) that ``VLLMEngine.generate`` hands a fake ``vllm.LLM`` for
    ``requests`` of a text-only policy whose end-of-turn ids are ``stop_ids``; vLLM itself stubbed out."""
    fake, fake_params = ModuleType("vllm"), ModuleType("vllm.sampling_params")
    fake.SamplingParams = lambda **kw: kw
    fake_params.RequestOutputKind = SimpleNamespace(FINAL_ONLY="final_only")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", fake_params)
    seen = []

    class LLM:
        def generate(self, prompts, params, use_tqdm):
            seen.extend(params)
            return [SimpleNamespace(outputs=[completion([5], "stop", None)]) for _ in prompts]

    engine = VLLMEngine(seed=0)
    engine.llm, engine.image_ids, engine.grid_images, engine.mm_kwargs = LLM(), None, GridImages(14), {}
    engine.stop_ids, engine.logit_bias = sorted(stop_ids), {}  # as bind() sets them from the policy
    engine.generate(requests, SamplingParams(temperature=1.0, max_tokens=4))
    return seen


def test_requests_stop_at_the_policys_end_of_turn_ids_besides_the_models_eos(monkeypatch):
    """A policy whose model eos is not <|im_end|> (2 here) ends its turns at <|im_end|> (7) too: vLLM stops at its
    own eos alone unless the request names the others (the tiny test model's eos is <|im_end|>, which hid a drop)."""
    (params,) = captured_params(monkeypatch, [GenerationRequest((1, 2, 3), key="q#0")], stop_ids={7, 2})
    assert params["stop_token_ids"] == [2, 7]


def test_each_sample_of_a_group_and_each_turn_is_seeded_apart_and_alike_across_calls(monkeypatch):
    """The n samples of a GRPO group (keys ``id#k``) share their prompt: with one seed they draw the same tokens and
    every advantage is 0; a later turn reusing turn 0's seed replays its draws. A repeated call keeps the seeds."""
    requests = [GenerationRequest((1, 2, 3), key=f"q#{k}") for k in range(4)]
    requests.append(GenerationRequest((1, 2, 3), key="q#0", turn=1))  # a later turn of sample 0
    first = [p["seed"] for p in captured_params(monkeypatch, requests, stop_ids={7})]
    again = [p["seed"] for p in captured_params(monkeypatch, requests, stop_ids={7})]
    assert first == again and len(set(first)) == 5 and None not in first, first
