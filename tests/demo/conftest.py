"""A small world's sizes (the short demo the demo tests share is ``short_demo`` in tests/conftest.py)."""

# a world for tests that need its files, not the demo's size (1,200 + 40 landmarks)
SMALL = {"train_landmarks": 300, "eval_landmarks": 20, "reading_pages": 200}

import os

import pytest


@pytest.fixture(autouse=True)
def _library_bars_restored():
    """``mmsr demo``'s ``main`` turns transformers' bars off and sets ``HF_HUB_DISABLE_PROGRESS_BARS`` for its
    process; a test calling it must not leave both so for the rest of the suite."""
    from transformers.utils import logging as hf_logging

    was, env = hf_logging.is_progress_bar_enabled(), os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    yield
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
    if env is None:
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = env
