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


def row_error(path, row: int | str, field, problem) -> DataError:
    """The error for ``field`` of row ``row`` of ``path``: ``row`` is the 0-based row index, or a ready
    label such as ``"line 4"`` (jsonl files, whose readers number lines as editors do)."""
    where = row if isinstance(row, str) else f"row {row}"
    return DataError(f"{path}: {where}, field {field!r}: {problem}")


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
    """Candidate answers come as a list or as a JSON string of a list (upstream data). Numbers (upstream
    JSON holds ints, e.g. years) are stringified, as the reward's ``parse_candidate_answers`` does: this
    layer may not import ``mmsr.reward``, so the rule (``str(v)``) is repeated here and must stay the same."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise row_error(path, row, "candidate_answers", f"not a JSON list ({exc.msg})") from None
    if not isinstance(value, list | tuple) or not all(_is_candidate(v) for v in value):
        raise row_error(path, row, "candidate_answers", f"expected a list of strings (or numbers), got {value!r:.80}")
    return tuple(v if isinstance(v, str) else str(v) for v in value)


def _is_candidate(value) -> bool:
    """A string or a number; a bool is a number to Python but no answer (a broken export, more likely)."""
    return isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool))


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


def _dict_image(cell: dict, path, row, field) -> EncodedImage:
    """A ``{"bytes", "path"}`` cell (a ``datasets`` Image column, undecoded): the bytes, else the file, a
    relative name read against the data file's folder as a plain path cell is (not the working directory,
    which would make the result depend on where ``mmsr`` runs). Neither is a ``DataError``: a row that
    names an image it does not have is broken, not a text-only question."""
    if cell.get("bytes"):
        return encoded_image(cell["bytes"], path, row, field)
    if cell.get("path"):
        return encoded_image(Path(path).parent / cell["path"], path, row, field)  # an absolute path is kept
    raise row_error(path, row, field, f"no image bytes or path (got {cell!r:.60})")


def _parquet_image(images, path, row) -> EncodedImage | Image.Image:
    """The first entry of ``images``: ``{"bytes": ...}`` / ``{"path": ...}`` (parquet) or a PIL image (datasets)."""
    first = images[0] if isinstance(images, list | tuple) and len(images) else None
    if isinstance(first, Image.Image):
        return encoded_image(first, path, row, "images")
    if not isinstance(first, dict):
        raise row_error(path, row, "images", f"no image bytes (got {images!r:.60})")
    return _dict_image(first, path, row, "images")


def _sample_id(values, default: str) -> str:
    """The first id of ``values`` that is set: ``None`` (a null in a struct column such as verl's
    ``extra_info``) and ``""`` are unset, ``0`` is an id. Ids key caches, so unset ones must not become
    ``"None"`` and collide."""
    return str(next((v for v in values if v is not None and v != ""), default))


def _extra_info(extra, path, row) -> dict:
    """verl's ``extra_info`` object, ``{}`` where unset. Anything else (e.g. JSON text) is a row error:
    ``.get`` on it would be an AttributeError naming no row, which ``skip_invalid`` cannot skip."""
    if not extra:  # None, and the empty values read as unset before
        return {}
    if not isinstance(extra, dict):
        raise row_error(path, row, "extra_info", f"expected an object, got {type(extra).__name__} ({extra!r:.60})")
    return extra


def parquet_sample(r: dict, path: Path, i: int) -> Sample:
    question = _parquet_question(r.get("prompt"), path, i)
    reward = r.get("reward_model")
    if not isinstance(reward, dict):
        raise row_error(path, i, "reward_model", f"expected a dict with 'ground_truth', got {reward!r:.60}")
    extra = _extra_info(r.get("extra_info"), path, i)
    return Sample(
        id=_sample_id((r.get("data_id"), extra.get("index")), f"{path.stem}-{i}"),
        question=question,
        image=_parquet_image(r.get("images"), path, i),
        ground_truth=_text(reward.get("ground_truth"), path, i, "reward_model.ground_truth"),
        candidate_answers=candidate_list(reward.get("candidate_answers"), path, i),
        data_source=r.get("data_source") or "mmsearch_r1",
        image_url=r.get("image_urls") or None,
        category=r.get("category"),
        extra=dict(extra),
    )


def jsonl_sample(r: dict, path: Path, i: int, line: int | None = None) -> Sample:
    """A flat-schema row; ``i`` is its row index (the default id's suffix), ``line`` its 1-based line in a
    jsonl file, which errors then name instead."""
    at = i if line is None else f"line {line}"
    if not isinstance(r, dict):  # a jsonl line such as [1, 2]: a bad row, skippable like any other
        raise row_error(path, at, "<row>", f"expected an object, got {type(r).__name__}")
    image_rel = r.get("image")
    image = None
    if isinstance(image_rel, dict):  # a datasets Image feature, undecoded
        image = _dict_image(image_rel, path, at, "image")
    elif isinstance(image_rel, Image.Image | bytes):  # decoded, or raw bytes
        image = encoded_image(image_rel, path, at) if image_rel else None
    elif image_rel is not None:
        file = path.parent / image_rel
        if not file.is_file():
            raise row_error(path, at, "image", f"file {file} does not exist")
        image = encoded_image(file, path, at)
    return Sample(
        id=_sample_id((r.get("data_id"), r.get("id")), f"{path.stem}-{i}"),
        question=_text(r.get("question"), path, at, "question"),
        image=image,
        ground_truth=_text(r.get("ground_truth"), path, at, "ground_truth"),
        candidate_answers=candidate_list(r.get("candidate_answers"), path, at),
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
