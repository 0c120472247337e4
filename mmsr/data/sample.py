"""The record every stage after loading works with: one question about one image.

Question images are kept encoded (``EncodedImage``: the file's bytes) and decoded when read: a data
set's decoded pixels are several times its files (the CPU demo's 4,800 training PNGs: ~110 MB of files,
~600 MB as decoded ``PIL`` images), and a step reads only a batch of them.
"""

from __future__ import annotations

import io
import weakref
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


# Qwen-VL's image processors (transformers' ``smart_resize``) refuse an image whose longer side is over 200 times
# its shorter one: the loaders refuse such a question image (the run would fail whenever its row is drawn), tools
# skip such a thumbnail.
MAX_ASPECT = 200


class EncodedImage:
    """An image kept as its encoded file bytes (PNG, JPEG, ...), decoded to RGB when read.

    While a decoded copy is alive (a rollout's vision inputs hold it), ``decode`` returns that same
    object, so a sample's image is one object during an episode; once nothing holds it, it is freed and
    the next read decodes again.

    Args:
        data: the image file's bytes; the loaders have decoded them once to check them.
    """

    __slots__ = ("data", "_decoded")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._decoded: weakref.ref[Image.Image] | None = None

    def decode(self) -> Image.Image:
        """The RGB image (the alive copy, or a new one)."""
        image = self._decoded() if self._decoded is not None else None
        if image is None:
            with Image.open(io.BytesIO(self.data)) as encoded:
                image = encoded.convert("RGB")
            self._decoded = weakref.ref(image)
        return image

    def __reduce__(self):  # a weak reference does not pickle; the bytes are the whole state
        return EncodedImage, (self.data,)

    def __repr__(self) -> str:
        return f"EncodedImage({len(self.data)} bytes)"


class _ImageField:
    """``Sample.image``: stores a ``PIL`` image, an ``EncodedImage`` or ``None``; reading it gives the
    ``PIL`` image (decoding an ``EncodedImage``). A dataclass field with a descriptor as its default
    stores through ``__set__``; ``__get__`` on the class raising ``AttributeError`` means no default."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Image.Image | None:
        if obj is None:
            raise AttributeError("Sample.image has no default")
        value = obj.__dict__[self.key]
        return value.decode() if isinstance(value, EncodedImage) else value

    def __set__(self, obj: Any, value: Image.Image | EncodedImage | None) -> None:
        obj.__dict__[self.key] = value


@dataclass(frozen=True)
class Sample:
    """One visual question.

    Attributes:
        id: stable row identifier (``data_id`` / parquet index), used for replay caches and logs.
        question: the bare question text (the round-1 instruction is added by the prompt stage).
        image: the question's image, RGB. ``None`` only for text-only data. An ``EncodedImage`` may be
            passed; reading ``image`` then decodes it (``stored_image`` is what is kept; so
            ``dataclasses.replace`` keeps it encoded only when given ``image=s.stored_image``).
        ground_truth: the reference answer.
        candidate_answers: other accepted answers (aliases).
        data_source: the source name, the key of per-source metrics (e.g. ``mmsearch_r1/fvqa``).
        image_url: a public URL of the image, for web image search backends; ``None`` if unknown.
        category: optional label (e.g. ``search_free`` / ``search_required``) for per-category metrics.
    """

    id: str
    question: str
    image: Image.Image | EncodedImage | None = _ImageField()  # type: ignore[assignment]
    ground_truth: str
    candidate_answers: tuple[str, ...] = ()
    data_source: str = "mmsearch_r1"
    image_url: str | None = None
    category: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def answers(self) -> tuple[str, ...]:
        """All accepted answers, ground truth first."""
        return (self.ground_truth, *self.candidate_answers)

    @property
    def stored_image(self) -> Image.Image | EncodedImage | None:
        """What the sample keeps: a ``PIL`` image, an ``EncodedImage`` (not decoded by this read) or None."""
        return self.__dict__["_image"]
