"""HFEngine's decode state (in-place KV slabs, a mask built once, grouped-head attention) changes the
work per token, not the numbers: tokens equal those of transformers' own decode (``DynamicCache``, a
2-D mask grown each step, SDPA over repeated KV heads), log-probs to float rounding (the reference runs
every row to the end, so its matmuls see other batch shapes), for the text model and both
vision-language families (M-RoPE, images from tools), with left padding, GRPO fan-out and rows leaving
the batch as they finish."""

import copy

import pytest
import torch
from transformers.cache_utils import Cache

from mmsr.rollout.engine import GenerationRequest, SamplingParams
from mmsr.rollout.hf_decode import DECODE_ATTENTION, LAYER_STEP_MODELS, SlabLayer, additive_mask, decode_attention, decode_attention_for
from mmsr.rollout.hf_engine import HFEngine, sample_tokens
from mmsr.rollout.sampling import request_seed
from tests.conftest import FVQA
from tests.models.test_parity import multi_turn_contexts


@torch.no_grad()
def dynamic_decode(engine: HFEngine, requests, sampling: SamplingParams, budget: int):
    """The engine's loop as it was: one prefill per request, transformers' default cache and masks.
    Returns tokens and log-probs ``[B, budget]`` (every row runs the whole budget)."""
    policy = engine.policy
    seeds = torch.tensor([request_seed(engine.seed, r.stream, r.key, r.turn) for r in requests])
    ids, attn, pos = engine._left_pad(requests)
    with policy.autocast():
        return _dynamic_steps(policy, requests, seeds, ids, attn, pos, sampling, budget)


def _dynamic_steps(policy, requests, seeds, ids, attn, pos, sampling: SamplingParams, budget: int):
    out = policy.forward(ids, attn, pos, [v for r in requests for v in r.vision], use_cache=True, logits_to_keep=1)
    cache, logits, next_pos = out.past_key_values, out.logits[:, -1], pos.amax(-1) + 1
    tokens, logps = [], []
    for step in range(budget):
        token, logp = sample_tokens(logits, sampling, seeds, torch.full((len(requests),), step))
        tokens.append(token), logps.append(logp)
        attn = torch.cat([attn, attn.new_ones(len(requests), 1)], 1)
        out = policy.mask_banned(policy.model(input_ids=token[:, None], attention_mask=attn,
                                              position_ids=next_pos[..., None], past_key_values=cache, use_cache=True))  # fmt: skip
        logits, next_pos = out.logits[:, -1], next_pos + 1
    return torch.stack(tokens, 1), torch.stack(logps, 1)


def assert_same_as_dynamic(policy, contexts, sampling: SamplingParams) -> list:
    """Generate each context twice (a GRPO group of 2 sharing one prefill) and compare to ``dynamic_decode``."""
    engine = HFEngine(seed=3)
    engine.bind(policy)
    policy.model.eval()
    requests = [GenerationRequest(ids, vision, key=f"q{i}#{k}") for i, (ids, vision) in enumerate(contexts) for k in range(2)]
    outs = engine.generate(requests, sampling)
    tokens, logps = dynamic_decode(engine, requests, sampling, sampling.max_tokens)
    for o, t, lp in zip(outs, tokens, logps):
        n = len(o.token_ids)
        assert o.token_ids == t[:n].tolist()
        assert torch.allclose(torch.tensor(o.logprobs), lp[:n], rtol=0, atol=1e-5)
    return outs


@pytest.fixture(scope="module")
def text_policy():
    from mmsr.demo.tokenizer import Scaffold
    from mmsr.models.tiny_text import TinyQwen2

    texts = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
    return TinyQwen2(tokenizer_texts=texts, scaffold=Scaffold(), vocab_size=512, hidden_size=128).build()


def text_contexts(policy):
    prompts = ["What is the capital of France?", "Name it.", "Which river flows through the city in the picture?"]
    return [(tuple(policy.tokenizer(p)["input_ids"]), ()) for p in prompts]  # three lengths: left padding


def test_text_model_decodes_as_transformers_does(text_policy):
    sampling = SamplingParams(temperature=1.0, max_tokens=24, stop=("e",))
    outs = assert_same_as_dynamic(text_policy, text_contexts(text_policy), sampling)
    assert {o.finish for o in outs} == {"stop"} and len({len(o.token_ids) for o in outs}) > 2  # rows left one by one


