"""Evaluation sets whose images are URLs load with a download fetcher: images come from a local HTTP server
(with retries on a flaky one), once per cache file; a dead or oversized URL is a ``DataError`` naming the
row, field and URL; without a fetcher URLs are refused, as before."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from jsonargparse import ArgumentParser

from mmsr.data.benchmarks import MMSearch
from mmsr.data.columns import ColumnMapping, DataError, EvalSet
from mmsr.tools.web.download import ImageDownloader
from mmsr.tools.web.fake import png
from mmsr.tools.web.http import Limits

from .fake_web import broken_png

FAST = Limits(timeout_s=2.0, retries=2, backoff_s=0.01, backoff_max_s=0.02, breaker_failures=0)


class Images(BaseHTTPRequestHandler):
    """``/red.png``, ``/big.png`` (60x40); ``/flaky.png`` answers 503 once, then the image; anything else 404."""

    hits: Counter = Counter()

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        self.hits[self.path] += 1
        files = {"/red.png": png("red", (6, 4)), "/big.png": png("blue", (60, 40)), "/flaky.png": png("green", (6, 4)),
                 "/broken.png": broken_png()}  # fmt: skip
        if self.path not in files or (self.path == "/flaky.png" and self.hits[self.path] == 1):
            self.send_response(404 if self.path not in files else 503)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(files[self.path])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    Images.hits = Counter()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def rows_file(tmp_path, urls):
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"q": f"q{i}?", "a": "x", "pic": u}) + "\n" for i, u in enumerate(urls)))
    return str(path)


def loader(path, cache, **kw):
    downloader = ImageDownloader(cache=str(cache), limits=FAST, allow_private=True, **kw)
    return ColumnMapping(path, question="q", answer="a", image="pic", download=downloader)


def test_url_images_are_downloaded_once_per_cache_file(server, tmp_path):
    urls = [f"{server}/red.png", f"{server}/flaky.png", f"{server}/red.png"]
    samples = loader(rows_file(tmp_path, urls), tmp_path / "images.sqlite").load()
    assert [s.image.getpixel((0, 0)) for s in samples] == [(255, 0, 0), (0, 128, 0), (255, 0, 0)]
    assert [s.image_url for s in samples] == urls and samples[0].image.size == (6, 4)
    assert Images.hits == {"/red.png": 1, "/flaky.png": 2}  # the same URL once; the 503 retried
    again = loader(rows_file(tmp_path, urls), tmp_path / "images.sqlite")
    assert [s.image.tobytes() for s in again.load()] == [s.image.tobytes() for s in samples]
    assert Images.hits == {"/red.png": 1, "/flaky.png": 2}  # all from the cache
    assert again.download.metrics()["data/image_download/cached"] == 2


def test_a_dead_or_oversized_url_names_the_row_field_and_url(server, tmp_path):
    path = rows_file(tmp_path, [f"{server}/red.png", f"{server}/gone.png", f"{server}/big.png"])
    mapping = loader(path, tmp_path / "images.sqlite", max_pixels=1000)
    gone = rf"set.jsonl: row 1, field 'pic': download of {server}/gone.png failed: image_download refused the request \(HTTP 404\)"
    with pytest.raises(DataError, match=gone):
        mapping.load()
    mapping.skip_invalid = True
    with pytest.warns(UserWarning, match="skipped 2 invalid rows"):
        (kept,) = mapping.load()
    assert kept.image_url == f"{server}/red.png" and Images.hits["/gone.png"] == 2  # 404 is not retried
    big = loader(rows_file(tmp_path, [f"{server}/big.png"]), tmp_path / "other.sqlite", max_pixels=1000)
    with pytest.raises(DataError, match=rf"row 0, field 'pic': download of {server}/big.png failed: the image is 60x40, over 1000"):
        big.load()


def test_a_malformed_url_or_a_corrupt_image_is_that_urls_error_not_an_exception(server, tmp_path):
    # ImageFetcher's promise: a failed URL is a Fetched with its error; the good images still come back, cached.
    downloader = ImageDownloader(cache=str(tmp_path / "images.sqlite"), limits=FAST, allow_private=True)
    urls = [f"{server}/red.png", "http://[::1/x.png", f"{server}/broken.png"]
    out = downloader.fetch(urls)
    assert out[urls[0]].image is not None and out[urls[0]].error == ""
    assert out[urls[1]].image is None and "the URL is malformed" in out[urls[1]].error
    assert out[urls[2]].image is None and "not a readable image (SyntaxError)" in out[urls[2]].error
    assert downloader.fetch(urls[:1])[urls[0]].image is not None and Images.hits["/red.png"] == 1  # it was cached


def test_without_a_fetcher_urls_are_refused(tmp_path):
    mapping = ColumnMapping(rows_file(tmp_path, ["https://example.com/y.png"]), question="q", answer="a", image="pic")
    with pytest.raises(DataError, match=r"row 0, field 'pic': is a URL \(https://example.com/y.png\); give the loader"):
        mapping.load()


def test_a_suite_entry_builds_a_loader_with_a_downloader(tmp_path):
    parser = ArgumentParser()
    parser.add_argument("--set", type=EvalSet)
    download = {"class_path": "mmsr.tools.web.download.ImageDownloader", "init_args": {"cache": str(tmp_path / "c.sqlite")}}
    entry = {"class_path": "mmsr.data.benchmarks.MMSearch", "init_args": {"path": "end2end.parquet", "download": download}}
    built = parser.instantiate(parser.parse_object({"set": entry})).set
    assert isinstance(built, MMSearch) and isinstance(built.download, ImageDownloader)
    assert built.download.cache_path == str(tmp_path / "c.sqlite") and not (tmp_path / "c.sqlite").exists()
