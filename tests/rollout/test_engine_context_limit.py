"""A VLLMEngine context (``max_model_len``) shorter than an episode's (``RolloutSettings.max_context_tokens``): the
run died mid-rollout, on the first long context, with vLLM's error naming neither the request nor either setting.
Refused at start instead, and a prompt over it is refused naming its request (as ``HFEngine.request_budget``)."""

from types import SimpleNamespace

import pytest

from mmsr.rollout.engine import GenerationRequest, SamplingParams
from mmsr.rollout.loop import RolloutSettings
from mmsr.rollout.vllm_engine import VLLMEngine
from mmsr.rollout.vllm_inputs import GridImages
from tests.test_module import Unbuildable, make_module


def test_an_engine_shorter_than_an_episode_is_refused_before_the_policy_is_built():
    with pytest.raises(ValueError, match=r"^VLLMEngine\(max_model_len=1024\) is below RolloutSettings.max_context_tokens="
                                         r"4096: .*raise max_model_len or lower max_context_tokens$"):  # fmt: skip
        make_module(policy=Unbuildable(), engine=VLLMEngine(max_model_len=1024), rollout=RolloutSettings())


def test_an_engine_that_holds_an_episode_is_taken():
    with pytest.raises(AssertionError, match="policy was built"):  # past the check, to the build
        make_module(policy=Unbuildable(), engine=VLLMEngine(max_model_len=2048), rollout=RolloutSettings(max_context_tokens=2048))


class Scheduler:
    """vLLM's LLMEngine as far as ``submit`` uses it: what it was handed."""

    def __init__(self):
        self.added = []

    def add_request(self, rid, prompt, params):
        self.added.append(rid)


def test_a_prompt_that_fills_max_model_len_is_refused_naming_its_request():
    engine = VLLMEngine(max_model_len=8)
    engine.llm = SimpleNamespace(llm_engine=Scheduler())
    engine.image_ids, engine.grid_images, engine.mm_kwargs, engine.stop_ids, engine.logit_bias = None, GridImages(), {}, [1], {}
    with pytest.raises(ValueError, match=r"^request 'q#1': its prompt of 8 tokens leaves no room for a token in "
                                         r"VLLMEngine's max_model_len=8$"):  # fmt: skip
        engine.submit([GenerationRequest((1,) * 7, key="q#0"), GenerationRequest((1,) * 8, key="q#1")], SamplingParams())
    assert engine.llm.llm_engine.added == [] and engine.in_flight == set()  # refused before any request was added
    assert engine.submit([GenerationRequest((1,) * 7, key="q#0")], SamplingParams()) == ["mmsr-0"]