def test_bf16_autocast_decodes_as_transformers_does(text_policy):
    text_policy.compute_dtype = torch.bfloat16
    try:
        assert_same_as_dynamic(text_policy, text_contexts(text_policy), SamplingParams(temperature=1.0, max_tokens=8, stop=()))
    finally:
        text_policy.compute_dtype = None


class KeysAsTheyCome(SlabLayer):
    """The slab as it was: keys held in the dtype they arrive in (float32 under autocast on float32 weights)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_slab = torch.zeros_like(self.key_slab, dtype=key_states.dtype)
        self._views()


def generate_text(policy, attention: str) -> list:
    config = policy.model.config.get_text_config()
    config._attn_implementation = attention
    try:
        engine = HFEngine(seed=5)
        engine.bind(policy)
        requests = [GenerationRequest(ids, vision, key=f"q{i}#{k}") for i, (ids, vision) in enumerate(text_contexts(policy)) for k in range(2)]
        return engine.generate(requests, SamplingParams(temperature=1.0, max_tokens=16, stop=()))
    finally:
        config._attn_implementation = "sdpa"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_bf16_autocast_holds_keys_in_compute_dtype(text_policy, monkeypatch, attention):
    """fp32 weights under bf16 autocast: the rotary tables stay fp32, so keys arrive fp32 while values are bf16.
    The key slab holds bf16 (the bytes per token ``mmsr plan`` counts), and tokens and log-probs equal bit for
    bit those of a slab keeping fp32 keys: every kernel rounds the keys to bf16 anyway."""
    from mmsr.plan.config import model_shape
    from mmsr.plan.memory import kv_bytes_per_token
    from mmsr.rollout import hf_engine

    text_policy.compute_dtype = torch.bfloat16
    engine = HFEngine(seed=0)
    engine.bind(text_policy)
    text_policy.model.eval()
    try:
        with torch.no_grad(), text_policy.autocast(), decode_attention_for(text_policy.model) as additive:
            layers = engine.prefill([GenerationRequest(text_contexts(text_policy)[0][0], ())], 4, additive)[0].cache.layers
        assert next(text_policy.model.parameters()).dtype == torch.float32
        assert {(layer.key_slab.dtype, layer.value_slab.dtype) for layer in layers} == {(torch.bfloat16, torch.bfloat16)}
        held = sum((layer.key_slab[0, :, 0].nbytes + layer.value_slab[0, :, 0].nbytes) for layer in layers)
        assert held == kv_bytes_per_token(model_shape(text_policy.model), "bfloat16")
        outs = generate_text(text_policy, attention)
        old_slabs = []

        def old_cache(model, capacity: int) -> Cache:
            old_slabs.extend(KeysAsTheyCome(capacity) for _ in layers)
            return Cache(layers=old_slabs[-len(layers) :])

        monkeypatch.setattr(hf_engine, "slab_cache", old_cache)
        before = generate_text(text_policy, attention)
    finally:
        text_policy.compute_dtype = None
    assert old_slabs and {s.key_slab.dtype for s in old_slabs} == {torch.float32}  # the reference kept fp32 keys
    assert [o.token_ids for o in outs] == [o.token_ids for o in before]
    assert [o.logprobs for o in outs] == [o.logprobs for o in before]


def test_other_attention_decodes_with_2d_masks(text_policy):
    """Eager attention (as flash-attention) keeps its own masks: the slabs then take the 2-D mask."""
    config = text_policy.model.config.get_text_config()
    config._attn_implementation = "eager"
    try:
        assert_same_as_dynamic(text_policy, text_contexts(text_policy), SamplingParams(temperature=1.0, max_tokens=8, stop=("e",)))
    finally:
        config._attn_implementation = "sdpa"


def test_vision_language_models_decode_as_transformers_does(vl_policy, fvqa_samples):
    trajs, cuts = multi_turn_contexts(vl_policy, fvqa_samples[:2])
    contexts = [(tuple(t.input_ids[:c]), tuple(t.vision)) for t, c in zip(trajs, cuts)]
    assert_same_as_dynamic(vl_policy, contexts, SamplingParams(temperature=1.0, max_tokens=10, stop=()))


def one_step_both_ways(engine: HFEngine, requests) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, 1, V]`` of the first decode step from one prefill: through ``layer_step`` (what
    ``DecodeBatch.step`` runs) and through the model's own forward on a copy of the same cache."""
    model = engine.policy.model
    with torch.no_grad(), decode_attention_for(model) as additive:
        assert additive
        batch, logits = engine.prefill(requests, budget=4, additive=True)
        tokens = logits.argmax(-1)
        twin = copy.deepcopy(batch.cache)
        direct = batch.step(model, tokens).logits
        full = model(input_ids=tokens[:, None], attention_mask=batch.mask[..., : batch.length], position_ids=batch.next_pos[..., None] - 1,
                     past_key_values=twin, use_cache=True).logits  # fmt: skip
    return direct, full


