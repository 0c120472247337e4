"""Search APIs: SerpAPI Google Lens (image), SerpAPI Google and Serper (text), parsed into typed records.

Each provider reads its API key from an environment variable named in its config (the key itself never
appears in a config, a log or an error message) and calls its endpoint through an ``HTTPClient``. The
endpoints are init args so tests (and self-hosted proxies) can point them elsewhere. Response formats:
SerpAPI returns ``visual_matches`` (Lens) / ``organic_results`` (Google) and an ``error`` string on failure;
Serper returns ``organic``. An answer of the wrong shape is checked inside the HTTP attempt, so it is retried
like a server error; an ``error`` field is not (a bad key or an empty account does not heal in a second).
A 401/403/404 before the endpoint has ever answered stops the run (``ProviderRefused``, naming ``api_key_env``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mmsr.tools.base import changed_settings
from mmsr.tools.secrets import redact, register_secret_env
from mmsr.tools.web.http import HTTPClient, Limits, Retryable, ToolError, parse_json


def api_key(env_var: str, who: str) -> str:
    """The key from ``env_var`` (registered as a secret); a clear error naming the variable when it is unset."""
    register_secret_env(env_var)
    key = os.environ.get(env_var, "").strip()
    if not key:
        raise ValueError(f"{who} needs an API key in the environment variable {env_var} (unset or empty)")
    return key


@dataclass(frozen=True)
class WebResult:
    """One organic web result."""

    title: str
    url: str
    snippet: str = ""


@dataclass(frozen=True)
class VisualMatch:
    """One reverse-image-search match: the page title, its thumbnail URL and the page URL."""

    title: str
    thumbnail: str
    link: str = ""


class TextSearchProvider(Protocol):
    """A web search API: query -> ranked organic results."""

    name: str
    cost_per_call: float
    client: HTTPClient

    async def search(self, query: str) -> list[WebResult]: ...

    def metrics(self) -> dict[str, float]: ...


def _items(payload: Any, field: str, who: str) -> list[dict[str, Any]]:
    """``payload[field]`` as a list of objects; absent means no results; anything else is a bad response."""
    if not isinstance(payload, dict):
        raise Retryable(f"{who} returned {type(payload).__name__}, not a JSON object", "bad_response")
    error = payload.get("error")
    if error and "hasn't returned any results" in str(error):  # SerpAPI's way of saying "empty"
        return []
    if error:
        raise ToolError(f"{who} error: {redact(str(error))[:200]}", "api_error")  # masked whole, then cut
    items = payload.get(field, [])
    if not isinstance(items, list):
        raise Retryable(f"{who} returned {field!r} as {type(items).__name__}, not a list", "bad_response")
    return [item for item in items if isinstance(item, dict)]


def items_parser(field: str, who: str) -> Callable[[bytes], list[dict[str, Any]]]:
    """A ``parse`` for ``HTTPClient.request``: body -> ``_items``, so a malformed answer is retried."""
    return lambda body: _items(parse_json(body), field, who)


def _web_results(items: list[dict[str, Any]]) -> list[WebResult]:
    """Results with a link and a title, redacted: a key the API echoed must not travel on to the page reader."""
    out = []
    for item in items:
        url, title = item.get("link"), item.get("title")
        if isinstance(url, str) and url and isinstance(title, str):
            out.append(WebResult(redact(title), redact(url), redact(str(item.get("snippet") or ""))))
    return out


class SerpAPIGoogle:
    """Google web search through SerpAPI (``engine=google``; GET, key as ``api_key`` parameter).

    Args:
        endpoint: the search URL.
        api_key_env: environment variable holding the key.
        num: results requested (the pipeline walks down them when pages fail).
        hl, gl: interface language and country.
        limits: timeouts, retries, concurrency, rate and breaker.
        cost_per_call: dollars per search (about $0.015 on SerpAPI's plans; spec §11 #8), for budgets.
    """

    def __init__(self, endpoint: str = "https://serpapi.com/search.json", api_key_env: str = "SERPAPI_API_KEY",
                 num: int = 10, hl: str = "en", gl: str = "us", limits: Limits = Limits(),
                 cost_per_call: float = 0.015) -> None:  # fmt: skip
        self.endpoint, self.api_key_env, self.num, self.hl, self.gl = endpoint, api_key_env, num, hl, gl
        self._key = api_key(api_key_env, "SerpAPIGoogle")
        self.name, self.cost_per_call = "serpapi_google", cost_per_call
        self.client = HTTPClient(self.name, limits)

    async def search(self, query: str) -> list[WebResult]:
        params = {
            "engine": "google",
            "q": query,
            "num": str(self.num),
            "hl": self.hl,
            "gl": self.gl,
            "api_key": self._key,
        }
        parse = items_parser("organic_results", "SerpAPI")
        items = await self.client.request_endpoint("GET", self.endpoint, self.api_key_env, params=params, parse=parse)
        return _web_results(items)

    def cache_settings(self) -> dict[str, Any]:
        """What it asks for that shapes its results, where not the default (``mmsr.tools.cache.settings_version``)."""
        return changed_settings(self, num=self.num, hl=self.hl, gl=self.gl)

    def metrics(self) -> dict[str, float]:
        return self.client.metrics()


class Serper:
    """Google web search through Serper (POST JSON ``{"q", "num"}``, key in the ``X-API-KEY`` header).

    Args: as ``SerpAPIGoogle`` (``cost_per_call`` about $0.001).
    """

    def __init__(self, endpoint: str = "https://google.serper.dev/search", api_key_env: str = "SERPER_API_KEY",
                 num: int = 10, hl: str = "en", gl: str = "us", limits: Limits = Limits(),
                 cost_per_call: float = 0.001) -> None:  # fmt: skip
        self.endpoint, self.api_key_env, self.num, self.hl, self.gl = endpoint, api_key_env, num, hl, gl
        self._key = api_key(api_key_env, "Serper")
        self.name, self.cost_per_call = "serper", cost_per_call
        self.client = HTTPClient(self.name, limits)

    async def search(self, query: str) -> list[WebResult]:
        body = {"q": query, "num": self.num, "hl": self.hl, "gl": self.gl}
        headers = {"X-API-KEY": self._key}
        parse = items_parser("organic", "Serper")
        items = await self.client.request_endpoint("POST", self.endpoint, self.api_key_env, json=body,
                                                   headers=headers, parse=parse)  # fmt: skip
        return _web_results(items)

    def cache_settings(self) -> dict[str, Any]:
        """As ``SerpAPIGoogle.cache_settings``."""
        return changed_settings(self, num=self.num, hl=self.hl, gl=self.gl)

    def metrics(self) -> dict[str, float]:
        return self.client.metrics()


class SerpAPILens:
    """Reverse image search through SerpAPI Google Lens (``engine=google_lens``, the image as a public ``url``).

    Args:
        endpoint, api_key_env, hl, limits, cost_per_call: as ``SerpAPIGoogle``.
        country: Lens country code.
    """

    def __init__(self, endpoint: str = "https://serpapi.com/search.json", api_key_env: str = "SERPAPI_API_KEY",
                 hl: str = "en", country: str = "us", limits: Limits = Limits(),
                 cost_per_call: float = 0.015) -> None:  # fmt: skip
        self.endpoint, self.api_key_env, self.hl, self.country = endpoint, api_key_env, hl, country
        self._key = api_key(api_key_env, "SerpAPILens")
        self.name, self.cost_per_call = "serpapi_lens", cost_per_call
        self.client = HTTPClient(self.name, limits)

    async def search(self, image_url: str) -> list[VisualMatch]:
        params = {
            "engine": "google_lens",
            "url": image_url,
            "hl": self.hl,
            "country": self.country,
            "api_key": self._key,
        }
        parse = items_parser("visual_matches", "SerpAPI Lens")
        out = []
        for item in await self.client.request_endpoint("GET", self.endpoint, self.api_key_env, params=params,
                                                       parse=parse):  # fmt: skip
            title, thumbnail = item.get("title"), item.get("thumbnail")
            if isinstance(title, str) and title.strip() and isinstance(thumbnail, str) and thumbnail:
                out.append(VisualMatch(redact(title), redact(thumbnail), redact(str(item.get("link") or ""))))
        return out

    def cache_settings(self) -> dict[str, Any]:
        """As ``SerpAPIGoogle.cache_settings``."""
        return changed_settings(self, hl=self.hl, country=self.country)

    def metrics(self) -> dict[str, float]:
        return self.client.metrics()
