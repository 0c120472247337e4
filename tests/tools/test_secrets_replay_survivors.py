"""Tests for the survivors of a mutation audit of ``mmsr.tools.replay`` and ``mmsr.tools.secrets``: small
recorded boxes load, an empty ``data_id`` is unset, a repeated image search keeps its first recording, failures
stay out of the cache, replayed images are copies; 8-character secrets, 12-character copies (one at the very
start of the text), ``*_PASSWORD`` variables, values read with a trailing newline and ``+``-encoded spaces are
masked, and ``redact_all`` rebuilds a NamedTuple."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import NamedTuple

import pytest
from PIL import Image

from mmsr.tools import ToolRequest
from mmsr.tools import secrets
from mmsr.tools.cache import request_key
from mmsr.tools.replay import ReplaySearch, record_into_cache, recorded_results
from mmsr.tools.secrets import redact, redact_all
from tests.conftest import FVQA

from .test_crop_search_replay import record
from .test_replay import ROWS, _recording, _rounds

IMAGE_ROW = next(r for r in ROWS if _rounds(r)[0]["action"] == "image_search")
KEY = "Zq7Lm2Xp9Rt4Wv6Ky8Bn3Hc5"  # 24 distinct characters: no copy of it grows past where it was cut


@pytest.fixture(autouse=True)
def own_secret_names(monkeypatch):
    """Names registered or pasted by other tests do not leak in, nor do these leak out."""
    monkeypatch.setattr(secrets, "SECRET_ENVS", set(secrets.SECRET_ENVS))
    monkeypatch.setattr(secrets, "_pasted", set())


def _image_row(data_id, titles: list[str]) -> dict:
    """``IMAGE_ROW`` under ``data_id``, its one round an image search that saw ``titles``."""
    rounds = [{"round": 1, "action": "image_search", "tool": {"titles": titles}}]
    return dict(IMAGE_ROW, data_id=data_id, mmsearch_r1_7b_run={"rounds": rounds})


# --- replay ----------------------------------------------------------------------------------------------------


def test_a_recorded_box_under_the_policy_minimum_still_loads(tmp_path):
    """The policy's crop minimum (``Crop().min_size``) judges new boxes, not what was already recorded."""
    path = record(tmp_path, SimpleNamespace(id=ROWS[0]["data_id"]), [0, 0, 10, 10], (100, 100), ["tiny"])
    assert [r.titles for r in recorded_results(path).values()] == [("tiny",)]


def test_an_empty_data_id_is_unset_as_the_loader_reads_it(tmp_path):
    """``load_samples`` ids a row with ``data_id: ""`` by its file stem and index; the replay must too."""
    replay = ReplaySearch(_recording(tmp_path / "rec.jsonl", [_image_row("", ["a", "b"])]))
    by_id = asyncio.run(replay(ToolRequest("image_search", sample_id=f"{tmp_path.name}/rec-0")))
    assert by_id.ok and by_id.titles == ("a", "b")


def test_a_repeated_image_search_keeps_its_first_recording(tmp_path):
    rows = [_image_row("first", ["kept"]), _image_row("second", ["dropped", "too"])]  # one image, two recordings
    results = recorded_results(_recording(tmp_path / "rec.jsonl", rows))
    assert [r.titles for (kind, _), r in results.items() if kind == "image_search"] == [("kept",)]


def test_a_recorded_failure_is_not_written_into_the_cache(tmp_path):
    """A text search whose pages were all unread replays as a failure; caching it would serve it as an answer."""
    unread = {"round": 2, "action": "text_search", "tool": {"query": "q", "results": [], "summaries": []}}
    row = _image_row("r", ["t"])
    row["mmsearch_r1_7b_run"]["rounds"].append(unread)
    src = _recording(tmp_path / "rec.jsonl", [row])
    assert not recorded_results(src)[("text_search", request_key(ToolRequest("text_search", "q")))].ok
    assert record_into_cache(src, tmp_path / "cache.sqlite") == 1  # the image search only


