"""Row edge cases found by the data-loader audit: null ids in struct columns, relative image paths in
``{"bytes", "path"}`` cells, rows that are not objects, numeric candidate answers and jsonl line numbers."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsr.data.benchmarks import MMSearch
from mmsr.data.columns import ColumnMapping
from mmsr.data.loaders import DataError, load_samples
from mmsr.data.answers import candidate_list
from mmsr.reward.answer import parse_candidate_answers


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), "red").save(buf, format="PNG")
    return buf.getvalue()


def _verl_row(images, extra_info=None, data_id=None) -> dict:
    return {"prompt": [{"role": "user", "content": "q"}], "images": images, "data_id": data_id,
            "reward_model": {"ground_truth": "x", "candidate_answers": "[]", "style": "rule"},
            "data_source": "mmsearch_r1/t", "extra_info": extra_info}  # fmt: skip


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_null_extra_info_index_falls_back_to_the_row_id(tmp_path):
    """verl's ``extra_info`` struct holds ``index: null`` where a row has none: two such rows must not
    share the id "None" (ids key the caches), and an id of 0 is an id."""
    extras = [{"index": None, "split": "train"}, {"index": None, "split": "train"}, {"index": 7, "split": "train"},
              {"index": 0, "split": "train"}]  # fmt: skip
    rows = [_verl_row([{"bytes": _png()}], extra) for extra in extras]
    rows.append(_verl_row([{"bytes": _png()}], {"index": 9, "split": "train"}, data_id="0"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    stem = f"{tmp_path.name}/t"  # a default id: the file's folder and stem, then the row
    assert [s.id for s in load_samples(tmp_path / "t.parquet")] == [f"{stem}-0", f"{stem}-1", "7", "0", "0"]
    _jsonl(tmp_path / "t.jsonl", [{"id": 0, "question": "q", "ground_truth": "x"},
                                  {"data_id": None, "id": None, "question": "q", "ground_truth": "x"}])  # fmt: skip
    assert [s.id for s in load_samples(tmp_path / "t.jsonl")] == ["0", f"{stem}-1"]


def test_a_relative_path_in_an_image_dict_resolves_against_the_data_file(tmp_path, monkeypatch):
    """A ``{"bytes": None, "path": "img/a.png"}`` cell is read as a plain path cell is, against the data
    file's folder, wherever ``mmsr`` runs; an absolute path is kept."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "a.png").write_bytes(_png())
    monkeypatch.chdir(tmp_path)  # not the data folder
    cells = [{"bytes": None, "path": "img/a.png"}, {"bytes": None, "path": str(data / "img" / "a.png")}]
    pq.write_table(pa.Table.from_pylist([_verl_row([cell]) for cell in cells]), data / "t.parquet")
    _jsonl(data / "t.jsonl", [{"question": "q", "ground_truth": "x", "image": cell} for cell in cells])
    for name in ("t.parquet", "t.jsonl"):
        assert [s.image.size for s in load_samples(data / name)] == [(6, 4), (6, 4)], name


def test_an_image_dict_without_bytes_or_path_is_an_error(tmp_path):
    """A row that names an image it does not have is broken, not a text-only question."""
    path = tmp_path / "t.jsonl"
    empty = {"bytes": None, "path": None}
    _jsonl(path, [{"question": "q", "ground_truth": "x"}, {"question": "q", "ground_truth": "x", "image": empty}])
    with pytest.raises(DataError, match=r"t.jsonl: line 2, field 'image': no image bytes or path"):
        load_samples(path)
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert len(load_samples(path, skip_invalid=True)) == 1


def test_extra_info_that_is_not_an_object_is_a_row_error(tmp_path):
    path = tmp_path / "t.parquet"
    rows = [_verl_row([{"bytes": _png()}], None), _verl_row([{"bytes": _png()}], '{"index": 3}')]  # text, not a struct
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"t.parquet: row 1, field 'extra_info': expected an object, got str"):
        load_samples(path)
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert [s.id for s in load_samples(path, skip_invalid=True)] == [f"{tmp_path.name}/t-0"]


