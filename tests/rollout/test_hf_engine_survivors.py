"""HFEngine behaviours a mutation audit found unpinned: greedy draws, the sampling streams of keyless requests,
turns and batch windows, the training mode, left padding, the prefill of distinct images, the cache of a mixed
batch, the families ``layer_step`` serves, the seed's bits, and the image-token and image-cache checks."""

import dataclasses
import hashlib

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import GraniteConfig, GraniteForCausalLM, PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmsr.models.policy import Policy
from mmsr.models.vision import VisionInput
from mmsr.rollout.engine import GenerationRequest, SamplingParams
from mmsr.rollout.hf_decode import LAYER_STEP_MODELS
from mmsr.rollout.hf_engine import HFEngine, sample_tokens
from mmsr.rollout.images import ProcessedImages
from mmsr.rollout.sampling import request_seed
from mmsr.rollout.vllm_inputs import ImageTokenIds, ImageTokenMismatch, collapse_image_tokens
from tests.models.test_hf_decode import one_step_both_ways
from tests.rollout.test_engine_limits import PROMPT, framed

SAMPLED = SamplingParams(temperature=1.0, max_tokens=8, stop=())


def generate(policy, requests, sampling=SAMPLED, **engine_args) -> list:
    engine = HFEngine(**{"seed": 4, **engine_args})
    engine.bind(policy)
    return engine.generate(requests, sampling)


def assert_as_alone(policy, requests, sampling=SAMPLED) -> list:
    """Each request generated in one batch gives the tokens and log-probs it gets generated alone."""
    together = generate(policy, requests, sampling)
    for request, out in zip(requests, together):
        (alone,) = generate(policy, [request], sampling)
        assert out.token_ids == alone.token_ids, request.key
        assert out.logprobs == pytest.approx(alone.logprobs, abs=1e-5), request.key
    return together


def test_greedy_draws_the_argmax_with_the_log_softmax():
    """T = 0 is greedy: divided by 0 the logits were inf and NaN, and so were the log-probs."""
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    tokens, logp = sample_tokens(logits, SamplingParams(temperature=0.0), torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long))
    assert torch.equal(tokens, logits.argmax(-1)) and torch.isfinite(logp).all()
    assert torch.equal(logp, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0])


def test_keyless_requests_draw_a_new_stream_every_call():
    """Requests without an episode key are told apart by call: the same call count drew the same tokens every call."""
    engine, request = HFEngine(seed=3), GenerationRequest(PROMPT)
    first, second = engine.request_seeds([request, request]), engine.request_seeds([request, request])
    assert len({*first, *second}) == 4 and engine.calls == 2


def test_each_turn_of_an_episode_has_its_own_stream():
    engine = HFEngine(seed=3)
    seeds = engine.request_seeds([GenerationRequest(PROMPT, key="q#0", turn=t, stream=2) for t in (0, 1)])
    assert seeds == [request_seed(3, 2, "q#0", 0), request_seed(3, 2, "q#0", 1)] and seeds[0] != seeds[1]


