"""Question images stay encoded until read: the loaders keep each image's file bytes (checked once at
load), ``Sample.image`` decodes them on access, and a parquet file is read a row batch at a time."""

import base64
import gc
import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsr.data.benchmarks import MMSearchR1Parquet
from mmsr.data.columns import ColumnMapping
from mmsr.data.loaders import DataError, load_samples
from mmsr.data.sample import EncodedImage, Sample
from tests.conftest import FVQA


def _png(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path, images: list[bytes]):
    rows = [{"data_id": f"r{i}", "prompt": [{"role": "user", "content": "What is it?"}],
             "images": [{"bytes": data, "path": None}],
             "reward_model": {"ground_truth": "x", "candidate_answers": "[]"}} for i, data in enumerate(images)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path


def _live_pil_images() -> int:
    gc.collect()
    return sum(isinstance(o, Image.Image) for o in gc.get_objects())


def test_parquet_images_are_not_decoded_until_read(tmp_path):
    pngs = [_png(i) for i in range(10)]
    before = _live_pil_images()
    samples = load_samples(_parquet(tmp_path / "q.parquet", pngs))  # 3 row groups, read in batches
    assert _live_pil_images() == before  # every image was decoded to check it, and none is kept
    assert [s.stored_image.data for s in samples] == pngs
    image = samples[3].image
    assert image.mode == "RGB" and image.tobytes() == Image.open(io.BytesIO(pngs[3])).convert("RGB").tobytes()
    assert samples[3].image is image  # one object while it is held (a rollout's vision inputs hold it)
    assert _live_pil_images() == before + 1
    del image
    assert _live_pil_images() == before  # freed once nothing holds it; the next read decodes again
    assert samples[3].image.tobytes() == Image.open(io.BytesIO(pngs[3])).tobytes()


def test_a_data_source_override_keeps_the_images_encoded(tmp_path):
    """``MMSearchR1Parquet(data_source=...)`` rewrites every sample; ``dataclasses.replace`` alone would
    read ``Sample.image`` and so decode (and keep) every image of the file."""
    pngs = [_png(i) for i in range(6)]
    before = _live_pil_images()
    samples = MMSearchR1Parquet(str(_parquet(tmp_path / "q.parquet", pngs)), data_source="fvqa_test").load()
    assert _live_pil_images() == before
    assert [s.stored_image.data for s in samples] == pngs and {s.data_source for s in samples} == {"fvqa_test"}


def test_a_column_mapping_keeps_bytes_files_and_base64_encoded(tmp_path):
    pngs = [_png(i) for i in range(4)]
    (tmp_path / "pic.png").write_bytes(pngs[1])
    rows = [{"q": "What is it?", "a": "x", "img": "pic.png"},
            {"q": "What is it?", "a": "x", "img": "data:image/png;base64," + base64.b64encode(pngs[2]).decode()}]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist([{"q": "What is it?", "a": "x", "img": {"bytes": pngs[3], "path": None}}]),
                   tmp_path / "set.parquet")  # fmt: skip
    before = _live_pil_images()
    samples = [s for name in ("set.jsonl", "set.parquet")
               for s in ColumnMapping(str(tmp_path / name), question="q", answer="a", image="img").load()]  # fmt: skip
    assert _live_pil_images() == before
    assert [s.stored_image.data for s in samples] == pngs[1:]
    assert samples[1].image.tobytes() == Image.open(io.BytesIO(pngs[2])).convert("RGB").tobytes()


def test_a_corrupt_image_still_fails_at_load_naming_the_row(tmp_path):
    pngs = [_png(0), _png(1)[:60]]
    with pytest.raises(DataError, match=r"q.parquet: row 1, field 'images': cannot decode image"):
        load_samples(_parquet(tmp_path / "q.parquet", pngs))


def test_jsonl_image_files_are_kept_as_their_bytes(fvqa_samples):
    s = fvqa_samples[0]
    assert isinstance(s.stored_image, EncodedImage)
    assert s.stored_image.data == (FVQA / "images" / "fvqa_train_1078.jpg").read_bytes()
    assert s.image.size == Image.open(FVQA / "images" / "fvqa_train_1078.jpg").size


def test_samples_with_encoded_images_pickle_compare_and_stay_frozen():
    data = _png(7)
    sample = Sample("a", "What is it?", EncodedImage(data), "x")
    again = pickle.loads(pickle.dumps(sample))
    assert isinstance(again.stored_image, EncodedImage) and again.stored_image.data == data
    assert again == sample and again != Sample("a", "What is it?", EncodedImage(_png(8)), "x")
    decoded = Sample("a", "What is it?", Image.open(io.BytesIO(data)).convert("RGB"), "x")
    assert decoded == sample and decoded.stored_image is decoded.image  # a PIL image is kept as given
    with pytest.raises(AttributeError):
        sample.image = None
    with pytest.raises(TypeError, match="ground_truth"):
        Sample("a", "What is it?", None)
