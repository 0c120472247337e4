"""Data files that cannot be read at all (a Git LFS pointer in place of a parquet file, text that is not UTF-8,
a JSON file that is not JSON) raise a ``DataError`` naming the file; a Git LFS pointer is named as one, with the
command that fetches the data. Before, pyarrow's ``ArrowInvalid``, a bare ``UnicodeDecodeError`` or
``JSONDecodeError`` named no file."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmsr.data.benchmarks import LiveVQA, MMSearchR1Parquet
from mmsr.data.columns import ColumnMapping
from mmsr.data.errors import DataError
from mmsr.data.loaders import load_samples

# upstream's mmsearch_r1_infoseek_sub_2k.parquet as a clone without git-lfs leaves it
POINTER = ("version https://git-lfs.github.com/spec/v1\n"
           "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 277000000\n")  # fmt: skip
LFS = "Git LFS pointer, not the data: run `git lfs pull` in its repository"


def _loaders(path):
    """Every loader that reads ``path``'s format."""
    loaders = {"ColumnMapping": lambda: ColumnMapping(str(path)).load()}
    if path.suffix != ".json":  # load_samples reads no JSON list
        loaders["load_samples"] = lambda: load_samples(path)
        loaders["MMSearchR1Parquet"] = lambda: MMSearchR1Parquet(str(path), data_source="infoseek").load()
    return loaders


@pytest.mark.parametrize("name", ["mmsearch_r1_infoseek_sub_2k.parquet", "train.jsonl", "qa.json"])
def test_a_git_lfs_pointer_is_named_with_the_command_that_fetches_it(tmp_path, name):
    path = tmp_path / name
    path.write_text(POINTER)
    for loader, load in _loaders(path).items():
        with pytest.raises(DataError, match=re.escape(f"{path}: cannot read the data file")) as caught:
            load()
        assert str(caught.value).endswith(LFS), loader


def test_a_parquet_file_that_is_not_one_is_named_without_the_lfs_hint(tmp_path):
    path = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"question": ["q"], "ground_truth": ["x"]}), path)
    path.write_bytes(path.read_bytes()[:-20])  # a download cut short
    for loader, load in _loaders(path).items():
        with pytest.raises(DataError, match=re.escape(f"{path}: cannot read the data file (ArrowInvalid")) as caught:
            load()
        assert "Git LFS" not in str(caught.value), loader


def test_a_bad_shard_of_a_parquet_folder_is_named(tmp_path):
    (tmp_path / "set").mkdir()
    pq.write_table(pa.table({"question": ["q"], "answer": ["x"]}), tmp_path / "set" / "part-0.parquet")
    (tmp_path / "set" / "part-1.parquet").write_text(POINTER)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'set' / 'part-1.parquet'}: cannot read")):
        ColumnMapping(str(tmp_path / "set"), image=None).load()


def test_text_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"question": "café?", "ground_truth": "x"}, ensure_ascii=False).encode("latin-1"))
    for loader, load in _loaders(path).items():
        with pytest.raises(DataError, match=re.escape(f"{path}: cannot read the data file (UnicodeDecodeError")):
            load()


def test_a_json_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text('[{"sample_id": 1, "query": "q", gt_answer: "x"}]')
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot read the data file (JSONDecodeError: "
                                                  "Expecting property name")):  # fmt: skip
        LiveVQA(str(path)).load()
