"""JudgedReward: the MMSearch-R1 reward table with an LLM judge's verdicts (a local OpenAI-compatible server)."""

from __future__ import annotations

import asyncio
import csv
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmsr.metrics import rollout_metrics
from mmsr.module import GRPOModule
from mmsr.reward import mmsearch_r1_reward
from mmsr.reward.judge import OpenAIJudge
from mmsr.reward.judged import JudgedReward, _key
from mmsr.rollout.loop import RolloutSettings
from tests.conftest import subprocess_env
from tests.eval.test_judge import FakeOpenAI
from tests.reward.test_mmsearch_r1 import GT, IMG, TXT, WRONG, _sample, _trajectory

ROOT = Path(__file__).resolve().parents[2]
VERBOSE_ANSWER = "It was Gustave Eiffel, the engineer"
VERBOSE = f"<reason>The page names him.</reason>\n<answer>{VERBOSE_ANSWER}</answer>"


def _judge(server: FakeOpenAI, **kw) -> OpenAIJudge:
    return OpenAIJudge(f"http://127.0.0.1:{server.port}/v1", "judge-model", api_key_env="MMSR_TEST_NO_KEY",
                       timeout_s=10, **kw)  # fmt: skip


def _responses(server: FakeOpenAI) -> list[str]:
    """The model responses the judge was asked about, in the order the requests came."""
    return [b["messages"][1]["content"].split("Model response: ")[1] for b in server.bodies]


def test_reward_table_with_verdicts():
    trajs = [_trajectory(VERBOSE), _trajectory(IMG, VERBOSE), _trajectory(WRONG), _trajectory(IMG, TXT),
             _trajectory(IMG, TXT, VERBOSE)]  # fmt: skip
    samples = [_sample()] * len(trajs)
    with FakeOpenAI() as server:
        reward = JudgedReward(_judge(server))
        rewards = reward.batch(trajs, samples)
        details = [reward.details(t, s) for t, s in zip(trajs, samples)]
    # exact match calls the verbose answer wrong (0.1); the judge does not
    assert mmsearch_r1_reward([VERBOSE], GT) == pytest.approx(0.1)
    assert rewards == pytest.approx([1.0, 0.91, 0.1, 0.0, 0.91])
    # one request per distinct answer (the verbose one three times, the wrong one); none without an answer;
    # ``details`` reuses the batch's verdicts
    asked = sorted(_responses(server))
    assert asked == [VERBOSE_ANSWER, "Victor Hugo"]
    assert [d["correct"] for d in details] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert [d["judge_failed"] for d in details] == [0.0] * 5
    assert [d["searched"] for d in details] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert reward(_trajectory(VERBOSE), _sample(ground_truth="Victor Hugo")) == pytest.approx(0.1)  # one episode


def test_judge_outage_falls_back_to_exact_match():
    trajs = [_trajectory("<reason>r</reason><answer>Gustave Eiffel</answer>"), _trajectory(IMG, VERBOSE)]
    samples = [_sample(), _sample()]
    with FakeOpenAI({"Eiffel": 503}) as server:  # every request fails
        reward = JudgedReward(_judge(server, retries=0))
        rewards = reward.batch(trajs, samples)
        details = [reward.details(t, s) for t, s in zip(trajs, samples)]
    assert rewards == pytest.approx([1.0, 0.1])  # exact match decided: right, then wrong
    assert [d["judge_failed"] for d in details] == [1.0, 1.0]
    metrics = rollout_metrics(trajs, samples, rewards, details, RolloutSettings())
    assert metrics["reward/judge_failed"] == 1.0 and metrics["reward/accuracy"] == 0.5
    with FakeOpenAI({"Eiffel": 503}) as server:
        subem = JudgedReward(_judge(server, retries=0), fallback="SubEM")
        assert subem.batch(trajs[1:], samples[1:]) == pytest.approx([0.91])  # the name is in the answer


