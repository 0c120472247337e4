"""The demo's log under CI is a file: transformers' and huggingface_hub's own tqdm bars ("Loading weights",
"Writing model shards") would write a line at every redraw there, so the demo turns them off."""

import pytest
from transformers.utils import logging as hf_logging

import mmsr.demo.run as demo


@pytest.fixture
def library_bars(monkeypatch):
    """transformers' bars on and the variable unset, as in a fresh process; both restored after the test."""
    was = hf_logging.is_progress_bar_enabled()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    yield
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_the_demo_turns_the_libraries_progress_bars_off_before_it_runs(monkeypatch, library_bars):
    import os

    seen = []

    def run(*args):
        seen.append(hf_logging.is_progress_bar_enabled())
        raise KeyboardInterrupt  # stop before anything is built

    monkeypatch.setattr(demo, "run", run)
    with pytest.raises(KeyboardInterrupt):
        demo.main([])
    assert seen == [False]  # off before the run loads or saves any weights
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # and in the processes the demo starts


def test_progress_bars_the_user_asked_for_stay(monkeypatch, library_bars):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    demo.quiet_library_bars()
    assert hf_logging.is_progress_bar_enabled()
