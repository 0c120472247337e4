"""The ``ChatFormat`` a tokenizer's own chat template writes.

Models of one family differ in their template: Qwen2.5-VL opens every conversation with a default
system message, Qwen3-VL-Instruct writes none. The multi-turn loop appends ChatML pieces
(``ChatFormat``); ``chat_format`` reads which pieces the model's template uses and checks them
against the template over a two-round conversation, so a template the pieces cannot reproduce is a
clear error at build time rather than a silently different prompt in training.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

from mmsr.prompt.render import ChatFormat

# Probe texts: plain words no template rewrites.
_PROBES = ("Q", "R1", "O", "R2")
_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", re.DOTALL)


def _render(tokenizer: PreTrainedTokenizerBase, texts: tuple[str, ...], generation_prompt: bool) -> str:
    roles = ["user", "assistant"] * len(texts)
    messages = [{"role": role, "content": text} for role, text in zip(roles, texts)]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def pieces(chat: ChatFormat, texts: tuple[str, ...]) -> str:
    """A conversation of alternating user/assistant ``texts`` (ending on an assistant turn) as the
    rollout loop builds it from ``chat``'s pieces."""
    out = chat.first_prompt(texts[0])
    for reply, user in zip(texts[1::2], texts[2::2]):
        out += reply + chat.end_of_turn + chat.observation(user)
    return out + texts[-1] + chat.end_of_turn + "\n"


def chat_format(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """The ChatML pieces of ``tokenizer``'s chat template: its default system message (or none).

    A tokenizer without a template gets ``ChatFormat()`` (Qwen2.5-VL's). Raises ``ValueError`` when
    the template does not render the conversation the pieces build (not ChatML, or a template that
    rewrites earlier turns).
    """
    if not getattr(tokenizer, "chat_template", None):
        return ChatFormat()
    prompt = _render(tokenizer, _PROBES[:1], generation_prompt=True)
    turn = ChatFormat(system=None).first_prompt(_PROBES[0])
    head = prompt[: -len(turn)] if prompt.endswith(turn) else None
    system = _SYSTEM.fullmatch(head) if head else None
    if head is None or (head and system is None):
        raise ValueError(f"the tokenizer's chat template is not ChatML as mmsr writes it: a user turn renders {prompt!r}")
    chat = ChatFormat(system=system.group(1) if system else None)
    expected, built = _render(tokenizer, _PROBES, generation_prompt=False), pieces(chat, _PROBES)
    if built != expected:
        raise ValueError(f"the tokenizer's chat template renders a two-round conversation as {expected!r}, "
                         f"but mmsr's ChatML pieces build {built!r}")  # fmt: skip
    return chat
