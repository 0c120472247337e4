"""A tiny random-weight text-only Qwen2 policy (CPU tests of the text-only path and of vLLM).

The text-only vLLM engine tests use this model (the vision ones a ``TinyQwen2_5_VL``): the same chat
format, special tokens and tokenizer as ``TinyQwen2_5_VL``, the Qwen2 language model architecture,
and a head size vLLM's CPU attention kernels support (a multiple of 32).
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mmsr.models.tokenizer import corpus_texts
from mmsr.models.policy import Policy
from mmsr.models.tokenizer import TokenizerCorpus, train_bpe_tokenizer


class TinyQwen2:
    """A random-weight ``Qwen2ForCausalLM`` with a small BPE tokenizer trained on ``tokenizer_texts``.

    Args:
        tokenizer_texts: jsonl/text files whose strings, or question parquets whose prompts, train the
            tokenizer (after ``scaffold``'s texts, ``corpus_texts``).
        scaffold: extra tokenizer training text, as for ``TinyQwen2_5_VL``.
        vocab_size: BPE target size (the model's vocabulary is the tokenizer's real length).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: model shape; the head
            size ``hidden_size // num_heads`` must be a multiple of 32 for vLLM on CPU.
        seed: weight initialization seed.
    """

    def __init__(
        self,
        tokenizer_texts: list[str] | None = None,
        scaffold: TokenizerCorpus | None = None,
        vocab_size: int = 512,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 256,
        seed: int = 0,
    ) -> None:
        if hidden_size % num_heads or (hidden_size // num_heads) % 32:
            raise ValueError(f"head size hidden_size/num_heads = {hidden_size}/{num_heads} must be a multiple of 32")
        self.tokenizer_texts, self.scaffold = tokenizer_texts or [], scaffold
        self.vocab_size = vocab_size
        self.shape = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                          num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size)  # fmt: skip
        self.seed = seed

    def config(self, tokenizer) -> Qwen2Config:
        return Qwen2Config(
            **self.shape, vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=10000.0,
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )  # fmt: skip

    def build(self) -> Policy:
        tokenizer = train_bpe_tokenizer(corpus_texts(self.tokenizer_texts, self.scaffold), self.vocab_size)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = Qwen2ForCausalLM(self.config(tokenizer))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return Policy(model.float(), tokenizer)