class SlowOpenAI(FakeOpenAI):
    """FakeOpenAI that holds each request for ``delay_s`` and records the most requests in flight at once."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s, self.in_flight, self.most = delay_s, 0, 0

    async def chat(self, request):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            return await super().chat(request)
        finally:
            self.in_flight -= 1


def test_a_steps_requests_run_concurrently():
    trajs = [_trajectory(f"<reason>r</reason><answer>guess {i}</answer>") for i in range(8)]
    with SlowOpenAI(delay_s=1.0) as server:
        rewards = JudgedReward(_judge(server, concurrency=4)).batch(trajs, [_sample()] * 8)
    assert rewards == pytest.approx([0.1] * 8) and len(server.bodies) == 8
    assert server.most == 4  # the judge's concurrency, not one request at a time


def test_module_scores_a_step_in_one_batch():
    class Counting(JudgedReward):
        def __init__(self):
            self.calls = []

        def batch(self, trajectories, samples):
            self.calls.append([s.id for s in samples])
            return [0.5 + t.group_id for t in trajectories]

    reward = Counting()
    trajs = [_trajectory(WRONG), _trajectory(WRONG)]
    trajs[1].group_id = 1
    samples = [_sample(), SimpleNamespace(id="y")]
    out = GRPOModule.compute_rewards(SimpleNamespace(reward=reward), trajs, samples)
    assert out.tolist() == [0.5, 1.5] and reward.calls == [["x", "y"]]  # each episode's own prompt, one call


@pytest.mark.slow
def test_fit_with_a_judged_reward(tmp_path):
    """``mmsr fit`` takes the reward and its judge from the config (class_path) and logs ``reward/judge_failed``."""
    with FakeOpenAI() as server:
        judge = {"class_path": "mmsr.reward.judge.OpenAIJudge",
                 "init_args": {"base_url": f"http://127.0.0.1:{server.port}/v1", "model": "judge-model",
                               "api_key_env": "MMSR_TEST_NO_KEY"}}  # fmt: skip
        reward = {"class_path": "mmsr.reward.judged.JudgedReward", "init_args": {"judge": judge}}
        cmd = [sys.executable, "-m", "mmsr", "fit", "-c", "configs/smoke.yaml", "--trainer.max_steps", "2",
               "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
               "--model.init_args.reward", json.dumps(reward)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics_file,) = tmp_path.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_file.read_text().splitlines()))
    assert len(rows) == 2 and all(r["reward/judge_failed"] == "0.0" for r in rows)


def test_details_of_an_episode_the_batch_did_not_score():
    with FakeOpenAI() as server:
        reward = JudgedReward(_judge(server))
        reward.batch([_trajectory(WRONG)], [_sample()])
        alone = reward.details(_trajectory(VERBOSE), _sample())  # judged on its own, kept beside the batch's
        again = reward.details(_trajectory(WRONG), _sample())
    assert alone["correct"] == 1.0 and again["correct"] == 0.0 and len(server.bodies) == 2


def test_submitted_episodes_are_judged_while_the_rollout_goes_on():
    trajs = [_trajectory(f"<reason>r</reason><answer>guess {i}</answer>") for i in range(4)] + [_trajectory(IMG, TXT)]
    with SlowOpenAI(delay_s=0.5) as server:
        reward = JudgedReward(_judge(server, concurrency=2))
        for t in trajs:
            reward.submit(t, _sample())  # as RolloutLoop.on_episode_end calls it
        reward.submit(trajs[0], _sample())  # the same answer again: not asked twice
        deadline = time.monotonic() + 10
        while server.most < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.most == 2  # in flight before any batch asked, capped by the judge's concurrency
        extra = _trajectory(VERBOSE)  # not submitted: asked by the batch
        rewards = reward.batch([*trajs, extra], [_sample()] * 6)
        assert rewards == pytest.approx([0.1] * 4 + [0.0, 1.0]) and len(server.bodies) == 5
        assert reward.batch([trajs[0]], [_sample()]) == pytest.approx([0.1]) and len(server.bodies) == 5  # remembered
    assert server.most == 2 and not reward._pending
    assert len(set(server.peers[:4])) == 2  # the four submitted requests: two connections, each used twice


def test_verdicts_no_batch_takes_are_kept_not_piled_up():
    trajs = [_trajectory(f"<reason>r</reason><answer>guess {i}</answer>") for i in range(6)]
    with FakeOpenAI() as server:
        reward = JudgedReward(_judge(server))
        for t in trajs[:5]:
            reward.submit(t, _sample())  # as with a compute_rewards override that never calls batch
        deadline = time.monotonic() + 10
        while not all(f.done() for f in reward._pending.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        reward.submit(trajs[5], _sample())
        assert list(reward._pending) == [_key(trajs[5], _sample())]  # the five answered moved to the cache
        assert reward.batch(trajs, [_sample()] * 6) == pytest.approx([0.1] * 6)
    assert len(server.bodies) == 6 and not reward._pending  # none asked twice


def test_the_worker_closes_its_session_when_the_reward_goes():
    with FakeOpenAI() as server:
        reward = JudgedReward(_judge(server))
        reward.submit(_trajectory(VERBOSE), _sample())
        assert reward.batch([_trajectory(VERBOSE)], [_sample()]) == pytest.approx([1.0])
        loop, sessions = reward._worker.loop, reward._worker.sessions
        del reward
        gc.collect()
        deadline = time.monotonic() + 10
        while loop.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not loop.is_running() and len(sessions) == 1 and sessions[0].closed
    deadline = time.monotonic() + 10
    while not loop.is_closed() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.is_closed()


def test_the_loop_reports_each_episode_as_it_ends(tiny_policy, fvqa_samples):
    from mmsr.rollout.engine import SamplingParams
    from tests.rollout.test_loop import ANS, IMG as IMG_TURN, TXT as TXT_TURN, make_loop

    samples = fvqa_samples[:2]
    script = {f"{samples[0].id}#0": [ANS], f"{samples[0].id}#1": [IMG_TURN, TXT_TURN, ANS],
              f"{samples[1].id}#0": [TXT_TURN, ANS], f"{samples[1].id}#1": ["no action"]}  # fmt: skip
    loop, engine = make_loop(tiny_policy, script)
    seen = []
    loop.on_episode_end = lambda t, s: seen.append((t.sample_id, s.id, list(t.assistant_texts), len(engine.requests)))
    trajs = loop.run(samples, 2, SamplingParams())
    assert sorted(x[:3] for x in seen) == sorted((t.sample_id, t.sample_id, list(t.assistant_texts)) for t in trajs)
    # the direct answer and the episode without an action are reported in round 1 (4 requests so far),
    # before the searching episodes' later turns are generated (7 requests in all)
    when = sorted(x[3] for x in seen)
    assert when[:2] == [4, 4] and min(when[2:]) > 4 and len(engine.requests) == 7


def test_a_training_step_judges_its_episodes_as_they_end(fvqa_samples):
    from tests.test_module import fit_one_step, make_module

    class Recording(JudgedReward):
        def __init__(self, judge):
            super().__init__(judge)
            self.submitted = []

        def submit(self, trajectory, sample):
            self.submitted.append(trajectory.assistant_texts[-1])
            super().submit(trajectory, sample)

    sample = next(s for s in fvqa_samples if s.ground_truth == "musketeers")
    with FakeOpenAI() as server:
        reward = Recording(_judge(server))
        module = make_module()  # episodes: right, wrong, search then right, no answer
        module.reward = reward  # swapped in after the rollout loop was built: still told of each episode
        fit_one_step(module, [sample])
    assert len(reward.submitted) == 4  # every episode, from the rollout loop
    assert module.last_rollout.rewards.tolist() == pytest.approx([1.0, 0.1, 0.91, 0.0])
    assert sorted(_responses(server)) == ["musketeers", "pirates"]
    assert module.trainer.callback_metrics["reward/judge_failed"] == 0.0


def test_verdicts_are_remembered_across_steps():
    right, wrong = _trajectory(VERBOSE), _trajectory(WRONG)
    with FakeOpenAI({"Victor": 503}) as server:  # the wrong answer's requests fail: not remembered
        reward = JudgedReward(_judge(server, retries=0))
        assert reward.batch([right, wrong], [_sample()] * 2) == pytest.approx([1.0, 0.1])
        reward.submit(right, _sample())  # known: nothing sent
        assert reward.batch([right, wrong], [_sample()] * 2) == pytest.approx([1.0, 0.1])
        # another question with the same answer is another item
        assert reward.batch([right], [_sample(ground_truth="Victor Hugo")]) == pytest.approx([0.1])
        responses = _responses(server)
        small = JudgedReward(_judge(server), cache_size=1)
        small.batch([right, _trajectory(IMG, VERBOSE)], [_sample(), _sample(ground_truth="Victor Hugo")])
        small.batch([right], [_sample()])  # dropped for the newer verdict: asked again
    assert responses == [VERBOSE_ANSWER, "Victor Hugo", "Victor Hugo", VERBOSE_ANSWER]
    assert len(server.bodies) == 7


def test_weighted_rewards_pass_batches_and_submissions_on():
    from mmsr.reward import MMSearchR1Reward, WeightedRewards

    trajs, samples = [_trajectory(VERBOSE), _trajectory(IMG, WRONG)], [_sample()] * 2
    with FakeOpenAI() as server:
        combined = WeightedRewards([JudgedReward(_judge(server)), MMSearchR1Reward()], [1.0, 0.5])
        combined.submit(trajs[0], samples[0])  # handed on to the judged reward
        deadline = time.monotonic() + 10
        while not server.bodies and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _responses(server) == [VERBOSE_ANSWER]
        rewards = combined.batch(trajs, samples)
        assert rewards == pytest.approx([1.0 + 0.5 * 0.1, 0.1 + 0.5 * 0.1])  # exact match: the verbose answer is wrong
        assert rewards == pytest.approx([combined(t, s) for t, s in zip(trajs, samples)])
    assert sorted(_responses(server)) == [VERBOSE_ANSWER, "Victor Hugo"]


def test_the_verdict_cache_drops_the_least_recently_used():
    """Answers A, B, A, C, A with room for 2: the reuse of A keeps it, so C drops B and A is asked once (the
    cache dropped in insertion order: A went at C and was paid for again)."""
    a, b, c = (_trajectory(f"<reason>r</reason><answer>{x}</answer>") for x in ("alpha", "beta", "gamma"))
    with FakeOpenAI() as server:
        reward = JudgedReward(_judge(server), cache_size=2)
        for t in (a, b, a, c, a):
            reward.batch([t], [_sample()])
    assert _responses(server) == ["alpha", "beta", "gamma"]


def test_weighted_rewards_report_the_judged_terms():
    """``WeightedRewards([JudgedReward, ...])`` had no ``details``: a step logged ``reward/accuracy`` 0 and no
    ``reward/judge_failed`` through a judge outage (the README's counter)."""
    from mmsr.reward.base import WeightedRewards
    from mmsr.reward.mmsearch_r1 import MMSearchR1Reward

    with FakeOpenAI({VERBOSE_ANSWER: 503}) as server:
        weighted = WeightedRewards([JudgedReward(_judge(server, retries=0)), MMSearchR1Reward()], [1.0, 0.0])
        trajs = [_trajectory(VERBOSE), _trajectory(f"<reason>r</reason><answer>{GT}</answer>")]
        weighted.batch(trajs, [_sample()] * 2)
        details = [weighted.details(t, _sample()) for t in trajs]
    assert [d["judge_failed"] for d in details] == [1.0, 0.0] and [d["correct"] for d in details] == [0.0, 1.0]
    m = rollout_metrics(trajs, [_sample()], [0.1, 1.0], details, RolloutSettings())
    assert m["reward/accuracy"] == 0.5 and m["reward/judge_failed"] == 0.5
