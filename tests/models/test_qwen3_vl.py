"""Qwen3-VL: the tiny model is the real architecture, positions are each family's own M-RoPE over
multi-turn sequences with tool images, the chat pieces are the model's own template, and a saved
checkpoint loads back through ``PretrainedPolicy``."""

import hashlib

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from mmsr.models.build import PretrainedPolicy, save_policy
from mmsr.models.tiny_qwen3_vl import TinyQwen3VL, interleaved_mrope_sections
from mmsr.models.tokenizer import QWEN3_VL_CHAT_TEMPLATE
from mmsr.plan.config import policy_config
from mmsr.prompt.chat_template import chat_format, pieces
from mmsr.prompt.render import ChatFormat
from tests.models.test_parity import multi_turn_contexts


def test_tiny_qwen3_vl_is_the_qwen3_vl_architecture(tiny_qwen3_vl):
    model, cfg = tiny_qwen3_vl.model, tiny_qwen3_vl.model.config
    assert type(model) is Qwen3VLForConditionalGeneration
    assert cfg.vision_config.patch_size == 16 and cfg.vision_config.deepstack_visual_indexes == [0]
    assert len(model.model.visual.deepstack_merger_list) == 1
    assert cfg.text_config.rope_parameters["mrope_interleaved"] is True
    assert interleaved_mrope_sections(16) == [4, 2, 2] and interleaved_mrope_sections(128) == [24, 20, 20]
    # A merged token covers 32x32 pixels: 300x200 is resized to 128x96 (<= 128*128 pixels), 6x8
    # patches of 16 pixels, 12 tokens.
    v = tiny_qwen3_vl.process_image(Image.new("RGB", (300, 200), "red"))
    assert v.grid_thw == (1, 6, 8) and v.num_tokens == 12 and v.pixel_values.shape == (48, 3 * 2 * 16 * 16)
    assert v.pixel_values.max() <= 1.0 and v.pixel_values.min() >= -1.0  # mean/std 0.5: red is (1, -1, -1)
    assert tiny_qwen3_vl.chat == ChatFormat(system=None)
    with pytest.raises(ValueError, match="deepstack_layers"):
        TinyQwen3VL(deepstack_layers=(0, 1, 2), num_layers=2, vision_depth=4)
    assert isinstance(policy_config(TinyQwen3VL()), Qwen3VLConfig)  # mmsr plan sizes it too


def reference_positions(ids: list[int], vision, image_id: int) -> torch.Tensor:
    """M-RoPE positions ``[3, L]`` written out by hand: text advances all three axes by one; an image
    of ``h x w`` merged tokens starting at ``p`` takes ``(p, p + row, p + col)``; the text after it
    starts at ``p + max(h, w)``."""
    out, pos, i, images = [], 0, 0, iter(vision)
    while i < len(ids):
        if ids[i] != image_id:
            out.append((pos, pos, pos))
            pos, i = pos + 1, i + 1
            continue
        _, gh, gw = (g // m for g, m in zip(next(images).grid_thw, (1, 2, 2)))
        out += [(pos, pos + r, pos + c) for r in range(gh) for c in range(gw)]
        pos, i = pos + max(gh, gw), i + gh * gw
    return torch.tensor(out).T


def test_positions_are_each_familys_own_mrope_in_multi_turn_sequences(vl_policy, fvqa_samples):
    """Question image + two tool images: mmsr's positions are the hand-written M-RoPE, and the model
    run on them gives the logits the model gives when it builds its positions itself (from the
    processor's ``mm_token_type_ids``, as transformers' own generate does)."""
    (traj,), _ = multi_turn_contexts(vl_policy, fvqa_samples[:1])
    image_id = vl_policy.model.config.image_token_id
    ids = torch.tensor(traj.input_ids)
    pos = vl_policy.position_ids(ids, traj.vision)
    assert len(traj.vision) == 3 and torch.equal(pos, reference_positions(traj.input_ids, traj.vision, image_id))
    pixels = torch.cat([v.pixel_values for v in traj.vision])
    grid = torch.tensor([v.grid_thw for v in traj.vision])
    with torch.no_grad():
        ours = vl_policy.forward(ids[None], torch.ones_like(ids)[None], pos[:, None], traj.vision).logits
        own = vl_policy.model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], pixel_values=pixels,
                              image_grid_thw=grid, mm_token_type_ids=(ids == image_id).int()[None]).logits  # fmt: skip
    keep = ~torch.isin(torch.arange(ours.shape[-1]), vl_policy.banned_token_ids(ours.shape[-1]))
    torch.testing.assert_close(own[..., keep], ours[..., keep])


def test_chat_pieces_are_the_qwen3_vl_template(tiny_qwen3_vl):
    # The template is the released one byte for byte (size and SHA-256 of Qwen/Qwen3-VL-8B-Instruct's).
    assert len(QWEN3_VL_CHAT_TEMPLATE.encode()) == 5292
    assert hashlib.sha256(QWEN3_VL_CHAT_TEMPLATE.encode()).hexdigest().startswith("3636d0f0bd6bef02")
    tok, chat = tiny_qwen3_vl.tokenizer, tiny_qwen3_vl.chat
    texts = ("Q", "R1", "O", "R2", "O2", "R3")
    messages = [{"role": ["user", "assistant"][i % 2], "content": t} for i, t in enumerate(texts)]
    assert pieces(chat, texts) == tok.apply_chat_template(messages, tokenize=False)
    assert chat.first_prompt("Q") == tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert chat.first_prompt("Q").startswith("<|im_start|>user\n")  # no default system message
    # An image in the user turn renders as the vision tokens the encoder writes around its pads.
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    rendered = tok.apply_chat_template(image, tokenize=False, add_generation_prompt=True)
    ids = tiny_qwen3_vl.encoder().encode(chat.first_prompt("<image>Q"), [1])
    assert tok.encode(rendered, add_special_tokens=False) == ids