def test_requests_past_the_first_batch_window_keep_their_streams(tiny_policy):
    """With more requests than ``max_batch_size`` each window takes its own requests' seeds, not the first window's."""
    prompt = tiny_policy.encoder().encode("<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    requests = [GenerationRequest(tuple(prompt), key=f"w#{k}") for k in range(3)]
    one_by_one = generate(tiny_policy, requests, max_batch_size=1)
    assert [o.token_ids for o in one_by_one] == [o.token_ids for o in generate(tiny_policy, requests)]
    assert len({tuple(o.token_ids) for o in one_by_one}) == 3  # three streams, three continuations


@pytest.mark.parametrize("training", [True, False])
def test_generate_restores_the_models_training_mode(tiny_policy, training):
    """The engine samples in eval mode on the trainer's own module, then gives it back as it found it."""
    model, before = tiny_policy.model, tiny_policy.model.training
    model.train(training)
    try:
        generate(tiny_policy, [GenerationRequest(PROMPT, key="m#0")], SamplingParams(max_tokens=2, stop=()))
        assert model.training is training
    finally:
        model.train(before)


def test_prompts_of_different_lengths_batch_as_if_alone(tiny_policy):
    """Left padding: the shorter prompt's attention and positions sit at the right, beside its next token."""
    texts = ["What is this?", "Which river flows through the city in the picture, and how long is it?"]
    prompts = [tiny_policy.encoder().encode(f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n") for t in texts]
    assert len(prompts[0]) < len(prompts[1])
    assert_as_alone(tiny_policy, [GenerationRequest(tuple(p), key=f"len{i}#0") for i, p in enumerate(prompts)])


def test_same_ids_with_different_images_prefill_apart(tiny_policy):
    """Two contexts of the same ids and image grid but other pictures are two prefills: sharing one, the second
    request attended to the first one's image."""
    noise = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray(torch.randint(0, 256, (56, 56, 3), generator=noise, dtype=torch.uint8).numpy()) for _ in range(2)]
    vision = [tiny_policy.process_image(p) for p in pictures]
    assert vision[0].grid_thw == vision[1].grid_thw and vision[0].num_tokens == 4
    ids = framed(tiny_policy.tokenizer, 4)
    outs = assert_as_alone(tiny_policy, [GenerationRequest(ids, (v,), key="img#0") for v in vision])
    assert outs[0].logprobs != pytest.approx(outs[1].logprobs, abs=1e-5)  # one stream: only the image differs


def test_a_context_limited_request_batches_with_a_longer_turn(tiny_policy, monkeypatch):
    """A batch sizes its KV cache for its longest turn: sized for a request cut short by the model's context, it
    overflowed on the other request's tokens."""
    monkeypatch.setattr(tiny_policy.model.config.get_text_config(), "max_position_embeddings", 10)
    near, far = GenerationRequest((5,) * 8, key="near#0"), GenerationRequest((5, 6, 7), key="far#0")
    outs = assert_as_alone(tiny_policy, [near, far], SamplingParams(max_tokens=5, stop=()))
    assert [(len(o.token_ids), o.finish) for o in outs] == [(2, "length"), (5, "length")]


@pytest.fixture(scope="module")
def granite_policy(tiny_policy):
    """A random tiny Granite (SDPA, full attention): its forward multiplies the embeddings and divides the logits,
    which ``layer_step`` does not (Gemma no longer differs: its embedding module scales itself)."""
    tok = tiny_policy.tokenizer
    config = GraniteConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, embedding_multiplier=12.0, logits_scaling=8.0, attn_implementation="sdpa",
                           pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Policy(GraniteForCausalLM(config).float(), tok)


def test_a_family_outside_layer_step_decodes_with_its_forward(granite_policy):
    assert granite_policy.model.config.model_type not in LAYER_STEP_MODELS
    engine = HFEngine(seed=0)
    engine.bind(granite_policy)
    granite_policy.model.eval()
    prompts = ["What is the capital of France?", "Name it."]
    requests = [GenerationRequest(tuple(granite_policy.tokenizer(p)["input_ids"]), key=f"g{i}") for i, p in enumerate(prompts)]
    direct, full = one_step_both_ways(engine, requests)
    assert torch.equal(direct, full)


def test_request_seed_is_pinned():
    """The docstring's definition, by hand: 63 bits of an 8-byte blake2b, little-endian. A changed seed changes every
    run's rollouts silently. This input has both top bits of its digest set."""
    digest = int.from_bytes(hashlib.blake2b(b"7/2/q10#1/3", digest_size=8).digest(), "little")
    assert digest >> 62 == 3
    assert request_seed(7, 2, "q10#1", 3) == digest & ((1 << 63) - 1) == 8347307435465791110


def test_a_text_only_tokenizer_with_an_unk_token_is_refused():
    """Such a tokenizer maps the image tokens to its unk id (not None): taken as image ids, every unknown word was one."""
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"tokenizer lacks <\|image_pad\|>.*not a Qwen2.5-VL tokenizer"):
        ImageTokenIds.from_tokenizer(tokenizer)


def test_a_pad_run_at_the_first_token_is_not_framed():
    """Nothing precedes index 0: the run's frame is not ``input_ids[-1]`` (here a ``<|vision_start|>`` at the end)."""
    ids = ImageTokenIds(pad=1, start=2, end=3)
    vision = VisionInput(Image.new("RGB", (56, 56)), torch.zeros(16, 1176), (1, 4, 4), 4)
    with pytest.raises(ImageTokenMismatch, match=r"image 0: its <\|image_pad\|> run at tokens 0..4 is not framed"):
        collapse_image_tokens([1, 1, 1, 1, 3, 2], [vision], ids)


def test_a_tool_copy_of_the_question_image_gets_the_tool_bounds(tiny_policy):
    """A tool returning the question's image object hands it back within the tool bounds, not as the question's."""
    thumbs = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=56 * 56)
    processed = ProcessedImages(dataclasses.replace(tiny_policy, tool_image_processor=thumbs))
    picture = Image.new("RGB", (112, 112), "red")
    question, tool = processed(picture), processed(picture, tool=True)
    assert (question.num_tokens, tool.num_tokens) == (16, 4)
    assert processed(picture, tool=True) is tool and processed(picture) is question and len(processed) == 2