def test_a_caller_changing_a_replayed_image_does_not_change_the_next_replay(tmp_path):
    replay = ReplaySearch(_recording(tmp_path / "rec.jsonl", [_image_row("r", ["t"])]))
    request = ToolRequest("image_search", sample_id="r")
    first = asyncio.run(replay(request)).images[0]
    before = first.getpixel((0, 0))
    first.putpixel((0, 0), tuple(255 - c for c in before))
    assert asyncio.run(replay(request)).images[0].getpixel((0, 0)) == before


def test_an_image_sent_with_the_request_is_searched_not_its_rows_image(tmp_path):
    """A request that carries an image (a region, another picture) is answered for that image even when it also
    names a row: the row's own image stands in only for a request without one."""
    other = next(r for r in ROWS if _rounds(r)[0]["action"] == "image_search" and r["image"] != IMAGE_ROW["image"])
    b = _image_row("b", ["row b"]) | {"image": other["image"]}
    replay = ReplaySearch(_recording(tmp_path / "rec.jsonl", [_image_row("a", ["row a"]), b]))
    image_b = Image.open(FVQA / other["image"]).convert("RGB")
    assert asyncio.run(replay(ToolRequest("image_search", sample_id="a"))).titles == ("row a",)
    assert asyncio.run(replay(ToolRequest("image_search", image=image_b, sample_id="a"))).titles == ("row b",)


# --- secrets ---------------------------------------------------------------------------------------------------


def test_a_secret_of_exactly_min_chars_is_masked(monkeypatch):
    monkeypatch.setenv("MMSR_TEST_API_KEY", "k3y-8chr")
    assert len("k3y-8chr") == secrets.MIN_CHARS
    assert redact("got k3y-8chr back") == "got [redacted MMSR_TEST_API_KEY] back"


def test_a_copy_of_exactly_partial_chars_is_masked(monkeypatch):
    monkeypatch.setenv("MMSR_TEST_API_KEY", KEY)
    assert redact(f"<{KEY[3:15]}>") == "<[redacted MMSR_TEST_API_KEY]>"


def test_a_copy_at_the_start_of_the_text_is_masked_from_position_0(monkeypatch):
    """Grown left from its anchor, the copy must reach the text's first character (12 characters, no more)."""
    monkeypatch.setenv("MMSR_TEST_API_KEY", KEY)
    assert redact(KEY[1:13] + "...") == "[redacted MMSR_TEST_API_KEY]..."


def test_a_password_variable_is_masked(monkeypatch):
    monkeypatch.setenv("MMSR_DB_PASSWORD", "hunter2-correct-horse")
    assert redact("login hunter2-correct-horse") == "login [redacted MMSR_DB_PASSWORD]"


def test_a_value_read_with_a_trailing_newline_is_masked_without_it(monkeypatch):
    """A ``.env`` file's line ending stays in the value; the text quotes the key alone (9 characters: too short
    for partial copies, so only the stripped whole value masks it)."""
    monkeypatch.setenv("MMSR_TEST_API_KEY", "pw-9chars\n")
    assert redact("key pw-9chars.") == "key [redacted MMSR_TEST_API_KEY]."


def test_a_value_with_spaces_url_encoded_with_plus_is_masked(monkeypatch):
    monkeypatch.setenv("MMSR_TEST_API_KEY", "ab cd ef gh ij kl")  # no 12-character run survives the encoding
    assert redact("GET /?q=ab+cd+ef+gh+ij+kl") == "GET /?q=[redacted MMSR_TEST_API_KEY]"


class _Pair(NamedTuple):
    text: str
    n: int


def test_redact_all_rebuilds_a_namedtuple_field_by_field(monkeypatch):
    monkeypatch.setenv("MMSR_TEST_API_KEY", KEY)
    assert redact_all(_Pair(f"k={KEY}", 3)) == _Pair("k=[redacted MMSR_TEST_API_KEY]", 3)
