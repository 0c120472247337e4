"""Rows whose data is where a loader does not look. A flat-schema row with its image under another key
(``image_path``, ``img``) loaded as a text-only question, its picture silently dropped; it is refused, naming
the line and the key (a text-only row says so with ``"image": null``). A ``where`` filter (SimpleVQA's
``languages``) that keeps no row reported "no rows"; it names the column, the values accepted and found, and
the setting to change."""

import base64
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsr.data.benchmarks import SimpleVQA
from mmsr.data.columns import ColumnMapping
from mmsr.data.errors import DataError
from mmsr.data.loaders import load_samples
from mmsr.eval.suite import _load


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "blue").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("key", ["image_path", "img", "Image_File"])
def test_an_image_under_another_key_is_refused_naming_line_and_key(tmp_path, key):
    (tmp_path / "x.jpg").write_bytes(_jpeg())
    _jsonl(tmp_path / "t.jsonl", [{"id": "a", "question": "q", "ground_truth": "x", "image": "x.jpg"},
                                  {"id": "b", "question": "q", "ground_truth": "y", key: "x.jpg"}])  # fmt: skip
    with pytest.raises(DataError, match=re.escape(f"t.jsonl: line 2, field {key!r}: the flat schema reads a row's "
                                                  f"image from 'image' only: rename {key!r} to 'image'")):  # fmt: skip
        load_samples(tmp_path / "t.jsonl")
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):  # a row error: skip_invalid skips it
        assert [s.id for s in load_samples(tmp_path / "t.jsonl", skip_invalid=True)] == ["a"]


def test_a_verl_row_in_a_jsonl_file_is_refused_at_its_images(tmp_path):
    row = {"prompt": [{"role": "user", "content": "q"}], "images": [{"bytes": None, "path": "x.jpg"}],
           "reward_model": {"ground_truth": "x"}}  # fmt: skip
    _jsonl(tmp_path / "verl.jsonl", [row])
    with pytest.raises(DataError, match=r"verl.jsonl: line 1, field 'images': the flat schema reads"):
        load_samples(tmp_path / "verl.jsonl")


def test_text_only_rows_still_load(tmp_path):
    """No image key, an explicit null beside another image key, or image-like keys that hold no image."""
    rows = [{"id": "a", "question": "q", "ground_truth": "x"},
            {"id": "b", "question": "q", "ground_truth": "x", "image": None, "image_path": "x.jpg"},
            {"id": "c", "question": "q", "ground_truth": "x", "image_url": "https://example.com/c.jpg",
             "original_image_size": [640, 480], "image_count": 0, "img_note": ""},
            # text about an image is no image: a caption, a label, an id (refused at first as "rename it to 'image'")
            {"id": "d", "question": "q", "ground_truth": "x", "image_caption": "a red door",
             "needs_image_search": "no", "image_id": "Q12345"}]  # fmt: skip
    _jsonl(tmp_path / "t.jsonl", rows)
    loaded = load_samples(tmp_path / "t.jsonl")
    assert [(s.id, s.image) for s in loaded] == [("a", None), ("b", None), ("c", None), ("d", None)]
    assert loaded[2].image_url == "https://example.com/c.jpg"


def _simplevqa(path, languages) -> None:
    jpg = base64.b64encode(_jpeg()).decode()
    pq.write_table(pa.table({"data_id": list(range(len(languages))), "image": [jpg] * len(languages),
                             "question": ["q"] * len(languages), "answer": ["x"] * len(languages),
                             "language": languages}), path)  # fmt: skip


def test_a_language_filter_that_keeps_no_row_names_the_values(tmp_path):
    _simplevqa(tmp_path / "test.parquet", ["English_US", "Chinese", "English_US"])
    expected = (f"SimpleVQA {tmp_path / 'test.parquet'}: no row's 'language' is one of ['en', 'english'] (compared "
                "ignoring case); values found (rows): 'English_US' (2), 'Chinese' (1). Set `languages:` to the values "
                "your copy holds (null keeps every row)")  # fmt: skip
    with pytest.raises(DataError) as caught:
        SimpleVQA(str(tmp_path / "test.parquet")).load()
    assert str(caught.value) == expected
    assert _load(SimpleVQA(str(tmp_path / "test.parquet")), None) == ([], f"DataError: {expected}")  # not "no rows"
    assert len(SimpleVQA(str(tmp_path / "test.parquet"), languages=["english_us"]).load()) == 2


def test_a_where_filter_on_a_missing_column_says_so(tmp_path):
    _jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "x"}])
    with pytest.raises(DataError, match=r"no row's 'split' is one of \['test'\] .*values found \(rows\): "
                                        r"<no such column> \(1\)\. Set `where:` to the values to keep$"):  # fmt: skip
        ColumnMapping(str(tmp_path / "t.jsonl"), image=None, where={"split": ["test"]}).load()
