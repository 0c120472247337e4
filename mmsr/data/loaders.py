"""Rows on disk -> ``Sample`` records, validated, with errors that name the file, row and field.

Formats:
- MMSearch-R1 / verl parquet (``prompt``, ``images``, ``reward_model``, ``data_source``,
  ``image_urls``, ``extra_info``; spec §8), e.g. the official ``mini_data.pq`` unchanged;
- jsonl with an image folder (one object per line: ``data_id``/``id``, ``question``, ``ground_truth``,
  ``candidate_answers``, ``image`` as a path relative to the jsonl file, optional ``data_source``,
  ``category``, ``image_url``), e.g. ``data/fvqa_dev_20``;
- a Hugging Face ``datasets`` directory written by ``save_to_disk`` (either schema; images may be
  decoded ``PIL`` images), and in Python any ``datasets.Dataset`` via ``mmsr.data.hf``.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from PIL import Image

from mmsr.data.paths import require_file
from mmsr.data.sample import Sample


RowMaker = Callable[[dict, Path, int], Sample]


class DataError(ValueError):
    """A row that cannot become a ``Sample``; the message names file, row and field."""


def _fail(path, row, field, problem) -> DataError:
    return DataError(f"{path}: row {row}, field {field!r}: {problem}")


def decode_image(data: bytes | str | Path | Image.Image, path, row, field="image") -> Image.Image:
    """Open image bytes, a file or a PIL image as RGB, or raise a ``DataError`` naming the row."""
    try:
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise _fail(path, row, field, f"cannot decode image ({exc})") from None


def candidate_list(value, path, row) -> tuple[str, ...]:
    """Candidate answers come as a list or as a JSON string of a list (upstream data)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _fail(path, row, "candidate_answers", f"not a JSON list ({exc.msg})") from None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _fail(path, row, "candidate_answers", f"expected a list of strings, got {value!r:.80}")
    return tuple(value)


def _text(value, path, row, field) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, row, field, f"missing or empty ({value!r:.40})")
    return value


def _parquet_question(prompt, path, row) -> str:
    """The last user message of the verl ``prompt`` column (a list of ``{role, content}`` dicts)."""
    if prompt is None or isinstance(prompt, str | bytes | dict) or not all(isinstance(m, dict) for m in prompt):
        raise _fail(path, row, "prompt", f"expected a list of {{role, content}} messages, got {prompt!r:.60}")
    users = [m.get("content") for m in prompt if m.get("role") == "user"]
    return _text(users[-1] if users else None, path, row, "prompt")


def _parquet_image(images, path, row) -> Image.Image:
    """The first entry of ``images``: ``{"bytes": ...}`` / ``{"path": ...}`` (parquet) or a PIL image (datasets)."""
    first = images[0] if isinstance(images, list | tuple) and len(images) else None
    if isinstance(first, Image.Image):
        return decode_image(first, path, row, "images")
    data = (first.get("bytes") or first.get("path")) if isinstance(first, dict) else None
    if not data:
        raise _fail(path, row, "images", f"no image bytes (got {images!r:.60})")
    return decode_image(data, path, row, "images")


def _parquet_sample(r: dict, path: Path, i: int) -> Sample:
    question = _parquet_question(r.get("prompt"), path, i)
    reward = r.get("reward_model")
    if not isinstance(reward, dict):
        raise _fail(path, i, "reward_model", f"expected a dict with 'ground_truth', got {reward!r:.60}")
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


def _jsonl_sample(r: dict, path: Path, i: int) -> Sample:
    image_rel = r.get("image")
    image = None
    if isinstance(image_rel, Image.Image | bytes | dict):  # a datasets Image feature, decoded or not
        raw = image_rel.get("bytes") or image_rel.get("path") if isinstance(image_rel, dict) else image_rel
        image = decode_image(raw, path, i) if raw else None
    elif image_rel is not None:
        file = path.parent / image_rel
        if not file.is_file():
            raise _fail(path, i, "image", f"file {file} does not exist")
        image = decode_image(file, path, i)
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


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    yield from pq.read_table(path).to_pylist()


def _jsonl_rows(path: Path) -> Iterator[dict]:
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(path, i, "<line>", f"invalid JSON ({exc.msg})") from None


def load_samples(path: str | Path, skip_invalid: bool = False) -> list[Sample]:
    """Read and validate every row of a parquet or jsonl file.

    Args:
        skip_invalid: drop bad rows (with one warning saying how many and why) instead of raising.
    """
    path = Path(path)
    if path.is_dir():
        from mmsr.data.hf import load_dataset_dir

        return load_dataset_dir(path, skip_invalid)
    require_file(path, "data file")
    rows, make = _reader(path)
    return collect(rows, make, path, skip_invalid)


def collect(rows: Iterable[dict], make: RowMaker, path: Path, skip_invalid: bool) -> list[Sample]:
    """``make`` every row; a ``DataError`` raises, or with ``skip_invalid`` is counted and warned once."""
    samples, errors = [], []
    for i, row in enumerate(rows):
        try:
            samples.append(make(row, path, i))
        except DataError as exc:
            if not skip_invalid:
                raise
            errors.append(str(exc))
    if errors:
        warnings.warn(f"skipped {len(errors)} invalid rows of {path}; first: {errors[0]}", stacklevel=2)
    return samples


def _reader(path: Path) -> tuple[Iterator[dict], RowMaker]:
    if path.suffix in (".parquet", ".pq"):
        return _parquet_rows(path), _parquet_sample
    if path.suffix == ".jsonl":
        return _jsonl_rows(path), _jsonl_sample
    raise ValueError(f"{path}: unknown data format {path.suffix!r} (use .parquet, .pq or .jsonl)")
