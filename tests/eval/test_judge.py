"""The LLM judge against a local OpenAI-compatible server on 127.0.0.1 (no internet)."""

import asyncio
import threading

import pytest
import yaml
from aiohttp import web

from mmsr.reward.judge import JudgeInput, OpenAIJudge, parse_verdict
from tests.conftest import FVQA


class FakeOpenAI:
    """``POST /v1/chat/completions``: Yes when the ground truth occurs in the response, else No.

    ``script`` replaces the reply for responses containing a key: an HTTP status (int) or a text.
    """

    def __init__(self, script=None):
        self.script, self.bodies, self.auth, self.peers = script or {}, [], [], []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

    async def chat(self, request):
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        self.peers.append(request.transport.get_extra_info("peername"))  # the client's connection
        user = body["messages"][1]["content"]
        truth = user.split("Ground truth: ")[1].split("\n")[0]
        response = user.split("Model response: ")[1]
        for key, reply in self.script.items():
            if key in response:
                if isinstance(reply, int):
                    return web.Response(status=reply, text="overloaded")
                return web.json_response({"choices": [{"message": {"content": reply}}]})
        verdict = "Yes" if truth.lower() in response.lower() else "No"
        return web.json_response({"choices": [{"message": {"content": f"<judge>{verdict}</judge> <reason>x</reason>"}}]})

    def __enter__(self):
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)

        def serve():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            self.ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_verdict_parsing():
    assert parse_verdict("<judge>Yes</judge><reason>r</reason>") is True
    assert parse_verdict("<judge> no </judge>") is False
    assert parse_verdict("<judge>Yes</judge> then <judge>No</judge>") is False  # the last verdict counts
    assert parse_verdict("Yes") is None and parse_verdict("<judge>maybe</judge>") is None


def test_judge_over_loopback(monkeypatch):
    monkeypatch.setenv("MMSR_TEST_JUDGE_KEY", "sk-test-123")
    items = [JudgeInput("Who?", "Jinnah", ("Quaid",), "Muhammad Ali Jinnah"),
             JudgeInput("Where?", "Paris", (), "Lyon"),
             JudgeInput("What?", "Beer", (), "garbled reply please"),
             JudgeInput("When?", "1900", (), "always 503")]  # fmt: skip
    script = {"garbled": "I think so", "always 503": 503}
    with FakeOpenAI(script) as server:
        judge = OpenAIJudge(f"http://127.0.0.1:{server.port}/v1", "judge-model", api_key_env="MMSR_TEST_JUDGE_KEY",
                            retries=1, timeout_s=10)  # fmt: skip
        verdicts = judge.judge(items)
    assert [v.correct for v in verdicts] == [True, False, None, None]
    assert verdicts[2].reply == "I think so" and "HTTP 503" in verdicts[3].reply and "2 attempts" in verdicts[3].reply
    assert len(server.bodies) == 5  # the 503 was retried once
    body = server.bodies[0]
    assert (body["model"], body["temperature"], body["top_p"]) == ("judge-model", 0.0, 0.1)
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    assert "<judge>Yes</judge>" in system and "\n10. " in system  # the ten rules of spec §5
    assert "Other acceptable answers: Quaid" in user and set(server.auth) == {"Bearer sk-test-123"}
    assert all("sk-test" not in v.reply for v in verdicts)


def test_judge_in_eval_summary(monkeypatch, tiny_policy, fvqa_samples):
    from mmsr.eval.report import summarize
    from mmsr.eval.run import Evaluator
    from mmsr.rollout.engine import ScriptedEngine

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = fvqa_samples[:2]
    script = {s[0].id: [f"<reason>r</reason><answer>It is {s[0].ground_truth}</answer>"],
              s[1].id: ["<reason>r</reason><answer>nothing</answer>"]}  # fmt: skip
    with FakeOpenAI() as server:
        judge = OpenAIJudge(f"http://127.0.0.1:{server.port}/v1", "m", timeout_s=10)
        records = Evaluator(tiny_policy, ScriptedEngine(script, tiny_policy.tokenizer), {}, judge=judge).run(s, "on-demand", "d")
    assert server.auth == [None, None]  # no key in the environment: no Authorization header
    assert [r.judge for r in records] == [True, False] and [r.em for r in records] == [False, False]
    assert summarize(records)["d"]["on-demand"]["all"]["judge"] == 0.5


