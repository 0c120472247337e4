"""What the row loaders (``load_samples`` / ``samples_from_dataset``, ``mmsr.data.rows``) and ``ColumnMapping``
must read alike: which image cells are URLs, the default ids of rows without one, and answers."""

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsr.data.columns import ColumnMapping, Fetched
from mmsr.data.hf import name_id_stem
from mmsr.data.loaders import DataError, load_samples
from mmsr.data.rows import jsonl_sample, parquet_sample
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
    """Items of a list ground truth are stripped, as a string ground truth is (``ColumnMapping`` always did); the
    reward normalizes both alike (whitespace collapsed), so padding changes no score."""
    rows = [{"id": "s", "question": "q", "ground_truth": " Eiffel Tower "},
            {"id": "l", "question": "q", "ground_truth": [" Eiffel Tower ", "La Tour Eiffel\n"]}]  # fmt: skip
    _jsonl(tmp_path / "t.jsonl", rows)
    string, listed = load_samples(tmp_path / "t.jsonl")
    assert (listed.ground_truth, listed.candidate_answers) == (string.ground_truth, ("La Tour Eiffel",))
    assert string.ground_truth == "Eiffel Tower"
    for mode in ("EM", "SubEM"):
        for answer in ("eiffel tower", " Eiffel  Tower. ", "la tour eiffel"):
            assert is_correct([f"<answer>{answer}</answer>"], listed.ground_truth, listed.candidate_answers, mode)
        assert is_correct(["<answer>Eiffel Tower</answer>"], string.ground_truth, (), mode)
        assert not is_correct(["<answer>Eiffel</answer>"], listed.ground_truth, listed.candidate_answers, "EM")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "blue").save(buf, "PNG")
    return buf.getvalue()


def _verl_row(truth, candidates=None) -> dict:
    reward = {"ground_truth": truth} if candidates is None else {"ground_truth": truth, "candidate_answers": candidates}
    return {"prompt": [{"role": "user", "content": "q"}], "images": [{"bytes": _png(), "path": None}],
            "reward_model": reward}  # fmt: skip


@pytest.mark.parametrize(("cell", "truth", "candidates"), [
    ('["a","b"]', "a", ("b",)),  # a list stored as text (a string column)
    (' ["a", "a ", "b"]\n', "a", ("b",)),
    (["Eiffel", "Eiffel ", " Tower"], "Eiffel", ("Tower",)),  # repeats but for whitespace are one candidate
    (" Eiffel Tower ", "Eiffel Tower", ()),
    ("[1990]", "1990", ()),  # numbers are answers in a list cell, so in a JSON-text one
    ('[1990, "1990s"]', "1990", ("1990s",)),
    ('[{"wikidata": 12, "range": [11, 13]}]', "12", ()),  # InfoSeek's numeric entries, as ColumnMapping reads them
    ("[citation needed]", "[citation needed]", ()),  # no JSON: one answer that starts with '['
    ('["a", null]', '["a", null]', ()),  # JSON, but no list of answers: the text is the answer
    ("[1, [2]]", "[1, [2]]", ()),
])  # fmt: skip
def test_both_loaders_read_a_ground_truth_cell_alike(tmp_path, cell, truth, candidates):
    """``load_samples`` kept a JSON-text list as one literal answer (``a`` then failed EM against ``["a","b"]``)
    and whitespace repeats as separate candidates, which ``ColumnMapping`` strips and drops: the judge's prompt
    and cache key differed between the loaders of one file."""
    _jsonl(tmp_path / "t.jsonl", [{"id": "r", "question": "q", "ground_truth": cell}])
    loaders = {"load_samples": load_samples(tmp_path / "t.jsonl"),
               "ColumnMapping": ColumnMapping(str(tmp_path / "t.jsonl"), answer="ground_truth", image=None).load()}
    if isinstance(cell, str) or all(isinstance(c, str) for c in cell):  # what a parquet column can hold
        pq.write_table(pa.Table.from_pylist([_verl_row(cell)]), tmp_path / "t.parquet")
        loaders["verl parquet"] = load_samples(tmp_path / "t.parquet")
    for name, (sample,) in loaders.items():
        assert (name, sample.ground_truth, sample.candidate_answers) == (name, truth, candidates)
    (sample,) = loaders["load_samples"]
    for answer in (truth, *candidates):  # '["a","b"]': the answer "a" failed EM
        assert is_correct([f"<answer>{answer}</answer>"], sample.ground_truth, sample.candidate_answers, "EM")


def test_both_loaders_list_the_same_candidates(tmp_path):
    """The ground truth and whitespace repeats among ``candidate_answers`` stayed there for ``load_samples``:
    the judge's prompt (and so its cache key) listed ``Eiffel Tower `` and `` La Tour Eiffel`` besides."""
    rows = [{"id": "r", "question": "q", "ground_truth": "Eiffel Tower",
             "candidate_answers": '["Eiffel Tower ", " La Tour Eiffel", "La Tour Eiffel", "", 1889]'}]  # fmt: skip
    _jsonl(tmp_path / "t.jsonl", rows)
    (loaded,) = load_samples(tmp_path / "t.jsonl")
    (mapped,) = ColumnMapping(str(tmp_path / "t.jsonl"), answer="ground_truth", aliases="candidate_answers",
                              image=None).load()  # fmt: skip
    assert loaded.candidate_answers == mapped.candidate_answers == ("La Tour Eiffel", "1889")
    verl = _verl_row("Eiffel Tower", rows[0]["candidate_answers"])
    pq.write_table(pa.Table.from_pylist([verl]), tmp_path / "t.parquet")
    assert load_samples(tmp_path / "t.parquet")[0].answers == ("Eiffel Tower", "La Tour Eiffel", "1889")