def test_layer_step_is_the_models_forward_bit_for_bit(text_policy, vl_policy, fvqa_samples):
    """The decode step skips the forward's wrappers, not its arithmetic: the same logits, exactly."""
    trajs, cuts = multi_turn_contexts(vl_policy, fvqa_samples[:2])
    for policy, contexts in ((text_policy, text_contexts(text_policy)),
                             (vl_policy, [(tuple(t.input_ids[:c]), tuple(t.vision)) for t, c in zip(trajs, cuts)])):  # fmt: skip
        assert policy.model.config.model_type in LAYER_STEP_MODELS  # the step runs ``layer_step``
        engine = HFEngine(seed=0)
        engine.bind(policy)
        policy.model.eval()
        direct, full = one_step_both_ways(engine, [GenerationRequest(ids, vision, key=f"q{i}") for i, (ids, vision) in enumerate(contexts)])
        assert direct.shape == full.shape and torch.equal(direct, full)


def test_slab_layer_writes_in_place_and_keeps_selected_rows():
    layer = SlabLayer(capacity=5)
    k, v = torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4)
    keys, _ = layer.update(k, v)
    slab = layer.key_slab
    keys, values = layer.update(k[:, :, :1] + 1, v[:, :, :1])
    assert layer.key_slab is slab and keys.shape == (3, 2, 3, 4) and layer.get_seq_length() == 3
    assert torch.equal(keys[:, :, :2], k) and torch.equal(keys[:, :, 2], k[:, :, 0] + 1)
    layer.batch_select_indices(torch.tensor([2, 2, 0]))
    assert torch.equal(layer.keys[0], keys[2]) and torch.equal(layer.keys[1], keys[2]) and torch.equal(layer.values[2], values[0])
    with pytest.raises(ValueError, match="KV cache full: 6 tokens for a capacity of 5"):
        layer.update(torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4))


def test_additive_mask_hides_padding_only():
    attention = torch.tensor([[0, 1, 1], [1, 1, 1]])
    mask = additive_mask(attention, 5, torch.float32)
    assert mask.shape == (2, 1, 1, 5)
    assert mask[0, 0, 0].tolist() == [float("-inf"), 0, 0, 0, 0] and not mask[1].any()


def test_decode_attention_is_scoped_to_sdpa_models(tiny_policy):
    config = tiny_policy.model.config.get_text_config()
    assert config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), decode_attention_for(tiny_policy.model) as additive:
        assert additive and config._attn_implementation == DECODE_ATTENTION
        raise RuntimeError("a failed step")
    assert config._attn_implementation == "sdpa"  # restored, even after an error
    config._attn_implementation = "eager"
    try:
        with decode_attention_for(tiny_policy.model) as additive:
            assert not additive and config._attn_implementation == "eager"
    finally:
        config._attn_implementation = "sdpa"
    types = config.layer_types
    config.layer_types = ["sliding_attention", *types[1:]]
    try:
        with decode_attention_for(tiny_policy.model) as additive:
            assert not additive and config._attn_implementation == "sdpa"
    finally:
        config.layer_types = types


def test_one_token_attention_groups_heads():
    """Grouped KV heads give what repeated heads give (bf16 queries, the float32 mask of a bf16-autocast run)."""
    q, k, v = torch.randn(2, 4, 1, 8).bfloat16(), torch.randn(2, 2, 5, 8).bfloat16(), torch.randn(2, 2, 5, 8).bfloat16()
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out, _ = decode_attention(None, q, k, v, additive_mask(attention, 5, torch.float32), scaling=0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=attention.bool()[:, None, None], scale=0.5)  # fmt: skip
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 4, 8)
    assert torch.allclose(out.float(), ref.transpose(1, 2).float(), atol=1e-2)
