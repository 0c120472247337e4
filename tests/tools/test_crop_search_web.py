"""Crop-then-search on the web backend: ``UploadHost`` publishes the region (a PUT to a local server that
stores what it gets), Lens (a local fake in SerpAPI's format) is asked about the published URL, thumbnails
come back. Upload failures are observations, except a refusal before the host ever took an upload, which stops
the run; the shipped snippet builds and fits the paper's time cap."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from jsonargparse import ArgumentParser
from PIL import Image

from mmsr.tools import IMAGE_MARKER, ToolRequest
from mmsr.tools.base import SearchTool
from mmsr.tools.crop import CropSearch
from mmsr.tools.web.fake import png, serpapi_lens, serve
from mmsr.tools.web.host import UploadHost
from mmsr.tools.web.http import Limits, ProviderRefused
from mmsr.tools.web.image_search import WebImageSearch
from mmsr.tools.web.providers import SerpAPILens

from .fake_web import Script

ROOT = Path(__file__).resolve().parents[2]
FAST = Limits(timeout_s=2.0, retries=1, backoff_s=0.01, backoff_max_s=0.02, breaker_failures=0)
TOKEN = "host-token-s3cr3t-456"


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    monkeypatch.setenv("SERPAPI_API_KEY", "serp-key")
    monkeypatch.setenv("IMAGE_HOST_TOKEN", TOKEN)


def question_image() -> Image.Image:
    """400x200: white, a red block in the box the policy (seeing it at 200x100) will crop, a blue dot in it."""
    image = Image.new("RGB", (400, 200), "white")
    image.paste((255, 0, 0), (100, 50, 300, 150))
    image.paste((0, 0, 255), (120, 60, 140, 80))
    return image


class Bucket:
    """A PUT-and-GET object store: ``PUT /upload/<name>`` stores the body (``status`` != 200: refuses, quoting
    the credential it got, as careless servers do), ``GET /public/<name>`` serves it."""

    def __init__(self, status: int = 200) -> None:
        self.status, self.objects, self.puts = status, {}, []

    async def put(self, request: web.Request) -> web.Response:
        body, name = await request.read(), request.match_info["name"]
        self.puts.append((name, body, dict(request.headers)))
        if self.status != 200:
            return web.json_response({"error": f"token {request.headers.get('Authorization')} denied"}, status=self.status)
        await asyncio.sleep(0.05)  # concurrent uploads of one region overlap
        self.objects[name] = body
        return web.Response(status=200)

    async def get(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return web.Response(body=self.objects[name], content_type="image/png") if name in self.objects else web.Response(status=404)


def routes(bucket: Bucket, lens: Script) -> list:
    return [("PUT", "/upload/{name}", bucket.put), ("GET", "/public/{name}", bucket.get), ("GET", "/lens", lens),
            ("GET", "/t1", Script((200, png("green")))), ("GET", "/t2", Script((200, png("yellow", (30, 40)))))]  # fmt: skip


def crop_search(url: str, format: str = "png") -> CropSearch:
    host = UploadHost(f"{url}/upload/{{sha256}}.{format}", f"{url}/public/{{sha256}}.{format}", format=format,
                      auth_env="IMAGE_HOST_TOKEN", limits=FAST)  # fmt: skip
    web_search = WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=FAST), image_host=host, top_k=2,
                                allow_private=True)  # fmt: skip
    return CropSearch(web_search)


def request(box: str) -> ToolRequest:
    return ToolRequest("crop_search", box, question_image(), None, "row1", "what is it?", 30.0, (200, 100))


async def fetch(url: str) -> bytes:
    from mmsr.tools.web.http import HTTPClient

    return await HTTPClient("test", FAST).request("GET", url, parse=bytes)


def test_crop_search_uploads_the_region_and_searches_its_public_url():
    bucket, lens = Bucket(), Script()

    async def main():
        async with serve(routes(bucket, lens)) as url:
            lens.responses = [(200, serpapi_lens([("A red block", f"{url}/t1"), ("Blue dot", f"{url}/t2")]))]
            tool = crop_search(url)
            first = await tool(request("[50, 25, 150, 75]"))
            again = await tool(request("[50, 25, 150, 75]"))
            public = await fetch(lens.requests[0]["query"]["url"])
            return url, tool, first, again, public

    url, tool, first, again, public = asyncio.run(main())
    assert first.ok and first.titles == ("A red block", "Blue dot") and len(first.images) == 2
    assert first.text.startswith("[Image Search Results]") and first.text.count(IMAGE_MARKER) == 2
    assert first.images[0].getpixel((0, 0)) == (0, 128, 0)  # the thumbnails, not the region
    ((name, body, headers),) = bucket.puts  # the same region twice: uploaded once
    region = Image.open(io.BytesIO(body))
    assert region.size == (200, 100) and region.getpixel((30, 20)) == (0, 0, 255)
    assert region.convert("RGB").tobytes() == question_image().crop((100, 50, 300, 150)).tobytes()
    assert name == hashlib.sha256(body).hexdigest() + ".png" and headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Content-Type"] == "image/png"
    assert [r["query"]["url"] for r in lens.requests] == [f"{url}/public/{name}"] * 2 and public == body
    assert again.ok and again.titles == first.titles
    metrics = tool.backend.metrics()
    assert metrics["tools/image_host/uploaded"] == 1 and metrics["tools/image_host/reused"] == 1


def test_concurrent_searches_of_one_region_share_one_upload_and_other_regions_get_their_own():
    bucket, lens = Bucket(), Script()

    async def main():
        async with serve(routes(bucket, lens)) as url:
            lens.responses = [(200, serpapi_lens([("A red block", f"{url}/t1")]))]
            tool = crop_search(url, format="jpeg")
            same = await asyncio.gather(*(tool(request("[50, 25, 150, 75]")) for _ in range(3)))
            other = await tool(request("[0, 0, 100, 50]"))
            return tool, same, other

    tool, same, other = asyncio.run(main())
    assert all(r.ok for r in [*same, other]) and len(bucket.puts) == 2
    assert tool.backend.image_host.counts["joined"] == 2
    (_, first, headers), (_, second, _) = bucket.puts
    assert headers["Content-Type"] == "image/jpeg" and Image.open(io.BytesIO(first)).format == "JPEG"
    assert Image.open(io.BytesIO(first)).size == (200, 100) and Image.open(io.BytesIO(second)).size == (200, 100)
    red = Image.open(io.BytesIO(first)).convert("RGB").getpixel((150, 80))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15  # JPEG: the region's colours, nearly exactly


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_host_that_refuses_before_it_ever_took_an_upload_stops_the_run_naming_url_and_variable(status):
    """A wrong credential (or upload URL) would fail every web image search of the run as "could not be
    published"."""
    bucket, lens = Bucket(status=status), Script()

    async def main():
        async with serve(routes(bucket, lens)) as url:
            with pytest.raises(ProviderRefused) as refused:
                await crop_search(url)(request("[50, 25, 150, 75]"))
            return url, str(refused.value)

    url, message = asyncio.run(main())
    assert message.startswith(f"image_host at {url}/upload/") and "IMAGE_HOST_TOKEN" in message
    assert ("refused the key" in message) == (status != 404) and TOKEN not in message and lens.requests == []


