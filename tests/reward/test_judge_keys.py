"""The judge's API key: stripped, a refusal before the first reply stops the run, a reply quoting it is masked."""

from __future__ import annotations

import pytest
from aiohttp import web

from mmsr.reward.judge import JudgeInput, JudgeRefused, OpenAIJudge
from mmsr.reward.judged import JudgedReward
from tests.eval.test_judge import FakeOpenAI
from tests.reward.test_mmsearch_r1 import _sample, _trajectory

KEY_ENV = "MMSR_TEST_JUDGE_KEY"
KEY = "sk-judge-0123456789abcdefXYZ"
ITEM = JudgeInput("Who?", "Jinnah", (), "Muhammad Ali Jinnah")
ANSWERED = _trajectory("<reason>r</reason><answer>It was Gustave Eiffel, the engineer</answer>")


class KeyedOpenAI(FakeOpenAI):
    """FakeOpenAI that answers ``status`` (401 by default), quoting the key it got, unless it got ``Bearer KEY``;
    a reply it gives quotes the Authorization header when the response asks it to ("echo"); with ``key_at`` set,
    every request fails, its body quoting the key."""

    def __init__(self, script=None, status: int = 401):
        super().__init__(script)
        self.status = status
        self.key_at: int | None = None  # set: answer 503 with the key it got at this character of the body

    async def chat(self, request):
        auth = request.headers.get("Authorization")
        if self.key_at is not None:
            self.bodies.append(await request.json())
            return web.Response(status=503, text="x" * self.key_at + auth.removeprefix("Bearer "))
        if auth != f"Bearer {KEY}":
            self.bodies.append(await request.json())
            return web.json_response({"error": {"message": f"Incorrect API key provided: {auth}"}}, status=self.status)
        if "echo" in (await request.text()):
            self.bodies.append(await request.json())
            return web.json_response({"choices": [{"message": {"content": f"you sent {auth} <judge>Yes</judge>"}}]})
        return await super().chat(request)


def _judge(server: FakeOpenAI, **kw) -> OpenAIJudge:
    return OpenAIJudge(f"http://127.0.0.1:{server.port}/v1", "judge-model", api_key_env=KEY_ENV, timeout_s=10, **kw)


def test_a_key_read_from_a_file_with_its_newline_is_stripped(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY + "\n")
    with KeyedOpenAI() as server:
        verdicts = _judge(server, retries=0).judge([ITEM])
    assert [v.correct for v in verdicts] == [True] and server.auth == [f"Bearer {KEY}"]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_refusal_before_the_first_reply_stops_unretried_naming_url_status_and_variable(monkeypatch, status):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-0123456789abcdef")
    with KeyedOpenAI(status=status) as server:
        with pytest.raises(JudgeRefused) as caught:
            _judge(server, retries=2).judge([ITEM])
        requests, url = len(server.bodies), f"http://127.0.0.1:{server.port}/v1/chat/completions"
    message = str(caught.value)
    assert requests == 1  # not retried: every attempt would be refused the same way
    assert url in message and f"HTTP {status}" in message and KEY_ENV in message and "\n" not in message
    assert "sk-wrong-0123456789abcdef" not in message and "0123456789abcdef" not in message


def test_the_judged_reward_stops_on_a_refused_key_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-0123456789abcdef")
    with KeyedOpenAI() as server:
        with pytest.raises(JudgeRefused, match=KEY_ENV):
            JudgedReward(_judge(server, retries=0)).batch([ANSWERED], [_sample()])
        reward = JudgedReward(_judge(server, retries=0))
        reward.submit(ANSWERED, _sample())  # the background worker's request: ``batch`` raises its refusal
        with pytest.raises(JudgeRefused, match="HTTP 401"):
            reward.batch([ANSWERED], [_sample()])


def test_after_a_first_reply_a_refusal_is_a_failed_request_retried(monkeypatch):
    """A key revoked or a proxy's hiccup mid-run must not stop a long run: the judge has shown it works."""
    monkeypatch.setenv(KEY_ENV, KEY)
    with KeyedOpenAI({"revoked": 401}) as server:
        judge = _judge(server, retries=1)
        first = judge.judge([ITEM])
        later = judge.judge([JudgeInput("Who?", "Jinnah", (), "revoked Jinnah")])
    assert [v.correct for v in first] == [True] and later[0].correct is None
    assert "HTTP 401" in later[0].reply and "2 attempts" in later[0].reply and len(server.bodies) == 3


def test_a_reply_quoting_the_key_is_masked(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with KeyedOpenAI() as server:
        verdict = _judge(server, retries=0).judge([JudgeInput("Who?", "Jinnah", (), "echo Jinnah")])[0]
    assert verdict.correct is True and KEY not in verdict.reply and f"[redacted {KEY_ENV}]" in verdict.reply


def test_a_failure_cut_inside_the_quoted_key_keeps_none_of_it(monkeypatch):
    """The failed request's body is masked whole, then cut to 200 characters: a cut keeping fewer than
    ``PARTIAL_CHARS`` of the key's characters would leave them unrecognizable to the masker."""
    monkeypatch.setenv(KEY_ENV, KEY)
    replies = []
    with KeyedOpenAI() as server:
        for at in range(200 - 11, 200 - 2):  # the cut keeps 11 down to 3 of the key's characters
            server.key_at = at
            replies.append(_judge(server, retries=0).judge([ITEM])[0].reply)
    for reply in replies:
        assert "HTTP 503: xxx" in reply and "x" + KEY[:3] not in reply, f"the key's head leaked: {reply[-40:]!r}"
