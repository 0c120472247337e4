"""What the row loaders (``load_samples`` / ``samples_from_dataset``, ``mmsr.data.rows``) and ``ColumnMapping``
must read alike: which image cells are URLs, the default ids of rows without one, and answers."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsr.data.columns import ColumnMapping, Fetched
from mmsr.data.loaders import DataError, load_samples
from mmsr.reward.mmsearch_r1 import is_correct
from tests.conftest import import_optional

URL = "https://example.com/a.png"


class Fetcher:
    """Every URL downloads as one red image; the URLs asked for are kept."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def fetch(self, urls):
        self.asked += urls
        return {url: Fetched(Image.new("RGB", (4, 4), "red")) for url in urls}


def _jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("cell", [f"  {URL} ", "HTTPS://example.com/a.png", {"bytes": None, "path": URL}])
def test_both_loaders_take_the_same_cells_for_urls(tmp_path, cell):
    """An upper-case scheme was a file name to both (``ColumnMapping`` did not download it), and a ``datasets``
    Image cell holding a URL in its ``path`` was read as the file ``folder/https:/...`` by ``load_samples``."""
    path = tmp_path / "t.jsonl"
    _jsonl(path, [{"id": "a", "question": "q", "ground_truth": "x", "image": cell}])
    url = (cell["path"] if isinstance(cell, dict) else cell).strip()
    with pytest.raises(DataError, match=rf"t.jsonl: line 1, field 'image': is a URL \({re.escape(url)}\); download"):
        load_samples(path)
    with pytest.raises(DataError, match=rf"row 0, field 'image': is a URL \({re.escape(url)}\); give the loader"):
        ColumnMapping(str(path), answer="ground_truth", id="id").load()
    fetcher = Fetcher()
    (sample,) = ColumnMapping(str(path), answer="ground_truth", id="id", download=fetcher).load()
    assert fetcher.asked == [url] and sample.image_url == url and sample.image.size == (4, 4)


def test_a_url_in_a_parquet_image_cell_is_named_as_one(tmp_path):
    """verl's ``images`` cell with a URL for its path (a ``datasets`` Image list cast from URLs)."""
    rows = [{"prompt": [{"role": "user", "content": "q"}], "images": [{"bytes": None, "path": URL}],
             "reward_model": {"ground_truth": "x"}}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=rf"row 0, field 'images': is a URL \({re.escape(URL)}\); .*'image_urls'"):
        load_samples(tmp_path / "t.parquet")


def test_column_mapping_default_ids_carry_the_folder_as_load_samples_does(tmp_path, monkeypatch):
    """``fvqa/test.jsonl`` and ``infoseek/test.jsonl`` without ids both gave ``test-0`` through ``ColumnMapping``,
    and other ids than ``load_samples`` gives the same file's rows; so does a folder of parquet shards."""
    for name in ("fvqa", "infoseek"):
        _jsonl(tmp_path / name / "test.jsonl", [{"question": "q", "ground_truth": "x"}] * 2)
    mapped = [s.id for name in ("fvqa", "infoseek")
              for s in ColumnMapping(str(tmp_path / name / "test.jsonl"), answer="ground_truth", image=None).load()]
    assert mapped == ["fvqa/test-0", "fvqa/test-1", "infoseek/test-0", "infoseek/test-1"]
    assert mapped[:2] == [s.id for s in load_samples(tmp_path / "fvqa" / "test.jsonl")]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "x"}]), tmp_path / "hub" / "data" / "0.parquet")
    monkeypatch.chdir(tmp_path / "hub")  # how the path is written changes nothing
    assert [s.id for s in ColumnMapping("data", image=None).load()] == ["hub/data-0"]


def test_datasets_named_with_a_folder_carry_it_in_their_ids():
    datasets = import_optional("datasets", 'pip install -e ".[hf]" (or the dev extra) to run the datasets tests')
    from mmsr.data.hf import samples_from_dataset

    ds = datasets.Dataset.from_list([{"question": "q", "ground_truth": "x"}])
    ids = [samples_from_dataset(ds, name=f"{name}/train.parquet")[0].id for name in ("fvqa", "infoseek")]
    assert ids == ["fvqa/train-0", "infoseek/train-0"]
    assert samples_from_dataset(ds, name="mini_data")[0].id == "mini_data-0"


def test_a_list_ground_truth_with_padded_items_scores_as_a_string_one(tmp_path):
    """Items of a list ground truth are kept as written, as a string ground truth is; the reward normalizes
    both alike (whitespace collapsed), so padding changes no score."""
    rows = [{"id": "s", "question": "q", "ground_truth": " Eiffel Tower "},
            {"id": "l", "question": "q", "ground_truth": [" Eiffel Tower ", "La Tour Eiffel\n"]}]  # fmt: skip
    _jsonl(tmp_path / "t.jsonl", rows)
    string, listed = load_samples(tmp_path / "t.jsonl")
    assert (listed.ground_truth, listed.candidate_answers) == (string.ground_truth, ("La Tour Eiffel\n",))
    for mode in ("EM", "SubEM"):
        for answer in ("eiffel tower", " Eiffel  Tower. ", "la tour eiffel"):
            assert is_correct([f"<answer>{answer}</answer>"], listed.ground_truth, listed.candidate_answers, mode)
        assert is_correct(["<answer>Eiffel Tower</answer>"], string.ground_truth, (), mode)
        assert not is_correct(["<answer>Eiffel</answer>"], listed.ground_truth, listed.candidate_answers, "EM")
