"""Row dicts -> validated ``Sample`` records, whatever the container (a parquet or jsonl file, a Hugging
Face ``datasets`` split): the two schemas and the errors that name the file, row and field.

- MMSearch-R1 / verl rows: ``prompt``, ``images``, ``reward_model``, ``data_source``, ``image_urls``,
  ``extra_info`` (spec §8);
- flat rows: ``data_id``/``id``, ``question``, ``ground_truth``, ``candidate_answers``, ``image`` (a path
  relative to the file, base64 text, or image bytes / a PIL image), optional ``data_source``, ``category``,
  ``image_url``.

A row without an id is ``{folder}/{stem}-{row}`` (``default_id_stem``). Answer cells are read by
``mmsr.data.answers``, the one rule of every loader (``ColumnMapping`` too): the same cell gives the same ground
truth and candidates; questions are stripped alike (``question_text``).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmsr.data.answers import answers_of, plain_value
from mmsr.data.errors import DataError, row_error
from mmsr.data.sample import MAX_ASPECT, EncodedImage, Sample
from mmsr.data.threads import in_order

RowMaker = Callable[[dict, Path, int], Sample]
URL_PREFIXES = ("http://", "https://")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".pq", ".arrow", ".csv")


def decode_image(data: bytes | str | Path | Image.Image, path, row, field="image",
                 file: Path | None = None) -> Image.Image:  # fmt: skip
    """Open image bytes, a file or a PIL image as RGB, or raise a ``DataError`` naming the row and the image
    file (``file``: the one ``data``'s bytes were read from, if any): one that does not decode, or whose sides
    differ more than ``MAX_ASPECT`` times."""
    file = Path(data) if isinstance(data, str | Path) else file
    what = "image" if file is None else f"image file {file}"
    try:
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
        rgb = image.convert("RGB")
    # Pillow's decoders raise more than OSError on bad data (SyntaxError for a broken PNG chunk, EOFError,
    # struct.error, DecompressionBombError past ~179 MP, ...): whatever decoding raises, the row is bad
    except Exception as exc:  # noqa: BLE001
        raise row_error(path, row, field, f"cannot decode {what} ({_decode_failure(exc, data)})") from None
    if max(rgb.size) > MAX_ASPECT * min(rgb.size):  # the run would fail whenever the row is drawn
        raise row_error(path, row, field, f"the {what} is {rgb.width}x{rgb.height}: a side over {MAX_ASPECT} times the "
                        "other, which the Qwen-VL image processors refuse")  # fmt: skip
    return rgb


def _decode_failure(exc: Exception, data) -> str:
    """Pillow's reason, but for bytes it cannot identify their first bytes instead of the buffer it names
    (``<_io.BytesIO object at 0x...>``): an HTML error page saved as ``.jpg`` shows as ``b'<html>...'``."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow reads" + (f"; it begins {data[:16]!r}" if isinstance(data, bytes) else "")
    return f"{type(exc).__name__}: {exc}"


def encoded_image(data: bytes | str | Path | Image.Image, path, row, field="image") -> EncodedImage | Image.Image:
    """Image bytes or a file, checked by decoding them once and kept encoded (``EncodedImage``: decoded
    again when read); a ``PIL`` image (a decoded ``datasets`` column) is kept as RGB. A bad image raises
    a ``DataError`` naming the row."""
    if isinstance(data, Image.Image):
        return decode_image(data, path, row, field)
    file = None if isinstance(data, bytes) else Path(data)
    try:
        raw = data if file is None else file.read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a name with a NUL character
        raise row_error(path, row, field, f"cannot read image ({exc})") from None
    decode_image(raw, path, row, field, file)
    return EncodedImage(raw)


def base64_image(text: str) -> bytes | None:
    """The bytes of base64 image text (with or without a ``data:image/...;base64,`` prefix), else ``None``."""
    payload = text.split(",", 1)[1] if text.startswith("data:image") else text
    if len(payload) < 64:  # too short to be an image; a missing file name, more likely
        return None
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None


def text_image(text: str, files: Sequence[Path], path, row, field) -> EncodedImage:
    """An image cell's text that is not a URL: the first of ``files`` (where the name may be) that exists,
    else base64 image data; a ``DataError`` naming the row otherwise."""
    files = files if len(text) < 1024 else []  # longer: base64, not a name
    found = next((f for f in files if _is_file(f)), None)
    if found is not None:
        return encoded_image(found, path, row, field)
    data = base64_image(text)
    if data is not None:
        return encoded_image(data, path, row, field)
    where = f"file {files[0]} does not exist" if files else "neither a file name nor base64 image data"
    raise row_error(path, row, field, where)


def _is_file(file: Path) -> bool:
    """``Path.is_file``, but false for a name the system refuses as too long (base64 text of a small
    image, a few hundred characters: ``is_file`` raises on it)."""
    try:
        return file.is_file()
    except OSError:
        return False


def label(value) -> str | None:
    """A ``category`` or ``data_source`` cell as the text ``Sample`` holds (``None`` if empty): a set's numeric
    categories (``1``, ``2``) crashed the report and the step's metrics, which sort them beside strings."""
    return None if value is None or value == "" else str(plain_value(value))


def question_text(value, path, row, field) -> str:
    """A question cell's text, stripped: the one rule of every loader (``ColumnMapping`` too), as answers are
    read alike (``mmsr.data.answers``). The prompt strips it anyway, but the judge's prompt and cache key, the
    text search's question and the logs took it as stored: one file read by two loaders gave two questions."""
    if not isinstance(value, str) or not value.strip():
        raise row_error(path, row, field, f"missing or empty ({value!r:.40})")
    return value.strip()


def _parquet_question(prompt, path, row) -> str:
    """The last user message of the verl ``prompt`` column (a list of ``{role, content}`` dicts)."""
    if prompt is None or isinstance(prompt, str | bytes | dict) or not all(isinstance(m, dict) for m in prompt):
        raise row_error(path, row, "prompt", f"expected a list of {{role, content}} messages, got {prompt!r:.60}")
    users = [m.get("content") for m in prompt if m.get("role") == "user"]
    return question_text(users[-1] if users else None, path, row, "prompt")


def image_url(cell) -> str | None:
    """The http(s) URL an image cell holds, stripped, else ``None``: a string, or the ``path`` of a ``{"bytes",
    "path"}`` cell without bytes (a ``datasets`` Image column cast from URLs keeps them there). The scheme is
    matched ignoring case, as URL schemes are (the downloader reads ``HTTPS://`` as ``https``). One test for
    both: the schemas here refuse what it accepts, ``ColumnMapping`` downloads it."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    text = cell.strip() if isinstance(cell, str) else ""
    return text if text[:8].lower().startswith(URL_PREFIXES) else None


def _refuse_url(cell, path, row, field) -> None:
    """A ``DataError`` if the image cell ``field`` is a URL: nothing here downloads, and read as a file name
    it was "no such file" ``folder/https:/host/...``. The schema's URL field is named for it."""
    if url := image_url(cell):
        where = {"images": "image_urls"}.get(field, "image_url")
        raise row_error(path, row, field, f"is a URL ({url:.80}); download the image and name its file "
                        f"(a URL for web image search goes in {where!r})")  # fmt: skip


def _dict_image(cell: dict, path, row, field) -> EncodedImage:
    """A ``{"bytes", "path"}`` cell (a ``datasets`` Image column, undecoded): the bytes, else the file, a
    relative name read against the data file's folder as a plain path cell is (not the working directory,
    which would make the result depend on where ``mmsr`` runs). Neither, or a URL, is a ``DataError``: a
    row that names an image it does not have is broken, not a text-only question."""
    _refuse_url(cell, path, row, field)
    if cell.get("bytes"):
        return encoded_image(cell["bytes"], path, row, field)
    if cell.get("path"):
        return encoded_image(Path(path).parent / cell["path"], path, row, field)  # an absolute path is kept
    raise row_error(path, row, field, f"no image bytes or path (got {cell!r:.60})")


def _parquet_image(images, path, row) -> EncodedImage | Image.Image:
    """The first entry of ``images`` (a list, or a numpy array as pandas reads one): ``{"bytes": ...}`` /
    ``{"path": ...}`` (parquet) or a PIL image (datasets)."""
    images = plain_value(images)
    first = images[0] if isinstance(images, list | tuple) and len(images) else None
    if isinstance(first, Image.Image):
        return encoded_image(first, path, row, "images")
    if not isinstance(first, dict):
        raise row_error(path, row, "images", f"no image bytes (got {images!r:.60})")
    return _dict_image(first, path, row, "images")


def default_id_stem(path: str | Path) -> str:
    """What the ids of a data file's rows without one start with (``-{row}`` follows): the name of the file's
    folder and its stem, ``fvqa/train``. The folder keeps ``fvqa/train.jsonl`` and ``infoseek/train.jsonl``
    of one run apart (SFT looks teacher turns up by id; rollout seeds and tool caches are keyed by it); that
    of the absolute path, so that how the path is written (``train.jsonl`` inside ``fvqa/``) changes nothing."""
    path = Path(path)
    folder = Path(os.path.abspath(path)).parent.name
    return f"{folder}/{data_stem(path)}" if folder else data_stem(path)


def data_stem(path: Path) -> str:
    """``path``'s name without a data format's extension (``DATA_SUFFIXES``): ``train.jsonl`` is ``train``, but
    a dot in a folder's or dataset's name ends no extension (``data.v2``, ``v1.0``: ``Path.stem`` gave ``data``
    and ``v1``, one id stem for two sets)."""
    return path.stem if path.suffix.lower() in DATA_SUFFIXES else path.name


def _jsonl_image(value, path: Path, at) -> EncodedImage | Image.Image | None:
    """The flat schema's ``image``: none, a ``datasets`` Image cell, decoded or raw bytes, a file name relative
    to the data file or base64 text, as ``ColumnMapping`` reads a cell. A URL is refused (nothing here
    downloads; ``image_url`` is the field for one), as is any other type: a list of several (LLaVA), an id."""
    if value is None:
        return None
    if isinstance(value, dict):  # a datasets Image feature, undecoded
        return _dict_image(value, path, at, "image")
    if isinstance(value, Image.Image | bytes):  # decoded, or raw bytes
        return encoded_image(value, path, at) if value else None
    if not isinstance(value, str):
        raise row_error(path, at, "image", f"expected a file name, base64 text or image bytes, got "
                        f"{type(value).__name__} ({value!r:.60})")  # fmt: skip
    _refuse_url(value, path, at, "image")
    return text_image(value, [path.parent / value], path, at, "image")


def _unread_image_key(r: dict, path, at) -> None:
    """A ``DataError`` if the row has no ``image`` key but another that holds an image (a name with ``image`` or
    ``img`` in it, ``_may_be_image``: ``image_path``, ``img``, verl's ``images``):
    such a row loaded as a text-only question, its picture silently dropped. A text-only row says so with
    ``"image": null``, or has no such key; ``image_url`` is read (for web image search), and a number or a
    list (``original_image_size``) holds no image."""
    if "image" in r:
        return
    for key, value in r.items():
        lower = str(key).lower()
        if ("image" in lower or "img" in lower) and key != "image_url" and _may_be_image(value):
            raise row_error(path, at, key, f"the flat schema reads a row's image from 'image' only: rename {key!r} "
                            "to 'image' (or add \"image\": null to load the row as a text-only question)")  # fmt: skip


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _may_be_image(value) -> bool:
    """Whether a cell holds an image: bytes, an object (``{"bytes": ..., "path": ...}``), a PIL image, a file name
    or URL ending in an image suffix, or a list of such (verl's ``images``, LLaVA's file names); not other text
    (``image_caption``, ``needs_image_search: "no"``, an ``image_id``), numbers or lists of numbers."""
    if isinstance(value, list | tuple):
        return any(_may_be_image(v) for v in value)
    if isinstance(value, str):
        return value.strip().lower().split("?")[0].endswith(IMAGE_SUFFIXES)
    return isinstance(value, Image.Image | dict) or (isinstance(value, bytes) and bool(value))


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


def parquet_sample(r: dict, path: Path, i: int, id_stem: str | None = None) -> Sample:
    """A verl-schema row; ``i`` is its row index. A row without an id gets ``{id_stem}-{i}`` (default: the
    file's stem; ``load_samples`` gives ``default_id_stem``)."""
    question = _parquet_question(r.get("prompt"), path, i)
    reward = r.get("reward_model")
    if not isinstance(reward, dict):
        raise row_error(path, i, "reward_model", f"expected a dict with 'ground_truth', got {reward!r:.60}")
    extra = _extra_info(r.get("extra_info"), path, i)
    image = _parquet_image(r.get("images"), path, i)
    truth, candidates = answers_of(reward.get("ground_truth"), reward.get("candidate_answers"), path, i,
                                   "reward_model.ground_truth", "reward_model.candidate_answers")  # fmt: skip
    return Sample(
        id=_sample_id((r.get("data_id"), extra.get("index")), f"{id_stem or path.stem}-{i}"),
        question=question,
        image=image,
        ground_truth=truth,
        candidate_answers=candidates,
        data_source=label(r.get("data_source")) or "mmsearch_r1",
        image_url=r.get("image_urls") or None,
        category=label(r.get("category")),
        extra=dict(extra),
    )


def jsonl_sample(r: dict, path: Path, i: int, line: int | None = None, id_stem: str | None = None) -> Sample:
    """A flat-schema row; ``i`` is its row index (the default id is ``{id_stem}-{i}``, ``id_stem`` as for
    ``parquet_sample``), ``line`` its 1-based line in a jsonl file, which errors then name instead."""
    at = i if line is None else f"line {line}"
    if not isinstance(r, dict):  # a jsonl line such as [1, 2]: a bad row, skippable like any other
        raise row_error(path, at, "<row>", f"expected an object, got {type(r).__name__}")
    _unread_image_key(r, path, at)
    image = _jsonl_image(r.get("image"), path, at)
    question = question_text(r.get("question"), path, at, "question")
    truth, candidates = answers_of(r.get("ground_truth"), r.get("candidate_answers"), path, at, "ground_truth")
    return Sample(
        id=_sample_id((r.get("data_id"), r.get("id")), f"{id_stem or path.stem}-{i}"),
        question=question,
        image=image,
        ground_truth=truth,
        candidate_answers=candidates,
        data_source=label(r.get("data_source")) or "mmsearch_r1",
        image_url=r.get("image_url") or None,
        category=label(r.get("category")),
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
    _warn_some_without_image(samples, path)
    return samples


def _warn_some_without_image(samples: list[Sample], path: Path) -> None:
    """One warning when some rows of a file have an image and others none: a text-only question is a row of its
    own choosing (``"image": null``, or no such key), but an export that dropped a few rows' images reads alike,
    and a vision policy then trains and is scored on those questions without their picture, with no error."""
    without = [s.id for s in samples if s.stored_image is None]  # ``image`` would decode every row's
    if without and len(without) < len(samples):
        warnings.warn(f"{len(without)} of {len(samples)} rows of {path} have no image and load as text-only questions "
                      f"(first: {without[0]!r}); if they should have one, its 'image' field is missing or null",
                      stacklevel=3)  # fmt: skip
