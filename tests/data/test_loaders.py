"""Loaders read the shipped samples unchanged and name the file, row and field of bad input."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmsr.data.loaders import DataError, load_samples
from tests.conftest import FVQA, ROOT

MINI = ROOT / "data" / "mmsearch_r1_mini" / "mini_data.pq"


def test_official_mini_parquet_loads_unchanged():
    samples = load_samples(MINI)
    assert [s.ground_truth for s in samples] == ["Spain", "Gautama Buddha", "Order of Hospitallers", "Tuileries Palace", "Portugal"]
    assert samples[0].question == "What is the country of origin of this food?"
    assert "Kingdom of Spain" in samples[0].candidate_answers  # JSON-string list decoded
    assert samples[0].image.mode == "RGB" and samples[0].image_url is None
    assert all(s.data_source == "mmsearch_r1/infoseek_train_split" for s in samples)


def test_fvqa_jsonl_with_image_folder(fvqa_samples):
    assert len(fvqa_samples) == 20
    s = fvqa_samples[0]
    assert s.id == "fvqa_train_1078" and s.ground_truth == "musketeers" and s.category == "search_free"
    assert s.image.size[0] > 0


def _copy_fvqa(tmp_path, edit):
    shutil.copytree(FVQA / "images", tmp_path / "images")
    rows = [json.loads(x) for x in (FVQA / "fvqa_dev.jsonl").read_text().splitlines()]
    edit(rows)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda rows: rows[3].update(question="  "), "line 4, field 'question'"),  # jsonl: 1-based lines
        (lambda rows: rows[4].pop("ground_truth"), "line 5, field 'ground_truth'"),
        (lambda rows: rows[5].update(image="images/missing.jpg"), "line 6, field 'image'"),
        (lambda rows: rows[6].update(candidate_answers="[not json"), "line 7, field 'candidate_answers'"),
        (lambda rows: rows[7].update(candidate_answers=[None, "x"]), "line 8, field 'candidate_answers'"),
        (lambda rows: rows[8].update(candidate_answers=[True]), "line 9, field 'candidate_answers'"),
        (lambda rows: rows[9].update(image={"bytes": None, "path": None}), "line 10, field 'image': no image bytes"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, edit, words):
    path = _copy_fvqa(tmp_path, edit)
    with pytest.raises(DataError, match=words) as err:
        load_samples(path)
    assert str(path) in str(err.value)
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert len(load_samples(path, skip_invalid=True)) == 19


def test_corrupt_image_is_named(tmp_path):
    path = _copy_fvqa(tmp_path, lambda rows: None)
    (tmp_path / "images" / "fvqa_train_1078.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="line 1, field 'image': cannot decode image"):
        load_samples(path)


def test_corrupt_parquet_rows(tmp_path):
    rows = pq.read_table(MINI).to_pylist()
    rows[2]["images"] = [{"bytes": b"\x00garbage", "path": None}]
    rows[1]["reward_model"] = dict(rows[1]["reward_model"], ground_truth="")
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match="row 1, field 'reward_model.ground_truth'"):
        load_samples(path)
    with pytest.warns(UserWarning, match="skipped 2 invalid rows"):
        assert len(load_samples(path, skip_invalid=True)) == 3


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_samples(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown data format"):
        load_samples(tmp_path / "x.csv")


def test_a_file_whose_rows_are_partly_without_image_warns_once(tmp_path, recwarn, monkeypatch):
    """A row with no ``image`` loads as a text-only question, by design; a file where only some rows have none is
    more likely an export that dropped their images: a vision policy was then scored without the picture, silently."""

    def drop(rows):
        del rows[2]["image"]
        rows[5]["image"] = None

    from mmsr.data.sample import EncodedImage

    decoded = []
    monkeypatch.setattr(EncodedImage, "decode", lambda self: decoded.append(self))
    with pytest.warns(UserWarning, match=r"2 of 20 rows of .*bad.jsonl have no image .*first: 'fvqa_train_\w+'"):
        samples = load_samples(_copy_fvqa(tmp_path / "some", drop))
    assert not decoded  # question images stay encoded until read: the check decoded every row's (3x the load time)
    monkeypatch.undo()
    assert [s.image is None for s in samples].count(True) == 2
    recwarn.clear()
    load_samples(_copy_fvqa(tmp_path / "all", lambda rows: [r.update(image=None) for r in rows]))  # text-only data
    load_samples(FVQA / "fvqa_dev.jsonl")  # every row with its image
    assert not [w for w in recwarn if "no image" in str(w.message)]
