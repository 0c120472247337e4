"""What ``MMSRDataModule.setup`` refuses in the files it loads."""

import json
import re

import pytest

from mmsr.data.datamodule import MMSRDataModule


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": f"q{i}?", "ground_truth": "a", **r}) + "\n" for i, r in enumerate(rows)))
    return str(path)


def test_repeated_sample_ids_are_refused_naming_the_id_and_its_files(tmp_path):
    """Two files whose rows share a ``data_id`` made two samples of one id, and ``SFTModule`` trained the first
    question on the second's teacher turns (ids key them). Within the train files, within the val files, within a
    file, and a file listed twice; the same rows as train and val are allowed."""
    fvqa = _jsonl(tmp_path / "fvqa/train.jsonl", [{"data_id": "0"}])
    infoseek = _jsonl(tmp_path / "infoseek/train.jsonl", [{"data_id": "0"}])
    repeated = _jsonl(tmp_path / "r.jsonl", [{"data_id": "x"}, {"data_id": "y"}, {"data_id": "x"}])
    distinct = _jsonl(tmp_path / "d.jsonl", [{"data_id": "x"}, {"data_id": "y"}])
    cases = [
        (MMSRDataModule([fvqa, infoseek]), f"data.train_files: sample id '0' is in {fvqa} and in {infoseek}"),
        (MMSRDataModule([distinct], [repeated]), f"data.val_files: sample id 'x' is twice in {repeated}"),
        (MMSRDataModule([distinct, distinct]), f"data.train_files: sample id 'x' is in {distinct} and in {distinct}"),
    ]
    for dm, words in cases:
        with pytest.raises(ValueError, match=re.escape(words) + ".*give each row its own data_id"):
            dm.setup("fit")
    dm = MMSRDataModule([distinct, fvqa], [distinct])
    dm.setup("fit")
    assert [s.id for s in dm.train] == ["x", "y", "0"] and [s.id for s in dm.val] == ["x", "y"]


@pytest.mark.parametrize("count", [0, -2])
def test_a_step_without_prompts_is_refused_naming_the_field(count):
    with pytest.raises(ValueError, match=rf"MMSRDataModule: prompts_per_step={count} \(must be >= 1\)"):
        MMSRDataModule(["train.jsonl"], prompts_per_step=count)
