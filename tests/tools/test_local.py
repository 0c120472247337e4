"""Offline search backends against the FVQA dev recordings, plus the index builder's determinism."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mmsr.tools import IMAGE_MARKER, LocalImageSearch, LocalTextSearch, SearchTool, ToolRequest, ToolResult
from tools.build_fvqa_index import CORPUS, IMAGE_INDEX, load_rows, render  # a script of the top-level tools/

from .fake_web import broken_png

DATA = Path(__file__).resolve().parents[2] / "data" / "fvqa_dev_20"
SEARCH = DATA / "search"
INDEX_ROWS = [json.loads(line) for line in (SEARCH / IMAGE_INDEX).read_text(encoding="utf-8").splitlines()]


def _image_request(image: Image.Image) -> ToolRequest:
    return ToolRequest(kind="image_search", image=image)


def _run(tool: SearchTool, request: ToolRequest) -> ToolResult:
    return asyncio.run(tool(request))


def _reencode(image: Image.Image) -> Image.Image:
    """What a dataset pipeline might do to the question image: shrink it and save it as a lossy JPEG."""
    small = image.resize((image.width * 2 // 3, image.height * 2 // 3))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=60)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def image_search() -> LocalImageSearch:
    return LocalImageSearch(index=str(SEARCH / IMAGE_INDEX))


@pytest.fixture(scope="module")
def text_search() -> LocalTextSearch:
    return LocalTextSearch(corpus=str(SEARCH / CORPUS))


# --- image search -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", INDEX_ROWS, ids=[r["data_id"] for r in INDEX_ROWS])
def test_image_search_finds_own_image_first(image_search: LocalImageSearch, row: dict) -> None:
    image = Image.open(SEARCH / row["image"]).convert("RGB")
    for query in (image, _reencode(image)):
        result = _run(image_search, _image_request(query))
        assert result.ok and result.titles[0] == row["title"]
        (_, own), (_, other) = image_search.search(query)[:2]
        # Hamming bits. Copies land at 0-2, except the 102x104 Airbnb logo (4385): 12 after shrink + q60.
        # Unrelated FVQA images are >= 18 apart.
        assert own <= 12 < 18 <= other


def test_image_result_format(image_search: LocalImageSearch) -> None:
    image = Image.open(DATA / "images" / "fvqa_train_1078.jpg")
    result = _run(image_search, _image_request(image))
    assert isinstance(image_search, SearchTool)
    assert result.text.startswith("[Image Search Results] ")
    assert result.text.count(IMAGE_MARKER) == len(result.images) == len(result.titles) == 5
    assert f"1. image: {IMAGE_MARKER}\ntitle: {result.titles[0]}\n" in result.text
    assert result.cost == 0 and result.latency_s > 0
    for thumbnail in result.images:
        assert thumbnail.mode == "RGB" and max(thumbnail.size) <= 64
    assert result.images[0].size == (64, 36)  # 640x360 source: aspect kept


def test_image_search_top_k_and_thumbnail_size() -> None:
    tool = LocalImageSearch(index=str(SEARCH / IMAGE_INDEX), top_k=2, thumbnail_size=32)
    result = _run(tool, _image_request(Image.open(DATA / "images" / "fvqa_train_2594.jpg")))
    assert len(result.images) == 2 and result.text.count(IMAGE_MARKER) == 2
    assert all(max(im.size) <= 32 for im in result.images)


def test_expand_titles_returns_the_recorded_titles() -> None:
    tool = LocalImageSearch(index=str(SEARCH / IMAGE_INDEX), expand_titles=True)
    row = next(r for r in INDEX_ROWS if r["data_id"] == "fvqa_train_881")
    result = _run(tool, _image_request(Image.open(SEARCH / row["image"])))
    # 4 recorded titles, then the nearest other image fills the 5th slot.
    assert list(result.titles[:4]) == row["titles"] and len(row["titles"]) == 4
    assert len(result.images) == 5


def test_max_distance_drops_unrelated_images() -> None:
    tool = LocalImageSearch(index=str(SEARCH / IMAGE_INDEX), max_distance=4)
    noise = Image.effect_noise((200, 120), 80).convert("RGB")
    result = _run(tool, _image_request(noise))
    assert result.ok and result.images == () and IMAGE_MARKER not in result.text


def test_image_request_without_image_is_a_failed_observation(image_search: LocalImageSearch) -> None:
    result = _run(image_search, ToolRequest(kind="image_search"))
    assert not result.ok and result.text.startswith("[Image Search Results]") and result.images == ()


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bad_image_index_names_file_and_line(tmp_path: Path) -> None:
    Image.new("RGB", (20, 10), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "broken.png").write_bytes(broken_png())  # Pillow raises SyntaxError, not OSError
    cases = {
        "broken_png.jsonl": ([{"image": "ok.png", "title": "a"}, {"image": "broken.png", "title": "b"}],
                             ":2: cannot read image .*broken.png \\(SyntaxError"),
        "missing_title.jsonl": ([{"image": "ok.png", "title": "a"}, {"image": "ok.png"}], ":2: missing field 'title'"),
        "broken_image.jsonl": ([{"image": "broken.jpg", "title": "a"}], ":1: cannot read image"),
        "missing_image.jsonl": ([{"image": "ok.png", "title": "a"}, {"image": "nope.png", "title": "b"}], ":2:"),
        "bad_json.jsonl": ([{"image": "ok.png", "title": "a"}, "{oops"], ":2: invalid JSON"),
    }
    for name, (rows, message) in cases.items():
        index = _write(tmp_path / name, rows)
        with pytest.raises(ValueError, match=f"{name}{message}"):
            LocalImageSearch(index=str(index))
    with pytest.raises(FileNotFoundError, match="image search index .*absent.jsonl not found"):
        LocalImageSearch(index=str(tmp_path / "absent.jsonl"))


# --- text search --------------------------------------------------------------------------------------------


def _recorded_queries() -> list[tuple[str, str]]:
    """(data_id, query) for every recorded text search in the FVQA dev rows."""
    return [
        (row["data_id"], turn["tool"]["query"])
        for row in load_rows(DATA)
        for turn in row["mmsearch_r1_7b_run"]["rounds"]
        if turn["action"] == "text_search" and turn.get("tool")
    ]


@pytest.mark.parametrize("data_id,query", _recorded_queries(), ids=[d for d, _ in _recorded_queries()])
def test_text_search_finds_the_recorded_passages(text_search: LocalTextSearch, data_id: str, query: str) -> None:
    best, score = text_search.search(query)[0]
    assert best.id.startswith(f"{data_id}/") and score > 0
    result = _run(text_search, ToolRequest(kind="text_search", query=query))
    assert result.ok and result.titles[0] == best.title and result.images == ()
    assert result.text.startswith("[Text Search Results] ") and f"\n1. (title: {best.title}) " in result.text


def test_text_search_respects_top_k_and_max_chars() -> None:
    tool = LocalTextSearch(corpus=str(SEARCH / CORPUS), top_k=2, max_chars=50)
    result = _run(tool, ToolRequest(kind="text_search", query="Musketeers of the Guard"))
    entries = result.text.splitlines()[1:]
    assert len(result.titles) == len(entries) == 2
    for title, entry in zip(result.titles, entries):
        body = entry.split(f"(title: {title}) ", 1)[1]
        assert len(body) <= 51 and body.endswith("…")  # 50 characters + the ellipsis


@pytest.mark.parametrize("query", ["", "   \n"])
def test_blank_query_is_a_failed_observation(text_search: LocalTextSearch, query: str) -> None:
    result = _run(text_search, ToolRequest(kind="text_search", query=query))
    assert not result.ok and result.text.startswith("[Text Search Results]")


@pytest.mark.parametrize("query", ["zzyzx qwertyuiop", "the of and"])
def test_no_match_is_an_ok_empty_result(text_search: LocalTextSearch, query: str) -> None:
    result = _run(text_search, ToolRequest(kind="text_search", query=query))
    assert result.ok and result.titles == () and "nothing relevant" in result.text


@pytest.mark.parametrize("query", ["zzzz", "the", "what is the answer", "東京"])
def test_a_query_of_no_corpus_word_finds_nothing_beside_passages_of_no_words(tmp_path: Path, query: str) -> None:
    """Passages 1 and 3 tokenize to nothing (stopwords, a one-letter word): bm25s indexed them under the empty
    token, the one an unknown query became, so every query matching nothing returned them, score ~0.24."""
    corpus = _write(tmp_path / "c.jsonl", [{"id": 1, "title": "", "text": "the a of"},
                                           {"id": 2, "title": "Eiffel\nTower", "text": "Paris landmark"},
                                           {"id": 3, "title": "x", "text": "é"}])  # fmt: skip
    tool = LocalTextSearch(corpus=str(corpus), top_k=50)
    assert tool.search(query) == []
    assert [p.id for p, _ in tool.search(f"eiffel {query}")] == ["2"]  # a known word still finds its passage
    result = _run(tool, ToolRequest(kind="text_search", query=query))
    assert result.ok and result.titles == () and "nothing relevant" in result.text


def test_flashrag_corpus_format(tmp_path: Path) -> None:
    corpus = _write(tmp_path / "wiki.jsonl", [
        {"id": "0", "contents": '"Aardvark"\nThe aardvark is a burrowing mammal native to Africa.'},
        {"id": 1, "contents": '"Zebra"\nZebras are African equines with black and white stripes.'},
    ])
    result = _run(LocalTextSearch(corpus=str(corpus)), ToolRequest(kind="text_search", query="striped equines"))
    assert result.titles == ("Zebra",)
    assert "1. (title: Zebra) Zebras are African equines" in result.text


def test_bad_corpus_names_file_and_line(tmp_path: Path) -> None:
    corpus = _write(tmp_path / "bad.jsonl", [{"id": "a", "title": "t", "text": "x"}, {"id": "b", "title": "t"}])
    with pytest.raises(ValueError, match="bad.jsonl:2: missing field 'text'"):
        LocalTextSearch(corpus=str(corpus))


# --- index builder ------------------------------------------------------------------------------------------


def test_checked_in_indexes_match_the_builder() -> None:
    built = render(DATA, SEARCH)
    for name, text in built.items():
        assert (SEARCH / name).read_bytes() == text.encode("utf-8"), f"{name} is stale: rerun build_fvqa_index"
    assert len(INDEX_ROWS) == 18  # 2 of the 20 rows answered without an image search