def test_a_resumed_evaluation_asks_again_only_for_the_verdicts_the_judge_never_gave(monkeypatch, tmp_path, tiny_policy, fvqa_samples):
    from mmsr.eval.run import Evaluator
    from mmsr.eval.work import EvalWork
    from mmsr.rollout.engine import ScriptedEngine

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = fvqa_samples[:3]
    script = {s[0].id: [f"<reason>r</reason><answer>It is {s[0].ground_truth}</answer>"],
              s[1].id: ["<reason>r</reason><answer>nothing</answer>"],
              s[2].id: [f"<reason>r</reason><answer>down {s[2].ground_truth}</answer>"]}  # fmt: skip
    runs = []
    for outage in ({"down": 503}, {}):  # the endpoint fails on the third question, then is back
        engine = ScriptedEngine(script, tiny_policy.tokenizer)
        with FakeOpenAI(outage) as server:
            judge = OpenAIJudge(f"http://127.0.0.1:{server.port}/v1", "m", retries=0, timeout_s=10)
            evaluator = Evaluator(tiny_policy, engine, {}, judge=judge, batch_size=2)
            runs.append(evaluator.run(s, "on-demand", "d", EvalWork(tmp_path / "work.jsonl", {"judge_url": "x"})))
        runs[-1] = ([r.judge for r in runs[-1]], len(server.bodies), len(engine.requests))
    assert runs[0] == ([True, False, None], 3, 3)
    assert runs[1] == ([True, False, True], 1, 0)  # no episode again; one request, for the missing verdict
    kept = EvalWork(tmp_path / "work.jsonl", {"judge_url": "x"}).done(("d", "on-demand", 2), [s[2].id])
    assert [r.judge for r in kept] == [True]  # the work file has it now


def test_an_episode_without_an_answer_is_wrong_without_asking_the_judge(monkeypatch, tiny_policy, fvqa_samples):
    """The judge grades the reward's answer (``episode_answer``): shown the last turn instead, it passed a
    ground truth the model wrote outside ``<answer>`` tags, which the reward counts wrong."""
    from mmsr.eval.report import summarize
    from mmsr.eval.run import Evaluator
    from mmsr.rollout.engine import ScriptedEngine

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = fvqa_samples[:2]
    script = {s[0].id: [f"<reason>r</reason>It is {s[0].ground_truth}."],  # no <answer>
              s[1].id: [f"<reason>r</reason><answer>{s[1].ground_truth}</answer>"]}  # fmt: skip
    with FakeOpenAI() as server:
        judge = OpenAIJudge(f"http://127.0.0.1:{server.port}/v1", "m", timeout_s=10)
        records = Evaluator(tiny_policy, ScriptedEngine(script, tiny_policy.tokenizer), {}, judge=judge).run(s, "on-demand", "d")
    assert [r.answer for r in records] == [None, s[1].ground_truth] and records[0].reward == 0.0
    assert [r.judge for r in records] == [False, True] and "not asked: the episode has no <answer>" in records[0].judge_reply
    assert len(server.bodies) == 1 and s[0].ground_truth not in server.bodies[0]["messages"][1]["content"]
    assert summarize(records)["d"]["on-demand"]["all"]["judge_unparsed"] == 0


