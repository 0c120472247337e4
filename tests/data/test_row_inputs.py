"""Row inputs found by the second data-layer audit: line separators inside JSON strings, default ids of two
files with one name, images Pillow fails on in other ways than ``OSError``, image cells of other types,
numeric and list ground truths, and empty files."""

import base64
import io
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsr.data.columns import ColumnMapping
from mmsr.data.datamodule import MMSRDataModule
from mmsr.data.loaders import DataError, load_samples


def _png(size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="PNG")
    return buf.getvalue()


def _broken_png() -> bytes:
    """A PNG whose IDAT chunk length is wrong: Pillow raises SyntaxError ("broken PNG file"), not OSError."""
    good = _png()
    at = good.index(b"IDAT") - 4
    return good[:at] + (5).to_bytes(4, "big") + good[at + 4 :]


def _row(**fields) -> dict:
    return {"question": "q", "ground_truth": "x", **fields}


def _jsonl(path, rows, **dumps) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, **dumps) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_unicode_line_separators_inside_strings_do_not_end_a_line(tmp_path, separator):
    """``json.dumps(ensure_ascii=False)`` writes them unescaped; ``str.splitlines`` cut the line there."""
    path = tmp_path / "t.jsonl"
    _jsonl(path, [_row(id="a", question=f"What is this?{separator}(one word)"), _row(id="b")], ensure_ascii=False)
    assert [s.question for s in load_samples(path)] == [f"What is this?{separator}(one word)", "q"]
    loaded = ColumnMapping(str(path), answer="ground_truth", image=None, id="id").load()
    assert [s.id for s in loaded] == ["a", "b"]
    path.write_text(path.read_text(encoding="utf-8") + '{"question": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match="t.jsonl: line 3, field 'question'"):  # line numbers stay right
        load_samples(path)


def test_crlf_line_endings_still_load(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(json.dumps(_row(id=i)).encode() + b"\r\n" for i in "ab"))
    assert [s.id for s in load_samples(path)] == ["a", "b"]
    assert [s.id for s in ColumnMapping(str(path), answer="ground_truth", image=None, id="id").load()] == ["a", "b"]


def test_default_ids_of_two_files_with_one_name_differ(tmp_path, monkeypatch):
    """``fvqa/train.jsonl`` and ``infoseek/train.jsonl`` without ids both gave ``train-0``; the folder is in
    the id, whichever way the path is written."""
    for name in ("fvqa", "infoseek"):
        _jsonl(tmp_path / name / "train.jsonl", [_row(), _row()])
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "q"}]], "images": [[{"bytes": _png()}]],
                             "reward_model": [{"ground_truth": "x"}]}), tmp_path / "fvqa" / "t.parquet")  # fmt: skip
    ids = [s.id for name in ("fvqa", "infoseek") for s in load_samples(tmp_path / name / "train.jsonl")]
    assert ids == ["fvqa/train-0", "fvqa/train-1", "infoseek/train-0", "infoseek/train-1"]
    assert [s.id for s in load_samples(tmp_path / "fvqa" / "t.parquet")] == ["fvqa/t-0"]
    monkeypatch.chdir(tmp_path / "fvqa")
    assert [s.id for s in load_samples("train.jsonl")] == ["fvqa/train-0", "fvqa/train-1"]


def test_a_mapped_id_of_0_is_the_id_not_unset(tmp_path):
    """``0`` is an id, as ``load_samples`` reads ``data_id: 0``; only a missing or empty cell gets the default
    ``{folder}/{stem}-{row}`` (a 0 read as unset named the row ``set/qa-1`` here and ``0`` there: two cache keys)."""
    path = tmp_path / "set" / "qa.jsonl"
    _jsonl(path, [_row(qid=7), _row(qid=0), _row(qid=""), _row(qid=None), _row(data_id=0)])
    loaded = ColumnMapping(str(path), answer="ground_truth", image=None, id="qid").load()
    assert [s.id for s in loaded] == ["7", "0", "set/qa-2", "set/qa-3", "set/qa-4"]
    assert load_samples(path)[4].id == "0"


