"""Row and sampler behaviours a mutation audit of ``mmsr/data`` found untested: the sampler refusing a
checkpoint of another seed, the verl row's ``image_urls``, first image and last user message, and ``""``
ids falling back to the default id."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsr.data.loaders import load_samples
from mmsr.data.sampler import ResumableSampler


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="PNG")
    return buf.getvalue()


def _verl_row(**fields) -> dict:
    """One verl-schema row (one 4x4 image, question "q"), ``fields`` replacing or adding columns."""
    row = {"prompt": [{"role": "user", "content": "q"}], "images": [{"bytes": _png((4, 4)), "path": None}],
           "reward_model": {"ground_truth": "x", "candidate_answers": "[]"}, "data_source": "t"}  # fmt: skip
    return row | fields


def _load_parquet(tmp_path, **fields):
    """The one sample of a parquet file holding ``_verl_row(**fields)``."""
    pq.write_table(pa.Table.from_pylist([_verl_row(**fields)]), tmp_path / "t.parquet")
    (sample,) = load_samples(tmp_path / "t.parquet")
    return sample


def test_the_sampler_refuses_a_checkpoint_of_another_seed():
    """Another seed is another permutation: resuming at its position would repeat and skip prompts."""
    with pytest.raises(ValueError, match="seed 1, this run has 10 and 2"):
        ResumableSampler(10, seed=2).load_state_dict(ResumableSampler(10, seed=1).state_dict())


def test_a_parquet_row_keeps_its_image_url(tmp_path):
    """``image_urls`` is the URL web image search is given for the row's picture."""
    assert _load_parquet(tmp_path, image_urls="https://img.example/a.jpg").image_url == "https://img.example/a.jpg"


def test_a_parquet_row_takes_its_first_image(tmp_path):
    images = [{"bytes": _png((4, 4)), "path": None}, {"bytes": _png((8, 8)), "path": None}]
    assert _load_parquet(tmp_path, images=images).image.size == (4, 4)


def test_a_verl_prompt_asks_its_last_user_message(tmp_path):
    """A multi-turn prompt's question is its last user turn; earlier ones are context."""
    prompt = [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}]
    assert _load_parquet(tmp_path, prompt=prompt).question == "second"


def test_empty_jsonl_ids_get_distinct_default_ids(tmp_path):
    """``"data_id": ""`` is unset: two such rows must not share the id "" (ids key the caches)."""
    rows = [{"data_id": "", "question": "q", "ground_truth": "x"} for _ in range(2)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stem = f"{tmp_path.name}/t"  # a default id: the file's folder and stem, then the row
    assert [s.id for s in load_samples(tmp_path / "t.jsonl")] == [f"{stem}-0", f"{stem}-1"]
