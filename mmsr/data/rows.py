"""Row dicts -> validated ``Sample`` records, whatever the container (a parquet or jsonl file, a Hugging
Face ``datasets`` split): the two schemas and the errors that name the file, row and field.

- MMSearch-R1 / verl rows: ``prompt``, ``images``, ``reward_model``, ``data_source``, ``image_urls``,
  ``extra_info`` (spec §8);
- flat rows: ``data_id``/``id``, ``question``, ``ground_truth``, ``candidate_answers``, ``image`` (a path
  relative to the file, or image bytes / a PIL image), optional ``data_source``, ``category``, ``image_url``.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from mmsr.data.sample import EncodedImage, Sample
from mmsr.data.threads import in_order

RowMaker = Callable[[dict, Path, int], Sample]


class DataError(ValueError):
    """A row that cannot become a ``Sample``; the message names file, row and field."""


def row_error(path, row, field, problem) -> DataError:
    """The error for ``field`` of row ``row`` of ``path``."""
    return DataError(f"{path}: row {row}, field {field!r}: {problem}")


def decode_image(data: bytes | str | Path | Image.Image, path, row, field="image") -> Image.Image:
    """Open image bytes, a file or a PIL image as RGB, or raise a ``DataError`` naming the row."""
    try:
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise row_error(path, row, field, f"cannot decode image ({exc})") from None


def encoded_image(data: bytes | str | Path | Image.Image, path, row, field="image") -> EncodedImage | Image.Image:
    """Image bytes or a file, checked by decoding them once and kept encoded (``EncodedImage``: decoded
    again when read); a ``PIL`` image (a decoded ``datasets`` column) is kept as RGB. A bad image raises
    a ``DataError`` naming the row."""
    if isinstance(data, Image.Image):
        return decode_image(data, path, row, field)
    try:
        raw = data if isinstance(data, bytes) else Path(data).read_bytes()
    except OSError as exc:
        raise row_error(path, row, field, f"cannot read image ({exc})") from None
    decode_image(raw, path, row, field)
    return EncodedImage(raw)


def candidate_list(value, path, row) -> tuple[str, ...]:
    """Candidate answers come as a list or as a JSON string of a list (upstream data)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise row_error(path, row, "candidate_answers", f"not a JSON list ({exc.msg})") from None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise row_error(path, row, "candidate_answers", f"expected a list of strings, got {value!r:.80}")
    return tuple(value)


def _text(value, path, row, field) -> str:
    if not isinstance(value, str) or not value.strip():
        raise row_error(path, row, field, f"missing or empty ({value!r:.40})")
    return value


def _parquet_question(prompt, path, row) -> str:
    """The last user message of the verl ``prompt`` column (a list of ``{role, content}`` dicts)."""
    if prompt is None or isinstance(prompt, str | bytes | dict) or not all(isinstance(m, dict) for m in prompt):
        raise row_error(path, row, "prompt", f"expected a list of {{role, content}} messages, got {prompt!r:.60}")
    users = [m.get("content") for m in prompt if m.get("role") == "user"]
    return _text(users[-1] if users else None, path, row, "prompt")


def _parquet_image(images, path, row) -> EncodedImage | Image.Image:
    """The first entry of ``images``: ``{"bytes": ...}`` / ``{"path": ...}`` (parquet) or a PIL image (datasets)."""
    first = images[0] if isinstance(images, list | tuple) and len(images) else None
    if isinstance(first, Image.Image):
        return encoded_image(first, path, row, "images")
    data = (first.get("bytes") or first.get("path")) if isinstance(first, dict) else None
    if not data:
        raise row_error(path, row, "images", f"no image bytes (got {images!r:.60})")
    return encoded_image(data, path, row, "images")


def parquet_sample(r: dict, path: Path, i: int) -> Sample:
    question = _parquet_question(r.get("prompt"), path, i)
    reward = r.get("reward_model")
    if not isinstance(reward, dict):
        raise row_error(path, i, "reward_model", f"expected a dict with 'ground_truth', got {reward!r:.60}")
    extra = r.get("extra_info") or {}
    return Sample(
        id=str(r.get("data_id") or extra.get("index", f"{path.stem}-{i}")),
        question=question,
        image=_parquet_image(r.get("images"), path, i),
        ground_truth=_text(reward.get("ground_truth"), path, i, "reward_model.ground_truth"),
        candidate_answers=candidate_list(reward.get("candidate_answers"), path, i),
        data_source=r.get("data_source") or "mmsearch_r1",
        image_url=r.get("image_urls") or None,
        category=r.get("category"),
        extra=dict(extra),
    )


def jsonl_sample(r: dict, path: Path, i: int) -> Sample:
    image_rel = r.get("image")
    image = None
    if isinstance(image_rel, Image.Image | bytes | dict):  # a datasets Image feature, decoded or not
        raw = image_rel.get("bytes") or image_rel.get("path") if isinstance(image_rel, dict) else image_rel
        image = encoded_image(raw, path, i) if raw else None
    elif image_rel is not None:
        file = path.parent / image_rel
        if not file.is_file():
            raise row_error(path, i, "image", f"file {file} does not exist")
        image = encoded_image(file, path, i)
    return Sample(
        id=str(r.get("data_id") or r.get("id") or f"{path.stem}-{i}"),
        question=_text(r.get("question"), path, i, "question"),
        image=image,
        ground_truth=_text(r.get("ground_truth"), path, i, "ground_truth"),
        candidate_answers=candidate_list(r.get("candidate_answers"), path, i),
        data_source=r.get("data_source") or "mmsearch_r1",
        image_url=r.get("image_url") or None,
        category=r.get("category"),
    )


def collect(rows: Iterable[dict], make: RowMaker, path: Path, skip_invalid: bool) -> list[Sample]:
    """``make`` every row; a ``DataError`` raises, or with ``skip_invalid`` is counted and warned once.
    Rows are made on every core (checking an image decodes it, which Pillow does without the GIL), and
    taken in order: the first bad row is the one named, as row by row."""
    samples, errors = [], []
    for made in in_order(lambda numbered: make(numbered[1], path, numbered[0]), enumerate(rows)):
        try:
            samples.append(made.result())
        except DataError as exc:
            if not skip_invalid:
                raise
            errors.append(str(exc))
    if errors:
        warnings.warn(f"skipped {len(errors)} invalid rows of {path}; first: {errors[0]}", stacklevel=2)
    return samples
