"""The GPU sleep cycle's order, without vLLM: what can be checked of it on a CPU."""

import pytest
import torch

from mmsr.rollout.engine import GenerationRequest, SamplingParams

from mmsr.rollout.vllm_engine import VLLMEngine


def test_wake_empties_torchs_cache_before_vllm_maps_its_memory_back(monkeypatch):
    """vLLM's wake maps weights and KV cache outside torch's allocator: blocks the update freed but torch keeps
    cached would leave it short of device memory, so they are handed back first."""
    calls = []

    class LLM:
        def wake_up(self):
            calls.append("wake_up")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    engine = VLLMEngine(enable_sleep_mode=True)
    engine.llm, engine.asleep = LLM(), True
    engine.wake()
    assert calls == ["empty_cache", "wake_up"] and not engine.asleep
    engine.wake()  # awake: nothing to do
    assert calls == ["empty_cache", "wake_up"]


def test_sleep_mode_puts_vllm_to_sleep_at_its_level_until_wake(monkeypatch):
    """Sleep mode on (a GPU, faked here): ``sleep`` hands vLLM its level once and marks the engine asleep, which
    refuses generation and lets ``wake`` call vLLM's ``wake_up``; without the mark, ``wake`` did nothing and the
    next rollout ran on an engine whose memory was freed."""
    calls = []

    class LLM:
        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self):
            calls.append("wake_up")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(VLLMEngine, "sleep_enabled", property(lambda self: True))
    engine = VLLMEngine(enable_sleep_mode=True, sleep_level=2)
    engine.llm = LLM()
    engine.sleep()
    engine.sleep()  # asleep already: vLLM is not asked twice
    assert engine.asleep and calls == [("sleep", 2)]
    with pytest.raises(RuntimeError, match="asleep: call wake"):
        engine.generate([GenerationRequest((1, 2))], SamplingParams())
    engine.wake()
    assert calls == [("sleep", 2), "wake_up"] and not engine.asleep