def test_rows_that_are_not_objects_are_named_and_skippable(tmp_path):
    """The filters (``where``, ``skip_no_image``: MMSearch's default) leave such a row to ``sample``, whose
    error names it; the jsonl loader names the line."""
    path = tmp_path / "e.jsonl"
    _jsonl(path, [{"sample_id": "0", "query": "q", "query_image": None, "gt_answer": "x"}, ["not", "a", "row"]])
    with pytest.raises(DataError, match=r"MMSearch .*e.jsonl: row 1, field '<row>': expected an object, got list"):
        MMSearch(str(path)).load()
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert MMSearch(str(path), skip_invalid=True).load() == []  # row 0 has no image
    with pytest.raises(DataError, match=r"row 1, field '<row>'"):
        ColumnMapping(str(path), "query", "gt_answer", image=None, where={"query": ["q"]}).load()
    _jsonl(path, [{"question": "q", "ground_truth": "x"}, [1, 2]])
    with pytest.raises(DataError, match=r"e.jsonl: line 2, field '<row>': expected an object, got list"):
        load_samples(path)
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert len(load_samples(path, skip_invalid=True)) == 1


@pytest.mark.parametrize("raw", ['[1990, "1990s"]', [1990, "1990s", 2.5], "[0]"])
def test_numeric_candidates_are_stringified_as_the_reward_does(raw):
    assert list(candidate_list(raw, "f.parquet", 0)) == parse_candidate_answers(raw)


@pytest.mark.parametrize("raw", ["[true]", [None], [["a"]], [{"a": 1}]])
def test_other_candidates_are_still_refused(raw):
    with pytest.raises(DataError, match="row 0, field 'candidate_answers'"):
        candidate_list(raw, "f.parquet", 0)


def test_jsonl_errors_name_the_line_of_the_file(tmp_path):
    """A field error and a JSON error number the file the same way: its 1-based lines, blank lines
    counted; a default id keeps the row index (blank lines not counted)."""
    good = json.dumps({"question": "q", "ground_truth": "x"})
    path = tmp_path / "f.jsonl"
    path.write_text(good + "\n\n\n" + json.dumps({"question": "", "ground_truth": "x"}) + "\n")
    with pytest.raises(DataError, match=r"f.jsonl: line 4, field 'question'"):
        load_samples(path)
    path.write_text(good + "\n\n\n{not json\n")
    with pytest.raises(DataError, match=r"f.jsonl: line 4, field '<line>': invalid JSON"):
        load_samples(path)
    path.write_text(good + "\n\n" + good + "\n")
    assert [s.id for s in load_samples(path)] == [f"{tmp_path.name}/f-0", f"{tmp_path.name}/f-1"]


def test_column_mapping_jsonl_errors_use_one_row_numbering(tmp_path):
    """ColumnMapping numbers rows (blank lines are not rows) in every error; a JSON error also names its line."""
    good = json.dumps({"question": "q", "answer": "x"})
    path = tmp_path / "c.jsonl"
    path.write_text(good + "\n\n\n" + json.dumps({"question": "", "answer": "x"}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl: row 1, field 'question'"):
        ColumnMapping(str(path), image=None).load()
    path.write_text(good + "\n\n\n{not json\n")
    with pytest.raises(DataError, match=r"c.jsonl: row 1, field '<line>': invalid JSON at line 4"):
        ColumnMapping(str(path), image=None).load()


def test_an_image_too_narrow_for_the_processor_is_refused_naming_the_row(tmp_path):
    """Qwen-VL's processors refuse sides over 200 times apart: the loader names the row and the file, where the
    run failed with the processor's bare error whenever the row was drawn; 200 times apart is fine."""
    (tmp_path / "banner.png").write_bytes(_png_of(2000, 8))
    (tmp_path / "ok.png").write_bytes(_png_of(1600, 8))
    _jsonl(tmp_path / "t.jsonl", [{"question": "q", "ground_truth": "x", "image": "ok.png"},
                                  {"question": "q", "ground_truth": "x", "image": "banner.png"}])  # fmt: skip
    with pytest.raises(DataError, match=r"t\.jsonl: line 2, field 'image': the image file .*banner\.png is 2000x8"):
        load_samples(tmp_path / "t.jsonl")


def _png_of(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buf, format="PNG")
    return buf.getvalue()