def test_missing_verdicts_are_counted_in_summary_md_and_suite_md_and_the_cli_warns(monkeypatch, tmp_path, tiny_policy,
                                                                                   fvqa_samples, capsys):  # fmt: skip
    """A judge that is down (503) or replies without a verdict: both count wrong, so its accuracy alone (33%)
    cannot tell an outage from wrong answers; both markdown outputs count them and the command warns."""
    from mmsr.eval import cli
    from mmsr.eval.run import Evaluator
    from mmsr.rollout.engine import ScriptedEngine

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = fvqa_samples[:3]
    script = {s[0].id: [f"<reason>r</reason><answer>{s[0].ground_truth}</answer>"],
              s[1].id: [f"<reason>r</reason><answer>down {s[1].ground_truth}</answer>"],
              s[2].id: [f"<reason>r</reason><answer>garbled {s[2].ground_truth}</answer>"]}  # fmt: skip
    dev = str(FVQA / "fvqa_dev.jsonl")
    suite = {"sets": {"dev": {"class_path": "mmsr.data.benchmarks.MMSearchR1Parquet", "init_args": {"path": dev}}}}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    with FakeOpenAI({"down": 503, "garbled": "I think so"}) as server:
        url = f"http://127.0.0.1:{server.port}/v1"
        judge = OpenAIJudge(url, "m", retries=0, timeout_s=10)
        evaluator = lambda args: Evaluator(tiny_policy, ScriptedEngine(script, tiny_policy.tokenizer), {}, judge=judge)  # noqa: E731
        monkeypatch.setattr(cli, "build_evaluator", evaluator)
        common = ["--policy", "unused.yaml", "--tools", "unused.yaml", "--limit", "3", "--judge-url", url]
        with pytest.raises(SystemExit, match="the judge never replied for 1 episode "):  # "down"; "garbled" did reply
            cli.main([*common, "--data", f"dev={dev}", "--out", str(tmp_path / "data")])
        data_err = capsys.readouterr().err
        with pytest.raises(SystemExit, match="the judge never replied for 1 episode "):
            cli.main([*common, "--suite", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "suite")])
        suite_err = capsys.readouterr().err
    summary = (tmp_path / "data" / "summary.md").read_text()
    assert "| Judge | Judge unparsed | SR (responses) |" in summary and "| dev | on-demand | all | 3 | 33.3 | 100.0 | 33.3 | 2 | 0.0 |" in summary
    suite_md = (tmp_path / "suite" / "suite.md").read_text()
    assert "| on-demand | Acc | 33.3 | 33.3 |\n| on-demand | Judge unparsed | 2 | 2 |\n| on-demand | SR |" in suite_md
    for err, out in ((data_err, "data"), (suite_err, "suite")):
        assert "warning: 2 of 3 judged episodes got no verdict" in err and str(tmp_path / out) in err


def test_after_a_judge_outage_the_command_fails_keeping_its_work_file_and_the_rerun_asks_only_for_those(
    monkeypatch, tmp_path, tiny_policy, fvqa_samples
):
    """The judge down for one episode: the command exited 0 and removed ``episodes.partial.jsonl``, so the rerun
    README promises ("asking the judge again only for the verdicts it never gave") ran every episode again."""
    from mmsr.eval import cli
    from mmsr.eval.run import Evaluator
    from mmsr.eval.work import WORK_FILE
    from mmsr.rollout.engine import ScriptedEngine

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = fvqa_samples[:3]
    script = {x.id: [f"<reason>r</reason><answer>{'down ' * (i == 1)}{x.ground_truth}</answer>"] for i, x in enumerate(s)}
    engines = []

    def evaluator(args):
        engines.append(ScriptedEngine(script, tiny_policy.tokenizer))
        judge = OpenAIJudge(args.judge_url, "m", retries=0, timeout_s=10)
        return Evaluator(tiny_policy, engines[-1], {}, judge=judge, batch_size=2)

    monkeypatch.setattr(cli, "build_evaluator", evaluator)
    with FakeOpenAI({"down": 503}) as server:
        argv = ["--policy", "unused.yaml", "--tools", "unused.yaml", "--data", f"dev={FVQA / 'fvqa_dev.jsonl'}", "--limit",
                "3", "--judge-url", f"http://127.0.0.1:{server.port}/v1", "--out", str(tmp_path)]  # fmt: skip
        with pytest.raises(SystemExit, match=rf"never replied for 1 episode .*{WORK_FILE} is kept, and running the same "
                                             "command again asks the judge only for those verdicts \\(delete it to keep them wrong\\)$"):  # fmt: skip
            cli.main(argv)
        assert (tmp_path / WORK_FILE).is_file() and len(server.bodies) == 3
        server.script.clear()  # the endpoint is back
        summary = cli.main(argv)
    assert len(server.bodies) == 4 and engines[1].requests == []  # one request more, no episode again
    assert summary["dev"]["on-demand"]["all"]["judge"] == 1.0 and not (tmp_path / WORK_FILE).exists()
