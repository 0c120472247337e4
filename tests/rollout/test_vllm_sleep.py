"""The GPU sleep cycle's order, without vLLM: what can be checked of it on a CPU."""

import torch

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
