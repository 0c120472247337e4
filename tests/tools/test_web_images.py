"""The one checked image fetch shared by web image search, the FVQA cache and the URL image downloader: the
pixel cap is applied to the header before decoding, thumbnails are shrunk, and a refused URL or a spent
deadline is a ``ToolError`` before any byte is requested. (Downloads from a live server are covered by the
callers' tests: test_web_search.py, test_fvqa_cache.py, test_image_download.py.)"""

from __future__ import annotations

import asyncio
import struct
import zlib

import pytest
from PIL import Image

from mmsr.tools.budget import Deadline
from mmsr.tools.web.fake import png
from mmsr.tools.web.http import HTTPClient, Limits, ToolError
from mmsr.tools.web.images import decode_checked, decode_thumbnail, fetch_image, shrunk

from .fake_web import broken_png


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels and whose pixel data is one empty row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_too_many_pixels_is_refused_from_the_header() -> None:
    # Almost no pixel data follows: decoding would fail as bad_image, so too_large shows only the header was read.
    with pytest.raises(ToolError, match=r"the image is 3000x3000, over 1000000 pixels") as info:
        decode_checked(png_header_only(3000, 3000), max_pixels=1_000_000)
    assert info.value.kind == "too_large"
    with pytest.raises(ToolError, match=r"not a readable image") as info:
        decode_checked(png_header_only(3000, 3000), max_pixels=10_000_000)
    assert info.value.kind == "bad_image"


def test_unreadable_bytes_are_bad_image() -> None:
    with pytest.raises(ToolError, match=r"not a readable image \(UnidentifiedImageError\)") as info:
        decode_checked(b"<html>not found</html>", max_pixels=1_000_000)
    assert info.value.kind == "bad_image"


def test_images_come_back_rgb_and_thumbnails_shrunk() -> None:
    image = decode_checked(png("red", (60, 40)), max_pixels=2400)  # exactly at the cap is allowed
    assert (image.mode, image.size) == ("RGB", (60, 40))
    thumb = decode_thumbnail(png("red", (60, 40)), max_pixels=2400, max_side=30)
    assert (thumb.mode, thumb.size) == ("RGB", (30, 20))
    assert isinstance(thumb, Image.Image)


def test_a_thumbnail_too_narrow_for_the_models_processor_is_a_bad_image() -> None:
    # smart_resize refuses sides over 200 times apart, and the rollout then drops the whole search result.
    with pytest.raises(ToolError, match=r"the image is 512x2, a shape the model cannot take") as info:
        decode_thumbnail(png("red", (1000, 4)), max_pixels=1_000_000, max_side=512)  # shrunk: 512x2, 256 to 1
    assert info.value.kind == "bad_image"
    with pytest.raises(ToolError, match=r"the image is 3x700"):
        shrunk(Image.new("RGB", (3, 700)), max_side=1024)  # the FVQA cache's inline thumbnails are shrunk too
    assert decode_thumbnail(png("red", (400, 2)), max_pixels=1_000_000, max_side=512).size == (400, 2)  # just 200


def test_refused_url_and_spent_deadline_are_tool_errors() -> None:
    client = HTTPClient("images", Limits(timeout_s=1.0, retries=0, breaker_failures=0))
    with pytest.raises(ToolError, match=r"non-public address") as info:
        asyncio.run(fetch_image(client, "http://127.0.0.1:9/x.png", 1_000_000, allow_private=False))
    assert info.value.kind == "refused"
    with pytest.raises(ToolError, match=r"no time left for the image download") as info:
        asyncio.run(fetch_image(client, "http://127.0.0.1:9/x.png", 1_000_000, True, Deadline(at=0.0), 512))
    assert info.value.kind == "deadline"
    assert client.metrics()["tools/images/calls"] == 1.0  # the late request was never started


def test_a_corrupt_png_is_bad_image_though_pillow_raises_syntax_error() -> None:
    with pytest.raises(ToolError, match=r"not a readable image \(SyntaxError\)") as info:
        decode_checked(broken_png(), max_pixels=1_000_000)
    assert info.value.kind == "bad_image"


@pytest.mark.parametrize("error", [EOFError("truncated"), struct.error("unpack"), IndexError("tile"), SyntaxError("x")])
def test_whatever_a_decoder_raises_on_untrusted_bytes_is_bad_image(monkeypatch, error) -> None:
    # Pillow's plugins raise all of these on corrupt files (found by fuzzing); none may escape a search.
    def corrupt(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Image.Image, "convert", corrupt)
    with pytest.raises(ToolError, match=rf"not a readable image \({type(error).__name__}\)") as info:
        decode_checked(png("red"), max_pixels=1_000_000)
    assert info.value.kind == "bad_image"
