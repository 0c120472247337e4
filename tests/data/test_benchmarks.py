"""The benchmark loaders read small files the tests write in each published row format, and name the
loader, file, row and field of bad input."""

import base64
import io
import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsr.data.benchmarks import (
    InfoSeek,
    LiveVQA,
    MMSearch,
    MMSearchR1Parquet,
    SimpleVQA,
)
from mmsr.data.columns import ColumnMapping, DataError
from tests.conftest import FVQA, ROOT

MINI = ROOT / "data" / "mmsearch_r1_mini" / "mini_data.pq"


def png(color: str, size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mmsearch_r1_parquet_is_fvqa_test_and_infoseek_2k():
    samples = MMSearchR1Parquet(str(MINI), data_source="infoseek_2k").load()
    assert [s.ground_truth for s in samples][:2] == ["Spain", "Gautama Buddha"]
    assert {s.data_source for s in samples} == {"infoseek_2k"} and samples[0].image.mode == "RGB"


def test_infoseek_jsonl_with_oven_images(tmp_path):
    (tmp_path / "imgs" / "04").mkdir(parents=True)
    (tmp_path / "imgs" / "oven_01963180.jpg").write_bytes(png("red"))
    (tmp_path / "imgs" / "04" / "oven_04925844.JPEG").write_bytes(png("blue"))  # OVEN's shard folder
    rows = [
        {"data_id": "infoseek_val_0", "image_id": "oven_01963180", "question": "Which place is this animal endemic to?",
         "answer": ["People's Republic of China"], "answer_eval": ["China", "PRC", "People's Republic of China"],
         "data_split": "val_unseen_question"},
        {"data_id": "infoseek_val_1", "image_id": "oven_04925844", "question": "How tall is it in metres?",
         "answer": ["12"], "answer_eval": [{"wikidata": 12.0, "range": [10.8, 13.2]}], "data_split": "val_unseen_entity"},
    ]  # fmt: skip
    samples = InfoSeek(str(write_jsonl(tmp_path / "val.jsonl", rows)), image_root=str(tmp_path / "imgs")).load()
    assert [(s.id, s.ground_truth) for s in samples] == [("infoseek_val_0", "People's Republic of China"), ("infoseek_val_1", "12")]
    assert samples[0].candidate_answers == ("China", "PRC") and samples[1].candidate_answers == ("12.0",)
    assert samples[0].category == "val_unseen_question" and samples[1].image.getpixel((0, 0)) == (0, 0, 255)
    rows[1]["image_id"] = "oven_99999999"
    with pytest.raises(DataError, match=r"InfoSeek .*val.jsonl: row 1, field 'image_id': file .*oven_99999999 does not exist"):
        InfoSeek(str(write_jsonl(tmp_path / "val.jsonl", rows)), image_root=str(tmp_path / "imgs")).load()


def mmsearch_rows():
    return [
        {"sample_id": "0", "query": "Who won this race?", "query_image": {"bytes": png("green"), "path": None},
         "gt_answer": "Max Verstappen", "alternative_gt_answers": ["Verstappen"], "area": "sports"},
        {"sample_id": "1", "query": "When was the film released?", "query_image": None, "gt_answer": "2024",
         "alternative_gt_answers": [], "area": "film"},  # text-only: not in the paper's 171
        {"sample_id": "2", "query": "What is this chip called?", "query_image": {"bytes": png("white"), "path": None},
         "gt_answer": "M4", "alternative_gt_answers": ["Apple M4", "M4"], "area": "tech"},
    ]  # fmt: skip


def test_mmsearch_end2end_keeps_the_image_questions(tmp_path):
    path = write_parquet(tmp_path / "end2end.parquet", mmsearch_rows())
    samples = MMSearch(str(path)).load()
    assert [s.id for s in samples] == ["0", "2"] and samples[1].candidate_answers == ("Apple M4",)
    assert samples[0].question == "Who won this race?" and samples[0].category == "sports" and samples[0].data_source == "mmsearch"
    with pytest.raises(DataError, match="row 1, field 'query_image': no image"):
        MMSearch(str(path), skip_no_image=False).load()
    bad = mmsearch_rows()
    bad[2]["query_image"] = {"bytes": b"not an image", "path": None}
    with pytest.raises(DataError, match="MMSearch .*bad.parquet: row 2, field 'query_image': cannot decode image"):
        MMSearch(str(write_parquet(tmp_path / "bad.parquet", bad))).load()
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert [s.id for s in MMSearch(str(tmp_path / "bad.parquet"), skip_invalid=True).load()] == ["0"]


def test_simplevqa_base64_or_image_column_and_english_rows(tmp_path):
    rows = [
        {"data_id": 1, "image": base64.b64encode(png("red")).decode(), "question": "What brand is this?", "answer": "Leica",
         "language": "EN", "vqa_category": "brand"},
        {"data_id": 2, "image": base64.b64encode(png("blue")).decode(), "question": "这是什么？", "answer": "故宫",
         "language": "CN", "vqa_category": "place"},
    ]  # fmt: skip
    samples = SimpleVQA(str(write_parquet(tmp_path / "test.parquet", rows))).load()
    assert [(s.id, s.ground_truth, s.category) for s in samples] == [("1", "Leica", "brand")]
    assert samples[0].image.getpixel((0, 0)) == (255, 0, 0)
    assert len(SimpleVQA(str(tmp_path / "test.parquet"), languages=None).load()) == 2
    for r in rows:  # a datasets Image column, as the Hub's parquet holds it
        r["image"] = {"bytes": base64.b64decode(r["image"]), "path": None}
    (cn,) = SimpleVQA(str(write_parquet(tmp_path / "hub.parquet", rows)), languages=("cn",)).load()
    assert cn.ground_truth == "故宫" and cn.image.getpixel((0, 0)) == (0, 0, 255)


def test_livevqa_qa_json_with_image_folder(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "a.jpg").write_bytes(png("black"))
    rows = [{"sample_id": "lv_0", "query": "Who is speaking at this event?", "query_image": "image/a.jpg", "gt_answer": "Ursula von der Leyen"},
            {"sample_id": "lv_1", "query": "Where was this taken?", "query_image": "/image/a.jpg", "gt_answer": "Brussels"}]  # fmt: skip
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    samples = LiveVQA(str(tmp_path / "qa.json")).load()
    assert [(s.id, s.ground_truth) for s in samples] == [("lv_0", "Ursula von der Leyen"), ("lv_1", "Brussels")]
    (tmp_path / "qa.json").write_text(json.dumps({"data": rows[:1] + [{**rows[1], "gt_answer": ""}]}))
    with pytest.raises(DataError, match="LiveVQA .*qa.json: row 1, field 'gt_answer': no answer"):
        LiveVQA(str(tmp_path / "qa.json")).load()


def test_column_mapping_names_any_columns(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes(png("red"))
    rows = [{"q": "What is it?", "label": '["a rose", "rose"]', "syn": "flower", "pic": "x.png", "key": 7},
            {"q": "And this?", "label": "tulip", "pic": "https://example.com/y.png", "key": 8}]  # fmt: skip
    path = write_jsonl(tmp_path / "set.jsonl", rows)
    mapping = ColumnMapping(str(path), question="q", answer="label", aliases="syn", image="pic", id="key", image_root=str(tmp_path / "pics"))
    with pytest.raises(DataError, match=r"ColumnMapping .*set.jsonl: row 1, field 'pic': is a URL"):
        mapping.load()
    mapping.skip_invalid = True
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        (s,) = mapping.load()
    assert (s.id, s.ground_truth, s.candidate_answers, s.data_source) == ("7", "a rose", ("rose", "flower"), "columnmapping")
    with pytest.raises(DataError, match="row 0, field 'question': missing or empty"):
        ColumnMapping(str(path)).load()
    with pytest.raises(FileNotFoundError, match="nowhere.parquet not found"):
        ColumnMapping(str(tmp_path / "nowhere.parquet")).load()


def test_a_folder_of_parquet_shards(tmp_path):
    (tmp_path / "data").mkdir()
    rows = mmsearch_rows()
    write_parquet(tmp_path / "data" / "end2end-00000-of-00002.parquet", rows[:2])
    write_parquet(tmp_path / "data" / "end2end-00001-of-00002.parquet", rows[2:])
    assert [s.id for s in MMSearch(str(tmp_path / "data")).load()] == ["0", "2"]


def test_column_mapping_of_the_project_jsonl_equals_its_loader(fvqa_samples):
    mapped = ColumnMapping(str(FVQA / "fvqa_dev.jsonl"), answer="ground_truth", aliases="candidate_answers", id="data_id",
                           category="category", data_source="mmsearch_r1/fvqa_train").load()  # fmt: skip
    def bare(s):  # candidates too: the loader kept a ground truth repeated among them, the mapping dropped it
        return replace(s, image=None, image_url=None)

    assert [bare(s) for s in mapped] == [bare(s) for s in fvqa_samples]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(mapped, fvqa_samples))
