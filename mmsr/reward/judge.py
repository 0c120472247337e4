"""LLM-as-judge correctness through any OpenAI-compatible ``/chat/completions`` endpoint (spec §5, §9):
the evaluation's accuracy (``mmsr eval --judge-url``) and a training reward's (``mmsr.reward.judged``).

The rules are the paper's (Table 7), in our own words, in ``prompt/templates/judge_system.txt``. The
paper's judge is GPT-4o with temperature 0 and top_p 0.1, the defaults here. The verdict is the last
``<judge>Yes|No</judge>`` in the reply; a reply without one, or a request that keeps failing, gives
``None`` (the evaluation counts it wrong and reports it as unparsed). The API key is read from an
environment variable (stripped: a key read from a file ends in a newline), sent only as the ``Authorization``
header and never logged or written out; a reply quoting it is masked (``redact``).

A 401/403 (the key) or 404 (the URL or model name) before the judge has ever replied in this process stops the
run (``JudgeRefused``, naming the URL, the status and the key's variable), unretried: every request would fail
the same way, and the run would go on without a judge. On several ranks every rank stops, those that asked nothing
too (``GRPOModule.agreed_scores``). Once it has replied, those statuses are failed requests
like any other (retried, then ``None``), as are timeouts, 5xx and connection errors at any time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from yarl import URL

from mmsr.prompt.render import TEMPLATES
from mmsr.tools.secrets import redact, register_secret_env

_VERDICT = re.compile(r"<judge>\s*(yes|no)\s*</judge>", re.IGNORECASE)
REQUEST_FAILED = "judge request failed"  # how a verdict's reply starts when no reply came
REFUSALS = (401, 403, 404)  # the key (401/403) or the URL / model name (404) is wrong


class JudgeRefused(RuntimeError):
    """The judge's endpoint refused its key (401/403) or was not found (404) before it had ever replied in this
    process: the key, the URL or the model name is wrong (module docstring)."""


def refusal_in(error: BaseException) -> JudgeRefused | None:
    """The ``JudgeRefused`` in ``error``'s chain (``error`` itself, or what it was raised from or while handling:
    ``mmsr.reward.base.scored`` wraps a reward's error in a ``RewardError``), None where there is none."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, JudgeRefused):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def request_failed(reply: str | None) -> bool:
    """The judge never replied (the endpoint was down, every retry failed): asking again may give a verdict."""
    return reply is not None and reply.startswith(REQUEST_FAILED)


@dataclass(frozen=True)
class JudgeInput:
    question: str
    ground_truth: str
    candidate_answers: tuple[str, ...]
    response: str


@dataclass(frozen=True)
class Verdict:
    """``correct``: the judge's Yes/No, ``None`` if there was none; ``reply``: its text or the error."""

    correct: bool | None
    reply: str


def parse_verdict(reply: str) -> bool | None:
    """The last ``<judge>Yes</judge>`` / ``<judge>No</judge>`` (any case, spaces allowed), else None."""
    found = _VERDICT.findall(reply)
    return found[-1].lower() == "yes" if found else None


class OpenAIJudge:
    """Judges answers with a chat model behind an OpenAI-compatible API.

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the judge model name (paper: ``gpt-4o-2024-11-20``).
        api_key_env: environment variable holding the API key (unset: no ``Authorization`` header).
        temperature, top_p, max_tokens: judge sampling.
        concurrency: most requests in flight.
        timeout_s: per-request timeout.
        retries: extra attempts after a failed request (HTTP error, timeout, bad JSON).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0,
                 top_p: float = 0.1, max_tokens: int = 256, concurrency: int = 8, timeout_s: float = 60.0,
                 retries: int = 2) -> None:  # fmt: skip
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        register_secret_env(api_key_env)  # an error body quoting the key must not reach eval outputs
        self.params = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        self.concurrency, self.timeout_s, self.retries = concurrency, timeout_s, retries
        self.system = (TEMPLATES / "judge_system.txt").read_text(encoding="utf-8").strip()
        self.user = (TEMPLATES / "judge_user.txt").read_text(encoding="utf-8").strip()
        self.answered = False  # it has replied once in this process: a 401/403/404 is then a failed request

    def messages(self, item: JudgeInput) -> list[dict[str, str]]:
        candidates = ", ".join(item.candidate_answers) or "(none)"
        user = self.user.format(question=item.question, ground_truth=item.ground_truth, candidates=candidates,
                                response=item.response)  # fmt: skip
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def judge(self, items: Sequence[JudgeInput]) -> list[Verdict]:
        return asyncio.run(self.ajudge(items))

    async def ajudge(self, items: Sequence[JudgeInput]) -> list[Verdict]:
        semaphore = asyncio.Semaphore(self.concurrency)
        async with self.session() as session:
            return list(await asyncio.gather(*(self.ajudge_one(session, semaphore, item) for item in items)))

    def session(self) -> aiohttp.ClientSession:
        """An HTTP session with the key's header and the timeout; made inside the event loop that uses it,
        and shared by its requests so they reuse connections (``JudgedReward`` keeps one open)."""
        key = os.environ.get(self.api_key_env, "").strip()  # a trailing newline is an invalid header value
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def ajudge_one(self, session: aiohttp.ClientSession, semaphore: asyncio.Semaphore,
                         item: JudgeInput) -> Verdict:  # fmt: skip
        """One item's verdict, retried; ``semaphore`` caps the requests in flight across its callers."""
        body = {"model": self.model, "messages": self.messages(item), **self.params}
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
            try:
                async with semaphore, session.post(self.url, json=body) as resp:
                    text = await resp.text()
                    if resp.status in REFUSALS and not self.answered:
                        raise JudgeRefused(self.refusal(resp.status, text))
                    if resp.status != 200:
                        error = f"HTTP {resp.status}: {redact(text)[:200]}"  # masked whole, then cut
                        continue
                    reply = json.loads(text)["choices"][0]["message"]["content"] or ""
                self.answered = True
                return Verdict(parse_verdict(reply), redact(reply))
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, TypeError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        return Verdict(None, redact(f"{REQUEST_FAILED} after {self.retries + 1} attempts ({error})"))

    def refusal(self, status: int, body: str) -> str:
        """``JudgeRefused``'s one line: the URL (without user info or query, where keys go), the status, the
        server's words (redacted, on one line) and the key's variable, whether set, never its value."""
        url = redact(str(URL(self.url).with_user(None).with_query(None).with_fragment(None)))
        detail = redact(" ".join(body.split()))[:200]  # masked whole: a cut could leave a key's head unmasked
        sent = "set" if os.environ.get(self.api_key_env, "").strip() else "unset, so no key was sent"
        where = f"the environment variable {self.api_key_env} ({sent})"
        fix = f"the URL and the model name; its key is in {where}" if status == 404 else f"the key in {where}"
        return (f"the judge at {url} answered HTTP {status} ({detail}) before it had ever replied: check {fix}. "
                "Every request would fail the same way.")