def test_chat_format_reads_each_template_and_refuses_others(tiny_policy, tiny_qwen3_vl):
    assert chat_format(tiny_policy.tokenizer) == ChatFormat()  # Qwen2.5-VL: its default system message
    tok = tiny_qwen3_vl.tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        with pytest.raises(ValueError, match="not ChatML"):
            chat_format(tok)
        # ChatML that rewrites assistant turns (as thinking templates do) cannot be built turn by turn.
        tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                             "{{ m['content'] | lower }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
        with pytest.raises(ValueError, match="two-round conversation"):
            chat_format(tok)
    finally:
        tok.chat_template = saved


def test_pretrained_qwen3_vl_directory_round_trip(tiny_qwen3_vl, tmp_path, fvqa_samples):
    save_policy(tiny_qwen3_vl, tmp_path)
    loaded = PretrainedPolicy(str(tmp_path), tool_image_min_pixels=None, tool_image_max_pixels=None).build()
    assert type(loaded.model) is Qwen3VLForConditionalGeneration and loaded.chat == ChatFormat(system=None)
    assert loaded.image_processor.patch_size == 16 and list(loaded.image_processor.image_mean) == [0.5] * 3
    (traj,), _ = multi_turn_contexts(tiny_qwen3_vl, fvqa_samples[:1])
    again = [loaded.process_image(v.image, tool=i > 0) for i, v in enumerate(traj.vision)]
    assert [v.grid_thw for v in again] == [v.grid_thw for v in traj.vision]
    assert all(torch.equal(a.pixel_values, v.pixel_values) for a, v in zip(again, traj.vision))
    ids = torch.tensor([traj.input_ids])
    pos = loaded.position_ids(ids[0], again)[:, None]
    assert torch.equal(pos[:, 0], tiny_qwen3_vl.position_ids(ids[0], traj.vision))
    with torch.no_grad():
        a = tiny_qwen3_vl.forward(ids, torch.ones_like(ids), pos, traj.vision).logits
        b = loaded.forward(ids, torch.ones_like(ids), pos, again).logits
    torch.testing.assert_close(a, b)
    assert not isinstance(loaded.model, Qwen2_5_VLForConditionalGeneration)


def test_real_qwen_vocabulary_with_the_qwen3_vl_template(fvqa_samples):
    """Qwen3-VL keeps Qwen's vocabulary and vision ids: with the real tokenizer and the Qwen3-VL
    template, an episode built piece by piece (question image + two thumbnails) opens on the user
    turn and is exactly the tokenization of its own text."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmsr.models.policy import Policy
    from mmsr.models.tiny_qwen3_vl import GRID, NORMALIZE
    from mmsr.rollout.engine import SamplingParams
    from tests.prompt.test_chat import qwen_tokenizer
    from tests.rollout.test_loop import ANS, IMG, TXT, make_loop

    tok = qwen_tokenizer()
    tok.chat_template = QWEN3_VL_CHAT_TEMPLATE
    processor = Qwen2VLImageProcessorPil(**GRID, **NORMALIZE, min_pixels=64 * 64, max_pixels=128 * 128)
    policy = Policy(model=None, tokenizer=tok, image_processor=processor, chat=chat_format(tok))
    sample = fvqa_samples[0]
    loop, _ = make_loop(policy, {f"{sample.id}#0": [IMG, TXT, ANS]})
    (traj,) = loop.run([sample], 1, SamplingParams())
    text = tok.decode(traj.input_ids, skip_special_tokens=False)
    assert policy.chat == ChatFormat(system=None) and text.startswith("<|im_start|>user\n")
    assert tok.encode(text, add_special_tokens=False) == traj.input_ids
    assert traj.input_ids.count(151655) == sum(v.num_tokens for v in traj.vision) and len(traj.vision) == 3


def test_inverted_pixel_bounds_are_refused_when_the_builder_is_made():
    """As ``TinyQwen2_5_VL`` and ``PretrainedPolicy`` do: a tool max under the question images' min (64*64, the bound a
    ``None`` tool min stands for) built a tool processor that resized a 200x150 thumbnail to one token, silently;
    a question min over its max was taken as well. Each is refused before the tokenizer trains, naming the fields."""
    tool = "TinyQwen3VL: tool_image_min_pixels resolves to 4096 > tool_image_max_pixels 1000 "
    with pytest.raises(ValueError, match=tool):
        TinyQwen3VL(tool_image_max_pixels=1000)
    with pytest.raises(ValueError, match=r"TinyQwen3VL: min_pixels resolves to 20000 > max_pixels 10000"):
        TinyQwen3VL(min_pixels=20000, max_pixels=10000)
    accepted = TinyQwen3VL(tool_image_min_pixels=32 * 32, tool_image_max_pixels=64 * 64)  # tool bounds of their own
    assert accepted.tool_pixels == {"min_pixels": 1024, "max_pixels": 4096}