def test_after_an_upload_a_refusal_is_a_failure_observation_without_the_credential_or_a_search():
    bucket, lens = Bucket(), Script()

    async def main():
        async with serve(routes(bucket, lens)) as url:
            lens.responses = [(200, serpapi_lens([("A red block", f"{url}/t1")]))]
            tool = crop_search(url)
            first = await tool(request("[50, 25, 150, 75]"))
            bucket.status = 403  # a token revoked mid-run must not stop it
            return first, await tool(request("[0, 0, 100, 50]")), len(lens.requests)

    first, result, searches = asyncio.run(main())
    assert first.ok and not result.ok and result.text.startswith("[Image Search Results] The search failed")
    assert "could not be published: image_host refused the request (HTTP 403" in result.text
    assert TOKEN not in result.text and searches == 1 and result.cost == 0
    down = asyncio.run(crop_search("http://127.0.0.1:9")(request("[50, 25, 150, 75]")))  # nothing listens
    assert not down.ok and "could not be published: image_host connection failed" in down.text


def test_a_host_without_a_credential_that_refuses_says_none_is_configured():
    bucket, lens = Bucket(status=401), Script()

    async def main():
        async with serve(routes(bucket, lens)) as url:
            host = UploadHost(f"{url}/upload/{{sha256}}.png", f"{url}/public/{{sha256}}.png", format="png", limits=FAST)
            with pytest.raises(ProviderRefused, match="refused the request .*no key is configured"):
                await host(request("[50, 25, 150, 75]"))
            return bucket.puts

    ((_, _, headers),) = asyncio.run(main())
    assert "Authorization" not in headers


def test_upload_host_checks_its_configuration(monkeypatch):
    with pytest.raises(ValueError, match=r"upload_url 'https://b/x.jpg' has no '\{sha256\}'"):
        UploadHost("https://b/x.jpg", "https://p/{sha256}.jpg")
    monkeypatch.delenv("IMAGE_HOST_TOKEN")
    with pytest.raises(ValueError, match="IMAGE_HOST_TOKEN"):
        UploadHost("https://b/{sha256}.jpg", "https://p/{sha256}.jpg", auth_env="IMAGE_HOST_TOKEN")
    assert asyncio.run(UploadHost("https://b/{sha256}", "https://p/{sha256}")(ToolRequest("image_search"))) is None


def test_the_upload_snippet_builds_and_fits_the_paper_cap():
    config = yaml.safe_load((ROOT / "configs" / "tools" / "web_image_search_upload.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--image_search", type=SearchTool)
    init = config["model"]["init_args"]
    built = parser.instantiate(parser.parse_object({"image_search": init["image_search"]})).image_search
    host = built.tool.image_host
    assert isinstance(host, UploadHost) and "{sha256}" in host.public_url and host.format == "jpeg"
    assert [s.name for s in built.tool.stages()] == ["image_host", "serpapi_lens", "thumbnails"]
    built.check_budget(120.0)