@pytest.mark.parametrize("kind", ["broken png", "decompression bomb", "html page"])
def test_undecodable_image_files_are_row_errors_naming_the_file(tmp_path, monkeypatch, kind):
    """Pillow raises SyntaxError on a broken PNG and DecompressionBombError past twice its pixel limit (made
    small here): both crashed naming no row, past ``skip_invalid``. A file Pillow cannot identify was named
    as ``<_io.BytesIO object at 0x...>``."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 20 x 20 image is then a bomb (over 2 x 100)
    data, words = {"broken png": (_broken_png(), r"SyntaxError: broken PNG file"),
                   "decompression bomb": (_png((20, 20)), r"DecompressionBombError"),
                   "html page": (b"<html>403 Forbidden</html>", r"not an image format Pillow reads; it begins b'<html>403"),
                   }[kind]  # fmt: skip
    (tmp_path / "bad.png").write_bytes(data)
    (tmp_path / "good.png").write_bytes(_png())
    path = tmp_path / "t.jsonl"
    _jsonl(path, [_row(id="good", image="good.png"), _row(id="bad", image="bad.png")])
    bad = re.escape(str(tmp_path / "bad.png"))
    with pytest.raises(DataError, match=rf"t.jsonl: line 2, field 'image': cannot decode image file {bad} \({words}"):
        load_samples(path)
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert [s.id for s in load_samples(path, skip_invalid=True)] == ["good"]


def test_undecodable_image_bytes_in_parquet_are_skippable(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "q"}], "images": [{"bytes": png}],
             "reward_model": {"ground_truth": "x"}, "data_id": name}
            for name, png in (("good", _png()), ("bad", _broken_png()))]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: row 1, field 'images': cannot decode image \(SyntaxError"):
        load_samples(tmp_path / "t.parquet")
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert [s.id for s in load_samples(tmp_path / "t.parquet", skip_invalid=True)] == ["good"]


@pytest.mark.parametrize(("cell", "words"), [
    (["a.png"], r"expected a file name, base64 text or image bytes, got list \(\['a.png'\]\)"),  # LLaVA style
    (1078, r"expected a file name, base64 text or image bytes, got int \(1078\)"),  # an image id
    ("https://example.com/a.png", r"is a URL \(https://example.com/a.png\); download the image .* 'image_url'"),
    ("x" * 300 + ".png", "file .* does not exist"),  # a name too long for the system: not a crash either
])  # fmt: skip
def test_image_cells_of_other_types_are_skippable_row_errors(tmp_path, cell, words):
    (tmp_path / "a.png").write_bytes(_png())
    path = tmp_path / "t.jsonl"
    _jsonl(path, [_row(id="ok", image="a.png"), _row(id="bad", image=cell)])
    with pytest.raises(DataError, match=f"t.jsonl: line 2, field 'image': {words}"):
        load_samples(path)
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert [s.id for s in load_samples(path, skip_invalid=True)] == ["ok"]


@pytest.mark.parametrize("size", [(6, 4), (12, 12), (128, 128)])  # base64 of ~190, ~670 and ~59,000 characters
def test_base64_image_cells_are_read_as_column_mapping_reads_them(tmp_path, size):
    """Base64 text under 1,024 characters is first looked up as a file name; over 255 the system refuses
    that name and ``Path.is_file`` raised (ENAMETOOLONG), in ``ColumnMapping`` as well."""
    buf = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3)).save(buf, "PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    path = tmp_path / "t.jsonl"
    _jsonl(path, [_row(image=text), _row(image=f"data:image/png;base64,{text}")])
    assert [s.image.size for s in load_samples(path)] == [size, size]
    assert [s.image.size for s in ColumnMapping(str(path), answer="ground_truth").load()] == [size, size]


def test_numeric_and_list_ground_truths_read_as_column_mapping_reads_them(tmp_path):
    rows = [_row(ground_truth=1889, candidate_answers=[1889, "1889 AD"]),  # a year, as upstream JSON holds it
            _row(ground_truth=["Gustave Eiffel", "Eiffel", ""], candidate_answers=["G. Eiffel", "Eiffel"]),
            _row(ground_truth=2.5)]  # fmt: skip
    path = tmp_path / "t.jsonl"
    _jsonl(path, rows)
    expected = [("1889", ("1889 AD",)), ("Gustave Eiffel", ("Eiffel", "G. Eiffel")), ("2.5", ())]
    assert [(s.ground_truth, s.candidate_answers) for s in load_samples(path)] == expected
    mapped = ColumnMapping(str(path), answer="ground_truth", aliases="candidate_answers", image=None).load()
    assert [(s.ground_truth, s.candidate_answers) for s in mapped] == expected
    table = [{"prompt": [{"role": "user", "content": "q"}], "images": [{"bytes": _png()}],
              "reward_model": {"ground_truth": ["Gustave Eiffel", "Eiffel"]}}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "t.parquet")
    assert load_samples(tmp_path / "t.parquet")[0].answers == ("Gustave Eiffel", "Eiffel")


@pytest.mark.parametrize(("truth", "words"), [
    ([], r"missing or empty \(\[\]\)"), (["", " "], "missing or empty"), (None, "missing or empty"),
    ([None], r"expected a string, a number or a list of them, got \[None\]"), (True, "expected .*, got True"),
    ({"a": 1}, "expected .*, got {'a': 1}"),
])  # fmt: skip
def test_other_ground_truths_are_named_row_errors(tmp_path, truth, words):
    path = tmp_path / "t.jsonl"
    _jsonl(path, [_row(ground_truth=truth)])
    with pytest.raises(DataError, match=f"t.jsonl: line 1, field 'ground_truth': {words}"):
        load_samples(path)


@pytest.mark.parametrize(("name", "write"), [
    ("empty.jsonl", lambda p: p.write_text("")),
    ("blank.jsonl", lambda p: p.write_text("\n \n")),
    ("empty.parquet", lambda p: pq.write_table(pa.table({"question": pa.array([], pa.string())}), p)),
])  # fmt: skip
def test_an_empty_data_file_is_an_error(tmp_path, name, write):
    """It loaded as no rows without a word: an empty held-out file then validated nothing."""
    write(tmp_path / name)
    for skip_invalid in (False, True):
        with pytest.raises(ValueError, match=f"{name}: no rows"):
            load_samples(tmp_path / name, skip_invalid)
    with pytest.raises(ValueError, match=f"{name}: no rows"):
        ColumnMapping(str(tmp_path / name), skip_invalid=True).load()
    _jsonl(tmp_path / "train.jsonl", [_row()])
    module = MMSRDataModule([str(tmp_path / "train.jsonl")], val_files=[str(tmp_path / name)])
    with pytest.raises(ValueError, match=f"{name}: no rows"):
        module.setup("fit")
