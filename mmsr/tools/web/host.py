"""Publishing an image for web image search: Lens fetches the picture it searches from a public URL, and a
cropped region (``CropSearch``), or a row without ``image_url``, has none until it is uploaded somewhere.

``UploadHost`` PUTs the image's encoded bytes to an upload URL and hands Lens the object's public URL. The
object is named by the SHA-256 of its bytes (``{sha256}`` in both templates): the same picture is one object
whoever asks, a repeated upload writes the same bytes under the same name (so retries are safe), and a URL
once published is remembered, so a region is uploaded once per process (concurrent requests for the same
bytes share one upload). The upload runs through an ``HTTPClient`` (timeouts, retries, a byte cap on the
answer), against the search call's deadline; a failed upload is a ``ToolError`` that ``WebImageSearch``
turns into a failure observation. One exception: a 401/403 (the credential) or 404 (the upload URL) before the
host has ever taken an upload in this process stops the run (``ProviderRefused``, naming the URL and
``auth_env``, never the credential), as a search provider's does: every web image search would fail.

Endpoints: anything that stores the body of a plain ``PUT`` under the URL's path, authorised by one fixed
header: a bucket behind a bearer token (Google Cloud Storage's XML API takes ``Authorization: Bearer
<OAuth token>``), a WebDAV or nginx ``dav_methods PUT`` location, a small upload proxy in front of S3. Not
supported: schemes that sign each request or each object (S3 SigV4, presigned URLs minted per object), since
the URL here comes from a template; put a proxy that signs in front of those.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import weakref
from collections import Counter
from typing import Literal

from PIL import Image

from mmsr.tools.base import ToolRequest
from mmsr.tools.budget import Stage
from mmsr.tools.web.http import HTTPClient, Limits
from mmsr.tools.web.providers import api_key

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


def encode(image: Image.Image, format: Literal["jpeg", "png"], quality: int = 90) -> bytes:
    """The RGB image as JPEG (``quality``) or PNG bytes."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=format.upper(), quality=quality)
    return buffer.getvalue()


class UploadHost:
    """``ImageHost`` that uploads ``request.image`` (module docstring) and returns its public URL.

    Args:
        upload_url: where the bytes are PUT, with ``{sha256}``, e.g.
            ``https://storage.googleapis.com/my-bucket/crops/{sha256}.jpg``.
        public_url: the address Lens fetches the same object from, with ``{sha256}``, e.g.
            ``https://my-bucket.example-cdn.net/crops/{sha256}.jpg``.
        format: ``jpeg`` (smaller uploads) or ``png`` (the pixels exactly).
        quality: JPEG quality.
        auth_env: environment variable whose value is sent in ``auth_header`` after ``auth_prefix``; read
            once here (unset: a clear error now, not failed searches later) and registered as a secret, so
            it is redacted from errors, logs and observations. ``None``: no auth header.
        auth_header, auth_prefix: how the credential is sent (default ``Authorization: Bearer <value>``).
        headers: other fixed headers (no secrets here: configs are logged).
        limits: timeouts, retries and concurrency of the uploads.
    """

    def __init__(self, upload_url: str, public_url: str, format: Literal["jpeg", "png"] = "jpeg", quality: int = 90,
                 auth_env: str | None = None, auth_header: str = "Authorization", auth_prefix: str = "Bearer ",
                 headers: dict[str, str] | None = None,
                 limits: Limits = Limits(timeout_s=15.0, retries=2, concurrency=8, breaker_failures=5,
                                         max_bytes=100_000)) -> None:  # fmt: skip
        for name, template in (("upload_url", upload_url), ("public_url", public_url)):
            if "{sha256}" not in template:
                raise ValueError(f"UploadHost {name} {template!r} has no '{{sha256}}'")
        if format not in CONTENT_TYPES:
            raise ValueError(f"UploadHost format must be one of {sorted(CONTENT_TYPES)}, got {format!r}")
        self.upload_url, self.public_url, self.format, self.quality = upload_url, public_url, format, quality
        self.auth_env = auth_env
        self._headers = {"Content-Type": CONTENT_TYPES[format], **(headers or {})}
        if auth_env is not None:
            self._headers[auth_header] = auth_prefix + api_key(auth_env, "UploadHost")
        self.client = HTTPClient("image_host", limits)
        self.published: dict[str, str] = {}  # sha256 of the bytes -> public URL
        self._pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> {sha256: task}
        self.counts: Counter[str] = Counter()

    def stages(self) -> list[Stage]:
        """The upload, a stage of the search call's time budget (``mmsr.tools.budget``)."""
        return [Stage("image_host", self.client.limits)]

    async def __call__(self, request: ToolRequest) -> str | None:
        """The public URL of ``request.image`` (``None`` without an image); ``ToolError`` if the upload fails,
        ``ProviderRefused`` if the host refuses before it ever took one (module docstring)."""
        if request.image is None:
            return None
        data = await asyncio.to_thread(encode, request.image, self.format, self.quality)
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.published:
            self.counts["reused"] += 1
            return self.published[digest]
        return await asyncio.shield(self._shared_upload(digest, data))

    def _shared_upload(self, digest: str, data: bytes) -> asyncio.Task:
        """The upload of ``digest`` in flight on this event loop, started if none is (tasks die with their loop,
        and the rollout runs each step in a fresh one)."""
        pending = self._pending.setdefault(asyncio.get_running_loop(), {})
        if digest not in pending:
            task = asyncio.ensure_future(self._upload(digest, data))
            task.add_done_callback(lambda t: (pending.pop(digest, None), t.cancelled() or t.exception()))
            pending[digest] = task
        else:
            self.counts["joined"] += 1
        return pending[digest]

    async def _upload(self, digest: str, data: bytes) -> str:
        url = self.upload_url.replace("{sha256}", digest)
        await self.client.request_endpoint("PUT", url, self.auth_env, data=data, headers=self._headers,
                                           parse=lambda _body: None)  # fmt: skip
        self.counts["uploaded"] += 1
        self.published[digest] = self.public_url.replace("{sha256}", digest)
        return self.published[digest]

    def metrics(self) -> dict[str, float]:
        """Uploads, reused and joined URLs, and the upload client's outcomes."""
        own = {f"tools/image_host/{k}": float(v) for k, v in sorted(self.counts.items())}
        return own | self.client.metrics()
