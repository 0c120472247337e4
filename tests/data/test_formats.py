"""Hugging Face ``datasets`` input and the extra validation of the MMSearch-R1 parquet schema."""

import io
import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmsr.data.loaders import DataError, load_samples
from tests.conftest import FVQA, ROOT, import_optional

datasets = import_optional("datasets", 'pip install -e ".[hf]" (or the dev extra) to run the datasets tests')
from mmsr.data.hf import samples_from_dataset  # noqa: E402

MINI = ROOT / "data" / "mmsearch_r1_mini" / "mini_data.pq"


def _same(a, b):
    fields = ("id", "question", "ground_truth", "candidate_answers", "data_source", "category")
    assert [[getattr(s, f) for f in fields] for s in a] == [[getattr(s, f) for f in fields] for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))


def test_parquet_schema_dataset_equals_the_file(tmp_path):
    ds = datasets.Dataset.from_parquet(str(MINI), cache_dir=str(tmp_path))
    from_dataset, from_file = samples_from_dataset(ds, name="mini_data"), load_samples(MINI)
    # its rows have no id: a dataset's default ids start with its name, a file's with its folder and stem
    assert [f"mmsearch_r1_mini/{s.id}" for s in from_dataset] == [s.id for s in from_file]
    _same([replace(s, id=f.id, image=s.stored_image) for s, f in zip(from_dataset, from_file)], from_file)


def test_decoded_pil_images_and_save_to_disk(tmp_path, fvqa_samples):
    rows = [json.loads(x) for x in (FVQA / "fvqa_dev.jsonl").read_text().splitlines()]
    for r in rows:
        r["image"] = str(FVQA / r["image"])
        r.pop("mmsearch_r1_7b_run"), r.pop("qwen2_5_vl_7b_direct_run")
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    assert type(ds[0]["image"]).__module__.startswith("PIL")  # datasets decodes to PIL
    _same(samples_from_dataset(ds), fvqa_samples)
    ds.save_to_disk(str(tmp_path / "saved"))
    _same(load_samples(tmp_path / "saved"), fvqa_samples)  # a directory is read with load_from_disk


def test_dataset_errors_name_dataset_row_and_field(tmp_path):
    rows = pq.read_table(MINI).to_pylist()
    rows[3]["reward_model"]["ground_truth"] = "  "
    ds = datasets.Dataset.from_list(rows)
    with pytest.raises(DataError, match=r"mini: row 3, field 'reward_model.ground_truth'"):
        samples_from_dataset(ds, name="mini")
    with pytest.warns(UserWarning, match="skipped 1 invalid rows of mini"):
        assert len(samples_from_dataset(ds, name="mini", skip_invalid=True)) == 4
    with pytest.raises(TypeError, match="pass one split"):
        samples_from_dataset(datasets.DatasetDict(train=ds))
    with pytest.raises(ValueError, match="expected the MMSearch-R1 schema"):
        samples_from_dataset(datasets.Dataset.from_list([{"a": 1}]))
    datasets.DatasetDict(train=ds).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="pass the split's directory"):
        load_samples(tmp_path / "dd")


@pytest.mark.parametrize(
    ("column", "value", "words"),
    [
        ("prompt", "What is this?", "field 'prompt': expected a list of {role, content} messages"),
        ("prompt", [{"role": "system", "content": "hi"}], "field 'prompt': missing or empty"),
        ("images", [], "field 'images': no image bytes"),
        ("reward_model", None, "field 'reward_model': expected a dict"),
    ],
)
def test_malformed_parquet_columns(tmp_path, column, value, words):
    rows = pq.read_table(MINI).to_pylist()
    rows[2][column] = value
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows[2:3]), path)  # one row: the bad value sets the column type
    with pytest.raises(DataError, match=rf"row 0, {words}"):
        load_samples(path)


def _png() -> bytes:
    """A 3x2 PNG whose six pixels all differ (a decode that mixed them up would show)."""
    from PIL import Image

    image = Image.new("RGB", (3, 2))
    image.putdata([(250, 0, 0), (0, 250, 0), (0, 0, 250), (9, 99, 199), (200, 100, 50), (1, 2, 3)])
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_a_saved_image_dataset_keeps_its_question_images_encoded(tmp_path):
    """``datasets`` decodes an ``Image`` column (and a list of them, verl's ``images``) to PIL images, which the
    samples kept decoded: 200 1024x768 JPEGs took +605 MB of RAM against 62 MB encoded. They keep the stored
    bytes, which decode to the same pixels; rows come in the dataset's order (a ``select``ed one's too)."""
    from PIL import Image

    from mmsr.data.sample import EncodedImage

    png, cell = _png(), {"bytes": _png(), "path": None}
    flat = datasets.Dataset.from_dict(
        {"question": ["q0?", "q1?"], "ground_truth": ["a", "b"], "image": [cell, cell]},
        features=datasets.Features({"question": datasets.Value("string"), "ground_truth": datasets.Value("string"),
                                    "image": datasets.Image()}),
    )  # fmt: skip
    message = datasets.Features({"role": datasets.Value("string"), "content": datasets.Value("string")})
    verl = datasets.Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "q?"}]], "images": [[cell]], "reward_model": [{"ground_truth": "a"}],
         "data_source": ["fvqa"]},
        features=datasets.Features({"prompt": datasets.List(message), "images": datasets.List(datasets.Image()),
                                    "reward_model": {"ground_truth": datasets.Value("string")},
                                    "data_source": datasets.Value("string")}),
    )  # fmt: skip
    assert type(flat[0]["image"]).__module__.startswith("PIL") and type(verl[0]["images"][0]).__module__.startswith("PIL")
    flat.save_to_disk(str(tmp_path / "flat"))
    verl.save_to_disk(str(tmp_path / "verl"))
    samples = load_samples(tmp_path / "flat") + load_samples(tmp_path / "verl")
    pixels = Image.open(io.BytesIO(png)).convert("RGB").tobytes()
    for s in samples:
        assert isinstance(s.stored_image, EncodedImage) and s.stored_image.data == png
        assert s.image.tobytes() == pixels
    assert [s.question for s in samples_from_dataset(flat.select([1, 0]))] == ["q1?", "q0?"]


def test_saved_datasets_without_ids_carry_their_folder_in_their_ids(tmp_path):
    # Two splits saved as ``train`` in two folders both gave ``train-0``, as two data files did.
    ds = datasets.Dataset.from_list(pq.read_table(MINI).to_pylist()[:2])
    for folder in ("fvqa", "infoseek"):
        ds.save_to_disk(str(tmp_path / folder / "train"))
    ids = [s.id for folder in ("fvqa", "infoseek") for s in load_samples(tmp_path / folder / "train")]
    assert ids == ["fvqa/train-0", "fvqa/train-1", "infoseek/train-0", "infoseek/train-1"]
