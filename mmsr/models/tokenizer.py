"""Small BPE tokenizers trained offline, carrying Qwen's special tokens and a real chat template.

Vocabulary size dominates CPU cost (a 152k-row embedding and LM head make a tiny model 14-40x
slower), so tests and the demo train a few-hundred-token BPE in ~0.1 s while keeping the exact
special tokens and template that real Qwen2.5-VL uses, so the same code path runs. Their training text is
every string of the given files (``corpus_texts``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmsr.data.jsonl import json_values
from mmsr.data.paths import require_file

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

# The action and result tags as single tokens: real Qwen splits them into several pieces, a tiny
# model learns faster with one. They stay normal (non-special) tokens, so decoding keeps them.
TAG_TOKENS = (
    "<reason>", "</reason>", "<answer>", "</answer>", "<search>", "</search>", "<img>",
    "<text_search>", "</text_search>", "<information>", "</information>",
)  # fmt: skip

# Qwen2.5-VL's chat template, restricted to text and image content.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Qwen3-VL-Instruct's chat template, verbatim (no default system message; source in known_configs/SOURCE.md).
QWEN3_VL_CHAT_TEMPLATE = (Path(__file__).parent / "known_configs" / "Qwen3-VL-8B-Instruct.chat_template.jinja").read_text(encoding="utf-8")


class TokenizerCorpus(Protocol):
    """Extra training text for a small tokenizer, e.g. text every episode carries, repeated so that BPE
    merges it first (``mmsr.demo.tokenizer.Scaffold``)."""

    def texts(self) -> list[str]: ...


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, chat_template: str = QWEN2_5_VL_CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (deterministic for the same input).

    Returns a ``PreTrainedTokenizerFast`` with ``<|im_end|>`` as EOS, ``<|endoftext|>`` as pad,
    Qwen's special tokens (ids 0..13), the tag tokens and ``chat_template`` (default Qwen2.5-VL's).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(list(TAG_TOKENS))
    return fast


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _jsonl_strings(path: str, text: str) -> Iterator[str]:
    """Every string of each non-blank line of JSON-lines ``text``, split as the data readers split it
    (``json_values``: a raw U+2028 inside a string ends no line); ValueError naming file and line otherwise."""
    for _, value in json_values(path, text):
        yield from _strings(value)


def _file_texts(path: str) -> list[str]:
    """Strings of a jsonl/text file, or the user messages of a question parquet (MMSearch-R1 schema)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        prompts = pq.read_table(require_file(path, "tokenizer text file"), columns=["prompt"]).column("prompt").to_pylist()
        return [m["content"] for p in prompts for m in p if isinstance(m.get("content"), str)]
    text = require_file(path, "tokenizer text file").read_text(encoding="utf-8")
    return list(_jsonl_strings(path, text)) if path.endswith(".jsonl") else text.splitlines()


def corpus_texts(paths: list[str], scaffold: TokenizerCorpus | None = None) -> list[str]:
    """Tokenizer training text: ``scaffold``'s texts, then every string in ``paths`` (jsonl, text or
    question parquet)."""
    return (scaffold.texts() if scaffold is not None else []) + [t for path in paths for t in _file_texts(path)]
