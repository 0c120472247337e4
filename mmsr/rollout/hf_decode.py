"""The HF engine's decode state: a KV cache written in place, a mask built once, grouped heads unrepeated.

Per sampled token, transformers' defaults copy the whole KV cache twice: ``DynamicCache`` concatenates
each layer's keys and values, and the SDPA wrapper repeats the KV heads to the query heads whenever a
mask is given (``repeat_kv``). They also rebuild the attention mask from the 2-D padding mask. Here the
cache is allocated once at its final length and written in place (``SlabLayer``), the additive mask of
the left-padded batch is built once (a generated token is never padding: the mask of step ``t`` is a
prefix of the mask of the last step), and one-token attention hands the grouped heads to SDPA
(``enable_gqa``). With that mask a step runs the decoder layers directly (``layer_step``): the model's
forward spends ~0.5 ms of a ~3 ms step of the tiny CPU models around its layers (output capture, config
defaults, mask and position preprocessing, output classes). The same kernels see the same values: tokens
and log-probs equal the dynamic path's bit for bit (``tests/models/test_hf_decode.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# The attention implementation the decode steps run under (registered below; prefill delegates to SDPA).
DECODE_ATTENTION = "mmsr_sdpa_decode"


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with the KV heads left grouped for one-token queries; anything else is transformers' SDPA.

    Args:
        query: ``[B, H, Q, D]``; key, value: ``[B, KV, L, D]``; attention_mask: ``[B, 1, Q, L]``
            additive (0 or -inf) or bool.
    Returns: ``[B, Q, H, D]`` and no attention weights.
    """
    if query.shape[2] != 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    grouped = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=grouped)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


@contextmanager
def decode_attention_for(model) -> Iterator[bool]:
    """Run the language model's attention through ``decode_attention`` while inside, when it uses SDPA
    and full attention in every layer (flash-attention and eager keep their own; sliding-window layers
    need the masks transformers builds per layer type). Yields whether it does (then masks may be 4-D)."""
    config = model.config.get_text_config()
    before = config._attn_implementation
    if before != "sdpa" or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        yield False
        return
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = before


class SlabLayer(DynamicLayer):
    """One layer's keys and values in buffers ``[B, KV, capacity, D]`` allocated on the first write;
    ``keys``/``values`` are views of the filled prefix (what ``DynamicLayer`` exposes, without copies).

    Both slabs take the values' dtype, the compute dtype: under autocast on float32 weights the rotary
    tables stay float32, so rotated keys come in float32 while values are bf16. Every attention kernel
    casts the keys to the compute dtype anyway (autocast's SDPA and matmuls; flash-attention casts float32
    inputs to it), so storing them rounded once gives the same logits, at the bytes ``mmsr plan`` counts."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = value_states.dtype, key_states.device
        b, h, _, _ = key_states.shape
        self.key_slab = key_states.new_zeros(b, h, self.capacity, key_states.shape[-1], dtype=self.dtype)
        self.value_slab = value_states.new_zeros(b, h, self.capacity, value_states.shape[-1])
        self.length, self.is_initialized = 0, True
        self._views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``[B, KV, n, D]`` new states after the filled prefix; returns the filled views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens for a capacity of {self.capacity}")
        self.key_slab[:, :, self.length : end] = key_states
        self.value_slab[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) the batch rows ``indices`` ``[B']``."""
        if self.is_initialized:
            self.key_slab, self.value_slab = self.key_slab[indices], self.value_slab[indices]
            self._views()

    def _views(self) -> None:
        self.keys = self.key_slab[:, :, : self.length]
        self.values = self.value_slab[:, :, : self.length]


def slab_cache(model, capacity: int) -> Cache:
    """A cache of ``SlabLayer``s for every decoder layer of ``model`` (``capacity`` tokens per row)."""
    layers = model.config.get_text_config().num_hidden_layers
    return Cache(layers=[SlabLayer(capacity) for _ in range(layers)])


def additive_mask(attention: torch.Tensor, capacity: int, dtype: torch.dtype) -> torch.Tensor:
    """The decode mask of a left-padded batch: 0 where a row may attend, -inf on its padding.

    Args:
        attention: ``[B, T]`` 1 on the prompt's real tokens.
    Returns: ``[B, 1, 1, capacity]`` (positions past ``T`` are generated tokens, all visible); step
    ``t``'s mask is its prefix ``[..., :T + t + 1]``.
    """
    mask = torch.zeros(attention.shape[0], 1, 1, capacity, dtype=dtype, device=attention.device)
    mask[:, 0, 0, : attention.shape[1]].masked_fill_(attention == 0, float("-inf"))
    return mask


class DecodeBatch:
    """The rows being decoded in lockstep: their cache, attention mask and next positions.

    Args:
        cache: the prefilled ``slab_cache`` (``length`` tokens per row).
        mask: ``[B, 1, 1, capacity]`` additive (``additive_mask``, with ``decode_attention``) or
            ``[B, capacity]`` 0/1 (any other attention); each step passes its filled prefix.
        next_pos: ``[3, B]`` (M-RoPE) or ``[B]`` position of each row's next token.
    """

    def __init__(self, cache: Cache, mask: torch.Tensor, next_pos: torch.Tensor, length: int) -> None:
        self.cache, self.mask, self.next_pos, self.length = cache, mask, next_pos, length

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` ``[B']`` (finished rows leave the batch)."""
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[..., index]

    def step(self, model, tokens: torch.Tensor):
        """Feed ``tokens`` ``[B]`` (one per row); returns the model output (``.logits`` ``[B, 1, V]``)."""
        self.length += 1
        mask, positions = self.mask[..., : self.length], self.next_pos[..., None]
        # the additive mask: every layer is full attention under ``decode_attention``
        if mask.dim() == 4 and model.config.model_type in LAYER_STEP_MODELS:
            out = layer_step(model, tokens, mask, positions, self.cache)
        else:
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                        use_cache=True)  # fmt: skip
        self.next_pos = self.next_pos + 1
        return out


# Families whose forward, for text tokens, is exactly embed -> rotary -> layers -> norm -> lm_head (checked
# bit for bit in tests/models/test_hf_decode.py); others (e.g. Granite scales its embeddings and logits outside
# the layers) keep their forward.
LAYER_STEP_MODELS = frozenset({"qwen2", "qwen2_5_vl", "qwen3_vl"})


def decoder_stack(model):
    """The text decoder (embeddings, rotary embedding, layers, final norm) of a causal LM or a Qwen VL model."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def layer_step(model, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache) -> SimpleNamespace:
    """One decode step through the decoder layers themselves: what the model's forward computes for one
    text token per row and a prepared 4-D mask (no images, every layer full attention), without the
    per-call work around the layers (output capture, config defaults, mask and position preprocessing,
    output classes).

    Args:
        tokens: ``[B]``; mask: ``[B, 1, 1, L]`` additive; positions: ``[3, B, 1]`` (M-RoPE) or ``[B, 1]``.
    Returns: ``.logits`` ``[B, 1, V]``.
    """
    stack = decoder_stack(model)
    hidden = stack.embed_tokens(tokens[:, None])
    rope = stack.rotary_emb(hidden, positions)
    for layer in stack.layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, past_key_values=cache, use_cache=True)
    return SimpleNamespace(logits=model.lm_head(stack.norm(hidden)))
