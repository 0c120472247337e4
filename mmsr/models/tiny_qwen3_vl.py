"""A tiny random-weight Qwen3-VL (CPU tests of the Qwen3-VL path; the real one is ``PretrainedPolicy``).

What differs from Qwen2.5-VL, all taken by the same ``Policy`` code: 16-pixel patches (a merged
token covers 32x32 pixels) normalized to [-1, 1]; a ViT with learned, interpolated position
embeddings and DeepStack (features of some vision layers are added to the hidden states of the
first language layers at the image tokens); interleaved M-RoPE; a chat template without a default
system message. Positions come from the model's own ``get_rope_index`` (``Policy.position_ids``).
"""

from __future__ import annotations

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmsr.models.build import check_bounds, text_config, tool_bounds, vision_token_ids
from mmsr.models.policy import Policy
from mmsr.models.tokenizer import QWEN3_VL_CHAT_TEMPLATE, TokenizerCorpus, corpus_texts, train_bpe_tokenizer
from mmsr.prompt.chat_template import chat_format

# Qwen3-VL's image normalization and patch grid (preprocessor_config.json of the released models).
GRID = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
NORMALIZE = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def interleaved_mrope_sections(head_dim: int) -> list[int]:
    """(time, height, width) rotary frequencies of interleaved M-RoPE, in Qwen3-VL's proportion
    (24/20/20 of 64): height and width take every third frequency from 1 and 2, time the rest."""
    half = head_dim // 2
    h = (half * 20) // 64
    return [half - 2 * h, h, h]


class TinyQwen3VL:
    """A random-weight Qwen3-VL with a small BPE tokenizer carrying Qwen3-VL's chat template.

    Args:
        tokenizer_texts: jsonl/text files or question parquets training the tokenizer (``corpus_texts``).
        scaffold: extra tokenizer training text, as for ``TinyQwen2_5_VL``.
        vocab_size: BPE target size (the model's vocabulary is the tokenizer's real length).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: language model shape
            (head size ``hidden_size // num_heads``).
        vision_depth, vision_hidden_size: vision tower shape (patch 16, merge 2 as in Qwen3-VL).
        deepstack_layers: vision layers whose merged features are added to the first language layers
            (at most ``num_layers`` of them).
        min_pixels, max_pixels: image resize bounds (64*64 .. 128*128: 4 to 16 tokens per image).
        tool_image_min_pixels, tool_image_max_pixels: resize bounds of images returned by tools
            (``None``: the question images' bounds).
        seed: weight initialization seed.
    """

    def __init__(
        self,
        tokenizer_texts: list[str] | None = None,
        scaffold: TokenizerCorpus | None = None,
        vocab_size: int = 512,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 128,
        vision_depth: int = 2,
        vision_hidden_size: int = 32,
        deepstack_layers: tuple[int, ...] = (0,),
        min_pixels: int = 64 * 64,
        max_pixels: int = 128 * 128,
        tool_image_min_pixels: int | None = None,
        tool_image_max_pixels: int | None = None,
        seed: int = 0,
    ) -> None:
        if len(deepstack_layers) > num_layers or any(not 0 <= i < vision_depth for i in deepstack_layers):
            raise ValueError(f"deepstack_layers {deepstack_layers} must be vision layers (< {vision_depth}), "
                             f"at most num_layers ({num_layers}) of them")  # fmt: skip
        self.tokenizer_texts, self.scaffold = tokenizer_texts or [], scaffold
        self.vocab_size = vocab_size
        self.text = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
                         head_dim=hidden_size // num_heads)  # fmt: skip
        self.vision = dict(depth=vision_depth, hidden_size=vision_hidden_size, num_heads=2,
                           intermediate_size=2 * vision_hidden_size, out_hidden_size=hidden_size,
                           deepstack_visual_indexes=list(deepstack_layers))  # fmt: skip
        self.pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels)
        self.tool_pixels = tool_bounds(tool_image_min_pixels, tool_image_max_pixels)
        check_bounds("TinyQwen3VL", self.pixels, self.tool_pixels)  # when the builder is made, before the build
        self.seed = seed

    def config(self, tokenizer) -> Qwen3VLConfig:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                "mrope_section": interleaved_mrope_sections(self.text["head_dim"])}  # fmt: skip
        # An 8x8 learned position grid (the real one is 48x48), interpolated to each image's patch grid.
        vision = dict(self.vision, patch_size=GRID["patch_size"], spatial_merge_size=GRID["merge_size"],
                      temporal_patch_size=GRID["temporal_patch_size"], num_position_embeddings=64)  # fmt: skip
        return Qwen3VLConfig(text_config=text_config(self.text, tokenizer, rope), vision_config=vision,
                             tie_word_embeddings=True, **vision_token_ids(tokenizer))  # fmt: skip

    def train_tokenizer(self):
        """The small BPE tokenizer with Qwen3-VL's chat template (deterministic for the same texts)."""
        texts = corpus_texts(self.tokenizer_texts, self.scaffold)
        return train_bpe_tokenizer(texts, self.vocab_size, chat_template=QWEN3_VL_CHAT_TEMPLATE)

    def build(self) -> Policy:
        tokenizer = self.train_tokenizer()
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = Qwen3VLForConditionalGeneration(self.config(tokenizer))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        processor = Qwen2VLImageProcessorPil(**GRID, **NORMALIZE, **self.pixels)
        tools = Qwen2VLImageProcessorPil(**GRID, **NORMALIZE, **(self.pixels | self.tool_pixels)) if self.tool_pixels else None
        return Policy(model.float(), tokenizer, processor, chat=chat_format(tokenizer), tool_image_processor=tools)
