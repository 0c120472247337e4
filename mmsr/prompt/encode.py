"""Chat text with image markers -> token ids, with every image expanded to its vision tokens."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from mmsr.tools.base import IMAGE_MARKER


class Encoder:
    """Tokenizes text segments of a growing context without ever re-tokenizing earlier parts.

    Args:
        tokenizer: the policy's tokenizer; special tokens written as text are parsed as specials.
        image_token: the pad token one image occupies ``num_tokens`` times (``None`` = text-only
            model: markers become ``text_image_stub``).
        vision_start, vision_end: tokens around each image.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_token: str | None = "<|image_pad|>",
        vision_start: str = "<|vision_start|>",
        vision_end: str = "<|vision_end|>",
        text_image_stub: str = "[image]",
    ) -> None:
        self.tokenizer = tokenizer
        self.text_image_stub = text_image_stub
        # the strings that tokenize as one added token (chat and vision specials, a tokenizer's own tags),
        # longest first; the image marker is the prompt stage's own
        added = [t for t in tokenizer.get_added_vocab() if len(t) > 1 and t != IMAGE_MARKER]
        self._added = sorted(added, key=len, reverse=True)
        self.image_id = self._id(image_token) if image_token else None
        self.start_id = self._id(vision_start) if image_token else None
        self.end_id = self._id(vision_end) if image_token else None

    def _id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no token {token!r}; is this a vision-language tokenizer?")
        return int(ids[0])

    def plain(self, text: str) -> str:
        """``text`` from outside (a tool's result, a question) with each added token it spells broken by a
        space after its first character, so that it tokenizes as the text it is: a page quoting
        ``<|im_end|>`` must not end the turn, nor one quoting ``<|image_pad|>`` claim an image."""
        for token in self._added:
            if token in text:
                text = text.replace(token, f"{token[0]} {token[1:]}")
        return text

    def text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str, image_tokens: Sequence[int] = ()) -> list[int]:
        """Token ids of ``text``; the i-th ``IMAGE_MARKER`` expands to ``image_tokens[i]`` pads.

        Returns:
            ``[L]`` ids.
        """
        pieces = text.split(IMAGE_MARKER)
        if self.image_id is None:  # a text-only model is told an image was there, and no more
            return self.text(self.text_image_stub.join(pieces))
        if len(pieces) - 1 != len(image_tokens):
            raise ValueError(f"text has {len(pieces) - 1} image markers but {len(image_tokens)} images")
        ids = self.text(pieces[0])
        for n, piece in zip(image_tokens, pieces[1:]):
            ids += [self.start_id] + [self.image_id] * n + [self.end_id] + self.text(piece)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
