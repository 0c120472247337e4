"""The probe against the engine it checks: within its ``max_model_len`` (the first sync always probes, and a
probe padded to 512+ tokens crashed an engine of a shorter context in vLLM's words, naming a prompt the user
never sent), and a failure message that says which tolerance an engine in bf16 / fp16 needs."""

import dataclasses

import pytest

from mmsr.sync import (PROBE_TEXT, StaleWeightsError, WeightSync, probe_inputs, sampling_probe, verify_sampling,
                       verify_sync)
from mmsr.sync.probe import PROBE_TOKENS, SAMPLING_PROBE_MIN_TOKENS
from tests.test_sync import CopyEngine


class ShortContext(CopyEngine):
    """As vLLM with ``max_model_len`` and a prefix cache of ``block_size``-token blocks: a longer prompt is refused."""

    max_model_len, block_size = 300, 128

    def generate(self, requests, sampling):
        for r in requests:
            if len(r.input_ids) > self.max_model_len:
                raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                                 f"prompt contains {len(r.input_ids)} input tokens")  # fmt: skip
        return super().generate(requests, sampling)


class ShorterContext(ShortContext):
    """Room for the probe itself (under 122 tokens) but not for a 128-token KV block and a token past it."""

    max_model_len, block_size = 130, 128


class Off(CopyEngine):
    """Scores the probe 0.01 off the trainer (a correct bf16 sync measures 1e-3..3e-2), in ``weights_dtype``."""

    def __init__(self, policy, dtype):
        super().__init__(policy)
        self.weights_dtype = dtype

    def score(self, input_ids, vision=()):
        return [x + 0.01 for x in super().score(input_ids, vision)]


class Spiked(CopyEngine):
    """Scores the probe ``by`` off the trainer at its last token only, or (``every``) at every token; reports the
    last token of its greedy continuation ``by`` off too."""

    def __init__(self, policy, by: float, every: bool = False):
        super().__init__(policy)
        self.by, self.every = by, every

    def score(self, input_ids, vision=()):
        scores = super().score(input_ids, vision)
        return [x + self.by for x in scores] if self.every else [*scores[:-1], scores[-1] + self.by]

    def generate(self, requests, sampling):
        return [dataclasses.replace(o, logprobs=[*o.logprobs[:-1], o.logprobs[-1] + self.by])
                for o in super().generate(requests, sampling)]  # fmt: skip


def test_the_sampling_probe_is_cut_to_the_engines_context_and_kept_whole_otherwise(trainer):
    whole, vision = sampling_probe(trainer)
    assert len(whole) >= SAMPLING_PROBE_MIN_TOKENS
    assert sampling_probe(trainer, PROBE_TEXT, max_model_len=8192, block_size=16)[0] == whole  # as before
    cut, same = sampling_probe(trainer, PROBE_TEXT, max_model_len=300, block_size=128)
    assert cut == whole[: 300 - PROBE_TOKENS] and len(same) == len(vision) == 1  # the probe's image kept


def test_an_engine_too_short_for_the_probe_is_refused_naming_max_model_len(trainer):
    """It needs the probe itself, and a whole KV block and one token past it (the prefix cache serves whole blocks,
    never a prompt's last token: a shorter probe could not see a cache that kept the old weights' KV)."""
    own = len(probe_inputs(trainer)[0])
    assert 100 - PROBE_TOKENS < own < 130 - PROBE_TOKENS  # the cases test what they say
    for max_model_len, block_size, need in [(100, 16, own), (130, 128, 129)]:
        with pytest.raises(ValueError, match=rf"^max_model_len={max_model_len} leaves {max_model_len - PROBE_TOKENS} "
                                             rf"tokens .* which needs {need}: .*; raise the engine's max_model_len$"):  # fmt: skip
            sampling_probe(trainer, PROBE_TEXT, max_model_len, block_size)
        # one token more is enough: the probe and its PROBE_TOKENS fill max_model_len exactly, which vLLM serves
        assert len(sampling_probe(trainer, PROBE_TEXT, need + PROBE_TOKENS, block_size)[0]) == need


def test_the_first_sync_probes_an_engine_of_a_short_context_within_it(trainer):
    engine = ShortContext(trainer)
    sync = WeightSync(verify_every=1)
    sync(trainer, engine)  # the probe of 560 tokens was refused by the engine
    assert sync.last_sampling_check is not None and sync.last_check.max_abs_diff < 1e-5


def test_weight_sync_probes_within_the_engines_kv_block_size(trainer):
    """``WeightSync`` hands the probe the engine's ``block_size`` too: a prefix shorter than a block and a token is
    never served from the prefix cache, so the check could not see a cache holding the old weights' KV."""
    with pytest.raises(ValueError, match=r"max_model_len=130 leaves 122 tokens .* needs 129: .* KV block of 128"):
        WeightSync(verify_every=1)(trainer, ShorterContext(trainer))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_failed_probe_of_a_low_precision_engine_names_its_dtype_and_the_tolerance_it_needs(trainer, dtype):
    ids, vision = probe_inputs(trainer)
    with pytest.raises(StaleWeightsError, match=rf"tolerance 0.001; the engine runs {dtype}, where a correct sync "
                                                r"differs by up to ~3e-2: use WeightSync\(tolerance=0.05\)"):  # fmt: skip
        verify_sync(trainer, Off(trainer, dtype), ids, 1e-3, vision)
    assert verify_sync(trainer, Off(trainer, dtype), ids, 0.05, vision).mean_abs_diff == pytest.approx(0.01, abs=1e-4)


def test_a_failed_probe_of_an_fp32_engine_says_stale(trainer):
    ids, vision = probe_inputs(trainer)
    with pytest.raises(StaleWeightsError, match=r"the engine \(in float32\) is generating with stale or wrongly loaded"):
        verify_sync(trainer, Off(trainer, "float32"), ids, 1e-3, vision)


def test_scoring_compares_the_mean_gap_a_single_rounding_spike_passes(trainer):
    """bf16 rounding moves single tokens' log-probs by far more than the mean: one token 0.2 off passes the bf16
    tolerance, every token 0.06 off fails it."""
    ids, vision = probe_inputs(trainer)
    check = verify_sync(trainer, Spiked(trainer, 0.2), ids, 0.05, vision)  # the last token is text, never a pad
    assert check.max_abs_diff == pytest.approx(0.2, abs=1e-4) and check.mean_abs_diff < 0.05
    with pytest.raises(StaleWeightsError, match=r"\(scoring\): mean \|dlogp\| 0.06 "):
        verify_sync(trainer, Spiked(trainer, 0.06, every=True), ids, 0.05, vision)


def test_sampling_compares_the_mean_gap_a_single_rounding_spike_passes(trainer):
    """As the scoring check: one continued token 0.1 off among 4 (mean 0.025) passes the bf16 tolerance of 0.05."""
    ids, vision = probe_inputs(trainer)
    check = verify_sampling(trainer, Spiked(trainer, 0.1), ids, 0.05, vision, tokens=4)
    assert check.tokens == 4 and check.max_abs_diff == pytest.approx(0.1, abs=1e-4)
    assert check.mean_abs_diff == pytest.approx(0.025, abs=1e-4)