def test_verl_rows_with_numpy_answer_cells(tmp_path):
    """A verl row read by pandas (``pd.read_parquet(...).to_dict("records")``) holds its list cells as numpy
    arrays: a ground truth array was refused as no string, a candidates array raised numpy's "truth value of
    an array is ambiguous", naming no row, and an ``images`` array was "no image bytes"."""
    row = _verl_row(np.array(["Eiffel Tower", "Eiffel Tower "]), np.array([" La Tour Eiffel", "Eiffel Tower"]))
    row["images"] = np.array(row["images"], dtype=object)
    sample = parquet_sample(row, tmp_path / "t.parquet", 0)
    assert (sample.ground_truth, sample.candidate_answers) == ("Eiffel Tower", ("La Tour Eiffel",))
    years = parquet_sample(_verl_row(np.array([1889, 1890]), np.array([], dtype=object)), tmp_path / "t.parquet", 1)
    assert years.answers == ("1889", "1890")
    with pytest.raises(DataError, match=r"t.parquet: row 2, field 'reward_model.ground_truth': expected a string"):
        parquet_sample(_verl_row(np.array([True])), tmp_path / "t.parquet", 2)
    # verl keeps the candidates under reward_model too: the error named a top-level field no parquet has
    with pytest.raises(DataError, match=r"t.parquet: row 3, field 'reward_model.candidate_answers': not a JSON list"):
        parquet_sample(_verl_row("Eiffel Tower", "[not json"), tmp_path / "t.parquet", 3)


def test_a_dot_in_a_dataset_or_folder_name_is_no_extension(tmp_path, monkeypatch):
    """``org/data.v1`` and ``org/data.v2`` both gave ids ``org/data-0`` (``Path.stem``), as did folders of
    parquet shards named so; only a data format's extension is dropped."""
    stems = [name_id_stem(n) for n in ("org/data.v2", "fvqa/train.parquet", "mini.JSONL", "v1.0")]
    assert stems == ["org/data.v2", "fvqa/train", "mini", "v1.0"]
    for version in ("v1", "v2"):
        shards = tmp_path / "hub" / f"data.{version}"
        shards.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "x"}]), shards / "0.parquet")
    monkeypatch.chdir(tmp_path / "hub")
    ids = [ColumnMapping(f"data.{v}", image=None).load()[0].id for v in ("v1", "v2")]
    assert ids == ["hub/data.v1-0", "hub/data.v2-0"]
    datasets = import_optional("datasets", 'pip install -e ".[hf]" (or the dev extra) to run the datasets tests')
    from mmsr.data.hf import samples_from_dataset

    ds = datasets.Dataset.from_list([{"question": "q", "ground_truth": "x"}])
    ids = [samples_from_dataset(ds, name=f"org/data.{v}")[0].id for v in ("v1", "v2")]
    assert ids == ["org/data.v1-0", "org/data.v2-0"]


@pytest.mark.parametrize("category, expected", [(1, "1"), ("", None), (None, None), ("art", "art")])
def test_numeric_categories_and_sources_are_text_in_both_row_schemas(tmp_path, category, expected):
    # ints from a jsonl set reached Sample.category (typed str | None), and sorting them beside strings crashed
    # the evaluation's summary after every episode had run, and a training step's per-category metrics
    flat = {"id": "a", "question": "q?", "ground_truth": "x", "image": None, "category": category, "data_source": 7}
    verl = {**_verl_row("x", None), "data_source": 7, "category": category}
    for sample in (jsonl_sample(flat, tmp_path / "f.jsonl", 0), parquet_sample(verl, tmp_path / "f.parquet", 0)):
        assert (sample.category, sample.data_source) == (expected, "7")


def test_every_loader_reads_a_question_cell_alike(tmp_path):
    """``ColumnMapping`` stripped a question, ``load_samples`` kept it as stored (both schemas): the prompt strips
    it anyway, but the judge's prompt and cache key and the text search took it whole, so one file read by the
    two loaders gave two questions. Inner whitespace is the question's own and stays."""
    padded = ["  What is this?\n", "\tWho built\n it? "]
    _jsonl(tmp_path / "t.jsonl", [{"id": str(i), "question": q, "ground_truth": "x"} for i, q in enumerate(padded)])
    verl = [{**_verl_row("x"), "prompt": [{"role": "user", "content": q}], "question": q, "answer": "x"}
            for q in padded]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "t.parquet")
    read = {
        "load_samples jsonl": load_samples(tmp_path / "t.jsonl"),
        "ColumnMapping jsonl": ColumnMapping(str(tmp_path / "t.jsonl"), answer="ground_truth", image=None).load(),
        "load_samples verl": load_samples(tmp_path / "t.parquet"),
        "ColumnMapping verl": ColumnMapping(str(tmp_path / "t.parquet"), image=None).load(),
    }
    for name, samples in read.items():
        assert (name, [s.question for s in samples]) == (name, ["What is this?", "Who built\n it?"])
