"""The evaluation sets of the MMSearch-R1 paper's Table 1, read in their published row formats.

Each loader is a ``class_path`` entry of ``configs/eval/suite.yaml`` (``mmsr eval --suite``). The column
names are those of the cited source; every one can be overridden in ``init_args`` (all but
``MMSearchR1Parquet`` are ``ColumnMapping`` presets), which is the way out where a schema could not be
confirmed or a mirror renames a column. The paper's set sizes (spec §9, App. E): FVQA-test 1,800;
InfoSeek 2,000 test rows; MMSearch the 171 of 300 questions with an image; SimpleVQA the 1,013 English of
2,025; LiveVQA ``ONE-Lab/LiveVQA-Research-Preview``.

Images: the published files hold them as bytes, ``datasets`` Image cells, base64 or file names; a copy that
holds URLs instead (a mirror, a converted export) loads with ``download`` (``ColumnMapping``'s: an
``mmsr.tools.web.download.ImageDownloader``), on ``MMSearch``, ``SimpleVQA``, ``LiveVQA`` and
``ColumnMapping``. ``InfoSeek`` names OVEN image ids and ``MMSearchR1Parquet`` holds image bytes (its
``image_urls`` are empty for FVQA), so they take none.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mmsr.data.columns import ColumnMapping, EvalSet, ImageFetcher
from mmsr.data.loaders import load_samples
from mmsr.data.sample import Sample

__all__ = ["InfoSeek", "LiveVQA", "MMSearch", "MMSearchR1Parquet", "SimpleVQA"]


class MMSearchR1Parquet(EvalSet):
    """FVQA-test and the paper's InfoSeek 2k subset: the MMSearch-R1 / verl parquet (``prompt``, ``images``,
    ``reward_model``, ``data_source``, ``image_urls``, ``extra_info``, ``data_id``; spec §8).

    Source: ``lmms-lab/FVQA`` on the Hugging Face Hub (``fvqa_test.parquet``, 1,800 rows, no ``category``
    column; file listing read on the dataset page), and ``mmsearch_r1/data/mmsearch_r1_infoseek_sub_2k.parquet``
    of ``EvolvingLMMs-Lab/multimodal-search-r1`` (a Git LFS file; issue #18). Read by
    ``mmsr.data.loaders.load_samples``, which also takes the project's jsonl + image folder.

    Args:
        path: the parquet file, a saved ``datasets`` directory in the same schema, or a jsonl file in the flat
            jsonl schema (``mmsr.data.loaders``: ``question``, ``ground_truth``, ``image``, ...; not this one).
        data_source: overrides the rows' ``data_source`` (default: as the file says).
        skip_invalid: drop bad rows (one warning with the count) instead of raising.
    """

    def __init__(self, path: str, data_source: str | None = None, skip_invalid: bool = False) -> None:
        self.path, self.data_source, self.skip_invalid = Path(path), data_source, skip_invalid

    def load(self) -> list[Sample]:
        samples = load_samples(self.path, self.skip_invalid)
        if self.data_source is None:
            return samples
        # image=stored_image: replace() would read Sample.image and so decode every image of the file
        return [replace(s, image=s.stored_image, data_source=self.data_source) for s in samples]


class InfoSeek(ColumnMapping):
    """InfoSeek's own jsonl (``infoseek_val.jsonl``, ``infoseek_human.jsonl``, ...): one object per line,
    ``{"data_id", "image_id", "question", "answer": [...], "answer_eval": [...], "data_split"}``; images are
    the OVEN files ``<image_id>.jpg`` / ``.JPEG`` in ``image_root`` (flat, or in OVEN's two-digit shard
    folders, ``04/oven_04925844.jpg``).

    Source: the README of ``open-vision-language/infoseek`` (its training-row example) and OVEN's
    annotation example (``file_name: /04/oven_04925844.jpg``); the ``.jpg`` / ``.JPEG`` extensions are
    those OVEN loaders check. ``answer_eval`` holds the accepted aliases; for numeric questions its
    entries are ``{"wikidata": value, "range": [lo, hi]}`` (the value is used, the range is not). The
    public test split has no answers (a row without one is an error); the paper's 2k test rows with
    answers are the MMSearch-R1 parquet (``MMSearchR1Parquet``).
    """

    def __init__(self, path: str, image_root: str, question: str = "question", answer: str = "answer",
                 aliases: str | None = "answer_eval", image: str = "image_id", id: str | None = "data_id",
                 category: str | None = "data_split", data_source: str | None = "infoseek",
                 suffixes: list[str] | None = None, skip_invalid: bool = False) -> None:  # fmt: skip
        super().__init__(path, question, answer, aliases, image, id, category, data_source, image_root,
                         skip_invalid=skip_invalid)  # fmt: skip
        self.suffixes = suffixes if suffixes is not None else [".jpg", ".JPEG"]

    def image_files(self, name: str) -> list[Path]:
        root = self.image_root or self.path.parent
        shard = name.removeprefix("oven_")[:2]
        return [root / name] + [d / f"{name}{s}" for s in self.suffixes for d in (root, root / shard)]


class MMSearch(ColumnMapping):
    """MMSearch's ``end2end`` subset (``CaraJ/MMSearch``, split ``end2end``, 300 rows): ``sample_id``,
    ``query``, ``query_image`` (a ``datasets`` Image; empty for text-only questions, which are skipped, as
    the paper keeps the 171 with an image), ``gt_answer``, ``alternative_gt_answers`` (a list), ``area``,
    ``subfield``, ``timestamp``, ``gt_requery``, ``image_search_result``.

    Source: lmms-eval's ``lmms_eval/tasks/mmsearch/mmsearch_end2end.yaml`` (dataset and split) and
    ``lmms_eval_utils.py`` (``mmsearch_end2end_process_results`` reads these columns).
    """

    def __init__(self, path: str, question: str = "query", answer: str = "gt_answer",
                 aliases: str | None = "alternative_gt_answers", image: str = "query_image",
                 id: str | None = "sample_id", category: str | None = "area", data_source: str | None = "mmsearch",
                 image_root: str | None = None, skip_no_image: bool = True, skip_invalid: bool = False,
                 download: ImageFetcher | None = None) -> None:  # fmt: skip
        super().__init__(path, question, answer, aliases, image, id, category, data_source, image_root,
                         skip_no_image=skip_no_image, skip_invalid=skip_invalid, download=download)  # fmt: skip


class SimpleVQA(ColumnMapping):
    """SimpleVQA (``m-a-p/SimpleVQA``, ``test.parquet``, 2,025 rows): ``data_id``, ``image``, ``question``,
    ``answer``, ``language``, ``vqa_category``, ``original_category``, ``source``, ``atomic_question``,
    ``atomic_fact``, ``image_description``.

    Source: the ``dataset_info`` features of the Hub mirror ``ohjoonhee/SimpleVQA`` (2,024 rows) and
    lmms-eval's ``lmms_eval/tasks/simplevqa/utils.py``, which decodes ``image`` as a PIL image or a
    base64 string (both are read here). NOT confirmed: the values of ``language``; the paper keeps the
    English rows, so ``languages`` (compared ignoring case) defaults to the likely spellings. Set it to
    ``null`` for every row, or to the values your copy holds.
    """

    where_setting = "`languages:` to the values your copy holds (null keeps every row)"

    def __init__(self, path: str, languages: tuple[str, ...] | None = ("en", "english"), question: str = "question",
                 answer: str = "answer", image: str = "image", id: str | None = "data_id",
                 category: str | None = "vqa_category", language: str = "language",
                 data_source: str | None = "simplevqa", image_root: str | None = None, skip_invalid: bool = False,
                 download: ImageFetcher | None = None) -> None:  # fmt: skip
        where = {language: list(languages)} if languages is not None else None
        super().__init__(path, question, answer, None, image, id, category, data_source, image_root, where,
                         skip_invalid=skip_invalid, download=download)  # fmt: skip


class LiveVQA(ColumnMapping):
    """LiveVQA research preview (``ONE-Lab/LiveVQA-Research-Preview``): ``qa.json``, a list of
    ``{"sample_id", "query", "query_image", "gt_answer"}`` with ``query_image`` a path into the dataset's
    ``image/`` folder (relative to the folder holding ``qa.json``).

    Source: NOT confirmed from the dataset card (the dataset is gated); the columns are those a public
    converter reads (``process_livevqa_preview.py`` of a PMSR evaluation repository, found by code
    search), which also accepts a top-level ``{"data": [...]}`` object. Override the columns if your copy
    differs.
    """

    def __init__(self, path: str, question: str = "query", answer: str = "gt_answer", aliases: str | None = None,
                 image: str = "query_image", id: str | None = "sample_id", category: str | None = None,
                 data_source: str | None = "livevqa", image_root: str | None = None, skip_invalid: bool = False,
                 download: ImageFetcher | None = None) -> None:  # fmt: skip
        super().__init__(path, question, answer, aliases, image, id, category, data_source, image_root,
                         skip_invalid=skip_invalid, download=download)  # fmt: skip

    def image_files(self, name: str) -> list[Path]:
        root = self.image_root or self.path.parent
        return [root / name.lstrip("/"), root / "image" / Path(name).name]
