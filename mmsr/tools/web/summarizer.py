"""Question-focused page summaries from any OpenAI-compatible chat endpoint (a vLLM server, a hosted API).

MMSearch-R1 summarizes each page into at most 5 sentences, making sure whatever helps answer the question is
kept, from the page's first 30,000 characters (spec §5, paper Table 4); the prompts below say the same in
our words. The raw page would not fit a training context (spec §6: a raw-reader turn reached 20k tokens).
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

from mmsr.tools.base import changed_settings
from mmsr.tools.secrets import register_secret_env
from mmsr.tools.web.http import HTTPClient, Limits, Retryable, ToolError, parse_json

SYSTEM_PROMPT = (
    "You summarize web pages. Write a summary of at most {max_sentences} sentences that covers the main "
    "points of the page."
)
USER_PROMPT = (
    "Question: {question}\n\nSummarize the web page below. Make sure that everything on the page that helps "
    "answer the question is in your summary.\n\nWeb page:\n{page}"
)

_FIELDS = re.compile(r"\{question\}|\{page\}")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_OWN_FIELDS = ("model", "messages", "max_tokens", "temperature")  # set by the summarizer's own arguments


class Completion(NamedTuple):
    """What the summarizer reads of a chat completion: ``choices[0]``'s ``message.content`` and
    ``finish_reason`` (``"length"``: cut by ``max_tokens``), and ``usage``."""

    content: Any
    usage: Any
    finish_reason: Any


def completion(body: bytes) -> Completion:
    """The ``Completion`` of a chat completion's body; a ``parse`` for ``HTTPClient``, so an answer without
    ``choices[0].message.content`` (an overloaded server's error page or empty ``choices``) is retried."""
    payload = parse_json(body)
    try:
        choice = payload["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise Retryable("the summarizer's answer has no choices[0].message.content", "bad_response") from None
    return Completion(content, payload.get("usage"), choice.get("finish_reason"))


def strip_thinking(content: str) -> str:
    """``content`` without the reasoning a model served without a reasoning parser writes in it: closed
    ``<think>...</think>`` blocks, reasoning up to a lone ``</think>`` (a chat template that opens the block in
    the prompt) and a block that ``max_tokens`` cut before its ``</think>``."""
    content = _THINK.sub("", content).rsplit("</think>", 1)[-1]
    return content.split("<think>", 1)[0]


class OpenAISummarizer:
    """POST ``{base_url}/chat/completions``; the summary is ``choices[0].message.content``.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (vLLM) or ``https://api.openai.com/v1``.
        model: the served model name (the paper used Qwen3-32B).
        api_key_env: environment variable with the bearer key; unset sends no key (local servers).
        max_chars: the page is cut to this many characters before summarizing.
        max_sentences: the summary's length limit, stated in the prompt.
        max_tokens: most tokens the summary may take.
        temperature: sampling temperature (0: the same page gives the same summary).
        system_prompt, user_prompt: templates (``{max_sentences}``; ``{question}`` and ``{page}``).
        limits: timeouts, retries, concurrency, rate and breaker.
        cost_per_million_tokens: dollars per million prompt + completion tokens (``usage``), for budgets.
        extra_body: more fields of the request body, for the server, e.g. ``{"chat_template_kwargs":
            {"enable_thinking": False}}`` so that vLLM's Qwen3 answers without thinking first (its thinking
            would take the ``max_tokens`` the summary needs).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_chars: int = 30_000,
                 max_sentences: int = 5, max_tokens: int = 512, temperature: float = 0.0,
                 system_prompt: str = SYSTEM_PROMPT, user_prompt: str = USER_PROMPT,
                 limits: Limits = Limits(timeout_s=60.0, retries=3, concurrency=32),
                 cost_per_million_tokens: float = 0.0, extra_body: dict[str, Any] | None = None) -> None:  # fmt: skip
        if "{question}" not in user_prompt or "{page}" not in user_prompt:
            raise ValueError("user_prompt must contain '{question}' and '{page}'")
        if own := sorted(set(extra_body or {}) & set(_OWN_FIELDS)):
            raise ValueError(f"extra_body sets {own}: set them with the summarizer's own arguments")
        self.extra_body = dict(extra_body or {})
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.max_chars, self.max_tokens = model, api_key_env, max_chars, max_tokens
        self.temperature, self.cost_per_million_tokens = temperature, cost_per_million_tokens
        self.system = system_prompt.replace("{max_sentences}", str(max_sentences))
        self.max_sentences, self.system_prompt, self.user_prompt = max_sentences, system_prompt, user_prompt
        self.name = "summarizer"
        self.client = HTTPClient(self.name, limits)
        register_secret_env(api_key_env)

    def cache_settings(self) -> dict[str, Any]:
        """What shapes its summaries, where not the default (``mmsr.tools.cache.settings_version``); the model is in
        the cache's provider name already, and ``base_url`` says where it is served, not what it writes."""
        return changed_settings(self, max_chars=self.max_chars, max_sentences=self.max_sentences,
                                max_tokens=self.max_tokens, temperature=self.temperature,
                                system_prompt=self.system_prompt, user_prompt=self.user_prompt,
                                extra_body=self.extra_body)  # fmt: skip

    def _body(self, page: str, question: str) -> dict:
        # One pass: a question (or the model's query in it) that contains "{page}" must stay text, not paste
        # the page in a second time.
        fields = {"{question}": question, "{page}": page[: self.max_chars]}
        user = _FIELDS.sub(lambda m: fields[m.group(0)], self.user_prompt)
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
        return {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            **self.extra_body,
        }

    async def summarize(self, page: str, question: str) -> tuple[str, float]:
        """(summary, cost in dollars); ``ToolError`` on failure or an empty answer, carrying the cost of the
        tokens an unusable answer still used (``ToolError.cost``); ``ProviderRefused`` for a 401/403/404 before
        the server ever answered (a wrong key, ``base_url`` or ``model``)."""
        headers = {}
        if key := os.environ.get(self.api_key_env, "").strip():
            headers["Authorization"] = f"Bearer {key}"
        body = self._body(page, question)
        content, usage, finish_reason = await self.client.request_endpoint(
            "POST", self.url, self.api_key_env, json=body, headers=headers, parse=completion
        )
        cost = self._cost(usage)
        if isinstance(content, str):
            content = strip_thinking(content)
        if finish_reason == "length" and not (isinstance(content, str) and content.strip()):
            raise ToolError(f"the summarizer reached max_tokens={self.max_tokens} before writing a summary "
                            "(still thinking? raise max_tokens or turn thinking off with extra_body)",
                            "summary_cut", cost=cost)  # fmt: skip
        if not isinstance(content, str) or not content.strip():
            raise ToolError("the summarizer returned an empty summary", "empty_summary", cost=cost)
        return content.strip(), cost

    def _cost(self, usage: Any) -> float:
        """Dollars of a completion's ``usage.total_tokens`` (0 when the server sent no usable count)."""
        usage = usage if isinstance(usage, dict) else {}
        tokens = usage.get("total_tokens", 0)
        # a negative count gives a cost no ToolResult takes, a huge one an OverflowError: either failed the search
        usable = isinstance(tokens, int) and 0 <= tokens < 2**53
        return (tokens if usable else 0) * self.cost_per_million_tokens / 1e6

    def metrics(self) -> dict[str, float]:
        return self.client.metrics()
