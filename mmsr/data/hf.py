"""Hugging Face ``datasets`` objects -> ``Sample`` records (optional extra ``mmsr[hf]``).

Either schema works: MMSearch-R1 / verl (``prompt``, ``images``, ``reward_model``, ...) or the flat
jsonl one (``question``, ``ground_truth``, ``image``, ...). ``Image`` columns (also in lists, as verl's
``images``) are read undecoded, as their stored ``{"bytes", "path"}`` cells, so the samples keep the
encoded bytes as from a parquet file (``datasets`` decodes them to PIL images: 200 1024x768 JPEGs took
605 MB of RAM, against 62 MB encoded). Validation and error messages are
those of ``mmsr.data.rows`` (file, row, field), with the dataset's name standing in for the file.

    import datasets
    from mmsr.data.hf import samples_from_dataset
    samples = samples_from_dataset(datasets.load_dataset("parquet", data_files="fvqa_test.parquet")["train"])
"""

from __future__ import annotations

import dataclasses
from functools import partial
from collections.abc import Iterator
from pathlib import Path

from mmsr.data.rows import collect, data_stem, default_id_stem, jsonl_sample, parquet_sample
from mmsr.data.sample import Sample


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("reading Hugging Face datasets needs the 'hf' extra: pip install 'mmsr[hf]'") from None
    return datasets


def samples_from_dataset(dataset, name: str | None = None, skip_invalid: bool = False,
                         id_stem: str | None = None) -> list[Sample]:  # fmt: skip
    """Validate every row of a ``datasets.Dataset`` (one split) into ``Sample`` records.

    Args:
        dataset: a ``datasets.Dataset``; a ``DatasetDict`` must be indexed by split first.
        name: how errors name the dataset (default: its ``info.dataset_name`` or ``"dataset"``).
        skip_invalid: drop bad rows (one warning with the count) instead of raising.
        id_stem: what the ids of rows without one start with (default: ``name_id_stem`` of ``name``; unnamed,
            the ``datasets`` builder's name, e.g. ``parquet`` for every parquet dataset: name two such).
    """
    datasets = _require_datasets()
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(f"got a DatasetDict with splits {sorted(dataset)}; pass one split, e.g. ds['train']")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    columns = set(dataset.column_names)
    if "prompt" in columns and "reward_model" in columns:
        make = parquet_sample
    elif "question" in columns and "ground_truth" in columns:
        make = jsonl_sample
    else:
        raise ValueError(
            f"dataset {name or 'dataset'} has columns {sorted(columns)}: expected the MMSearch-R1 schema "
            "(prompt, images, reward_model, data_source) or question / ground_truth / image"
        )
    label = Path(name or getattr(dataset.info, "dataset_name", None) or "dataset")
    make = partial(make, id_stem=id_stem or name_id_stem(label))
    return collect(_undecoded_rows(dataset), make, label, skip_invalid)


def name_id_stem(name: str | Path) -> str:
    """A dataset's default id stem: its ``name`` less a data format's extension (``data_stem``) and, where the
    name is written with one, its folder (``fvqa/test.parquet``: ``fvqa/test``; a Hub id ``lmms-lab/FVQA`` and
    ``org/data.v2`` stay whole), as a data file's rows carry their folder (``default_id_stem``): ``fvqa/train``
    and ``infoseek/train`` both gave ``train-0``. Not read against the working directory, as a file's is: a
    name need not be a path."""
    path = Path(name)
    return f"{path.parent.name}/{data_stem(path)}" if path.parent.name else data_stem(path)


def _undecoded_rows(dataset, batch_rows: int = 256) -> Iterator[dict]:
    """The rows as ``iter(dataset)`` gives them, but for their images: the stored cells. Not ``dataset.cast``
    to ``Image(decode=False)``: for an image list it rewrites the table (a cache file beside a saved dataset),
    where this decodes each batch of Arrow rows (selected ones too) with the undecoding features."""
    features = _undecoded(dataset.features)
    for batch in dataset.with_format("arrow").iter(batch_size=batch_rows):
        yield from (features.decode_example(row) for row in batch.to_pylist())


def _undecoded(feature):
    """``feature`` with each ``Image`` in it (a column, or in lists and dicts of any depth) as ``decode=False``."""
    datasets = _require_datasets()
    if isinstance(feature, datasets.Image):
        return dataclasses.replace(feature, decode=False)
    if isinstance(feature, dict):  # ``Features`` too, whose columns then decode as they did but for images
        return type(feature)({key: _undecoded(sub) for key, sub in feature.items()})
    if isinstance(feature, datasets.LargeList):
        return datasets.LargeList(_undecoded(feature.feature))
    if isinstance(feature, datasets.List):  # ``Sequence(...)`` is a ``List``
        return datasets.List(_undecoded(feature.feature), length=feature.length)
    return feature


def load_dataset_dir(path: Path, skip_invalid: bool = False) -> list[Sample]:
    """A directory written by ``Dataset.save_to_disk`` (a ``DatasetDict`` directory must name one split)."""
    datasets = _require_datasets()
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path} is a directory but not a saved Hugging Face dataset ({exc})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{path} holds splits {sorted(dataset)}; pass the split's directory, e.g. {path / 'train'}")
    # its folder's name too, as a data file's rows (``default_id_stem``): two splits saved as ``train`` apart
    return samples_from_dataset(dataset, str(path), skip_invalid, default_id_stem(path))
