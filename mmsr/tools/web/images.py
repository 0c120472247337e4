"""Images from third-party URLs, fetched and decoded one way for every caller: web image search's and the FVQA
cache's thumbnails, and the URL images of evaluation sets (``mmsr.tools.web.download``).

The URL and every redirect pass the SSRF guard, the bytes come through an ``HTTPClient`` (its timeouts,
retries and byte cap), and the image's header is read before anything is decoded, so a small file that
would decode to a huge bitmap is refused cheaply. Decoding runs in a thread: it is CPU work the event loop
must not wait on. Every failure is a ``ToolError``, which callers turn into observations or per-row errors.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from functools import partial

from PIL import Image

from mmsr.data.sample import MAX_ASPECT  # the rollout would discard the whole result: such a thumbnail is skipped
from mmsr.tools.budget import Deadline
from mmsr.tools.web import guard
from mmsr.tools.web.http import HTTPClient, ToolError, transient


def decode_checked(data: bytes, max_pixels: int) -> Image.Image:
    """RGB image from bytes, refusing more than ``max_pixels`` before decoding; ``ToolError`` (kind
    ``too_large`` or ``bad_image``) otherwise."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:  # the header only so far: nothing big was decoded
            raise ToolError(f"the image is {image.width}x{image.height}, over {max_pixels} pixels", "too_large")
        return image.convert("RGB")
    except ToolError:
        raise
    except Exception as exc:
        # The bytes are a third party's: Pillow's decoders raise more than OSError on corrupt files
        # (SyntaxError, EOFError, struct.error ...); every one of them means "unreadable", never a crash.
        raise ToolError(f"not a readable image ({type(exc).__name__})", "bad_image") from None


def cut_short(outcomes: Sequence[Image.Image | ToolError], top_k: int) -> bool:
    """Whether a transient failure (``transient``) took the place of a thumbnail that would have been among the
    ``top_k`` shown, in rank order: such a result is shown but not cached. Later ranks stand in for skipped
    ones, so a failure after the ``top_k``-th shown thumbnail changes nothing."""
    shown = 0
    for outcome in outcomes:
        if shown == top_k:
            return False
        if not isinstance(outcome, ToolError):
            shown += 1
        elif transient(outcome):
            return True
    return False




def shrunk(image: Image.Image, max_side: int) -> Image.Image:
    """An RGB copy of ``image``, shrunk to ``max_side`` on its longest side (aspect kept); ``ToolError``
    (``bad_image``) where the result's sides differ more than ``MAX_ASPECT`` times."""
    image = image.convert("RGB")
    image.thumbnail((max_side, max_side))
    if max(image.size) > MAX_ASPECT * min(image.size):
        raise ToolError(f"the image is {image.width}x{image.height}, a shape the model cannot take", "bad_image")
    return image


def decode_thumbnail(data: bytes, max_pixels: int, max_side: int) -> Image.Image:
    """``decode_checked``, ``shrunk`` to ``max_side`` (``ToolError`` for an image too narrow for the model)."""
    return shrunk(decode_checked(data, max_pixels), max_side)


async def fetch_image(client: HTTPClient, url: str, max_pixels: int, allow_private: bool,
                      deadline: Deadline = Deadline(), max_side: int | None = None) -> Image.Image:  # fmt: skip
    """The image at ``url``: GET through ``client`` behind the SSRF guard, cancelled at ``deadline`` (none by
    default), then decoded in a thread (``decode_checked``; shrunk to ``max_side`` when given).

    Raises ``ToolError`` for a refused URL, a failed or late download and an image over ``max_pixels`` or
    unreadable."""
    check = partial(guard.check_url, allow_private=allow_private)
    data = await deadline.run(client.request("GET", url, parse=bytes, check=check), "the image download")
    if max_side is None:
        return await asyncio.to_thread(decode_checked, data, max_pixels)
    return await asyncio.to_thread(decode_thumbnail, data, max_pixels, max_side)
