"""Boundaries and defaults of the offline search, crop and spec modules that a mutation audit found unpinned:
each test fails on one recorded mutant of mmsr/tools/{local,crop,format,spec}.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mmsr.tools.base import ToolRequest
from mmsr.tools.crop import Crop
from mmsr.tools.format import one_line
from mmsr.tools.local import LocalImageSearch, LocalTextSearch
from mmsr.tools.spec import IMAGE_SEARCH, TEXT_SEARCH, ImageSearchTool, TextSearchTool, Tool, ToolSpec, declared

from .test_local import _image_request, _run, _write


def _gradient(width: int = 64, height: int = 48) -> Image.Image:
    """An image whose pHash is not all zeros (a flat image hashes like every other flat image)."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 4 % 256, y * 5 % 256, (x * y) % 256) for y in range(height) for x in range(width)])
    return image


def _index(tmp_path: Path, rows: list[dict]) -> str:
    """A one-image index (``a.png``, a gradient) of ``rows``."""
    _gradient().save(tmp_path / "a.png")
    return str(_write(tmp_path / "index.jsonl", rows))


# --- local image search -------------------------------------------------------------------------------------


def test_top_k_zero_is_refused(tmp_path: Path) -> None:
    """top_k=0 would make every search return nothing."""
    index = _index(tmp_path, [{"image": "a.png", "title": "a"}])
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        LocalImageSearch(index=index, top_k=0)
    corpus = _write(tmp_path / "c.jsonl", [{"id": 1, "title": "t", "text": "zebra"}])
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        LocalTextSearch(corpus=str(corpus), top_k=0)


def test_an_entry_at_exactly_max_distance_is_kept(tmp_path: Path) -> None:
    tool = LocalImageSearch(index=_index(tmp_path, [{"image": "a.png", "title": "a"}]), max_distance=0)
    result = _run(tool, _image_request(_gradient()))  # the indexed image itself: distance 0
    assert result.titles == ("a",)


def test_an_image_that_cannot_be_hashed_is_a_failed_observation(tmp_path: Path) -> None:
    """Pillow raises ValueError converting a LAB image for pHash: a failure observation, not a crash."""
    tool = LocalImageSearch(index=_index(tmp_path, [{"image": "a.png", "title": "a"}]))
    result = _run(tool, _image_request(Image.new("LAB", (16, 16))))
    assert not result.ok and "the image could not be read" in result.text


def test_drawing_on_a_result_leaves_the_index_thumbnail_alone(tmp_path: Path) -> None:
    tool = LocalImageSearch(index=_index(tmp_path, [{"image": "a.png", "title": "a"}]))
    first = _run(tool, _image_request(_gradient())).images[0]
    before = first.tobytes()
    first.paste((255, 255, 255), (0, 0, *first.size))
    assert _run(tool, _image_request(_gradient())).images[0].tobytes() == before


def test_expand_titles_with_empty_titles_keeps_the_title(tmp_path: Path) -> None:
    index = _index(tmp_path, [{"image": "a.png", "title": "a", "titles": []}])
    result = _run(LocalImageSearch(index=index, expand_titles=True), _image_request(_gradient()))
    assert result.titles == ("a",)


def test_result_titles_are_one_line(tmp_path: Path) -> None:
    index = _index(tmp_path, [{"image": "a.png", "title": "x", "titles": ["a\nb", " c\t d "]}])
    result = _run(LocalImageSearch(index=index, expand_titles=True), _image_request(_gradient()))
    assert result.titles == ("a b", "c d")


# --- local text search and one_line -------------------------------------------------------------------------


def test_a_passage_of_exactly_max_chars_is_not_cut(tmp_path: Path) -> None:
    corpus = _write(tmp_path / "c.jsonl", [{"id": 1, "title": "t", "text": "zebra stripes"},
                                           {"id": 2, "title": "u", "text": "zebra stripes!"}])  # fmt: skip
    result = _run(LocalTextSearch(corpus=str(corpus), max_chars=13), ToolRequest(kind="text_search", query="zebra"))
    assert "(title: t) zebra stripes\n" in result.text and "(title: u) zebra stripes…\n" in result.text


def test_one_line_keeps_text_of_exactly_max_chars() -> None:
    assert one_line("abcde", 5) == "abcde" and one_line("abcdef", 5) == "abcde…"


# --- crop ---------------------------------------------------------------------------------------------------


def test_a_box_exactly_min_size_is_accepted() -> None:
    assert Crop().box("[0, 0, 14, 14]", (200, 100)) == (0, 0, 14, 14)
    assert Crop(min_size=20).box("[5, 5, 25, 25]", (200, 100)) == (5, 5, 25, 25)


def test_relative_1000_checks_the_height_in_the_images_height() -> None:
    """On a 640x160 image, 50/1000 of the height is 8 pixels (< 14) though 50/1000 of the width is 32."""
    relative = Crop(box_units="relative_1000")
    with pytest.raises(ValueError, match="smaller than 14 pixels on a side of the 640x160 image"):
        relative.box("[0, 0, 500, 50]", (640, 160))
    assert relative.box("[0, 0, 500, 100]", (640, 160)) == (0, 0, 500, 100)  # 16 pixels high


# --- spec ---------------------------------------------------------------------------------------------------


def test_with_image_defaults_to_an_image_argument() -> None:
    assert ToolSpec("look", "look", "image").with_image is True
    assert ToolSpec("ask", "ask", "text").with_image is False


def test_mmsearch_r1_limits() -> None:
    """MMSearch-R1 allows two text searches and one image search per episode; a well-formed one uses each once."""
    assert (TEXT_SEARCH.limit, TEXT_SEARCH.format_max) == (2, 1)
    assert (IMAGE_SEARCH.limit, IMAGE_SEARCH.format_max) == (1, 1)
    assert TextSearchTool().spec.limit == 2 and ImageSearchTool().spec.limit == 1


def test_a_tag_shared_with_image_search_is_refused() -> None:
    """image_search's tag is ``search``, not its name: the duplicate check must compare tags."""

    class Lens(Tool):
        spec = ToolSpec("lens", "search", "image")

    with pytest.raises(ValueError, match=r"tools 'image_search' and 'lens' both declare the tag <search>"):
        declared({"image_search": ImageSearchTool(), "lens": Lens()})


def test_a_plain_backend_among_tools_is_refused() -> None:
    with pytest.raises(ValueError, match="'text_search' is a plain backend among Tool entries"):
        declared({"image_search": ImageSearchTool(), "text_search": object()})


def test_an_entry_named_unlike_its_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="tool entry 'text_search' holds a tool whose spec is named 'image_search'"):
        declared({"text_search": ImageSearchTool()})
