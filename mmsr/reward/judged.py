"""The MMSearch-R1 reward with an LLM judge deciding whether the answer is right (``JudgedReward``).

Exact match scores "the Eiffel Tower in Paris" wrong against "Eiffel Tower"; a judge (the paper's
evaluation protocol, ``mmsr.reward.judge``) does not. The reward's shape stays the paper's: 1.0 for a
correct answer without search, ``1 - search_penalty`` after searching, the format term for a wrong one.

A judge is a network call of a second or more. ``GRPOModule`` hands each episode to ``submit`` as it
ends (``RolloutLoop.on_episode_end``), so its request runs while the rest of the step still generates
or searches; ``batch`` (``GRPOModule.compute_rewards``) then waits for those verdicts and asks the rest.
Requests run concurrently (at most the judge's ``concurrency`` in flight), a question answered the
same way by several episodes of its group is asked once, and verdicts are remembered across steps (the
same answer to the same question in a later epoch is not paid for again).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import aiohttp

from mmsr.data.sample import Sample
from mmsr.reward.answer import episode_answer
from mmsr.reward.judge import JudgeInput, OpenAIJudge
from mmsr.reward.mmsearch_r1 import MMSearchR1Reward, Mode, is_correct, shape_details
from mmsr.rollout.trajectory import Trajectory

Key = JudgeInput  # what the judge is asked: the question, its answers and the episode's extracted answer


class JudgedReward:
    """``mmsearch_r1_reward`` with correctness from an LLM judge's verdict on the extracted answer.

    An episode without an ``<answer>`` is wrong without asking. When no verdict comes (the requests keep
    failing, or the reply has none), correctness falls back to ``fallback`` matching, so a judge outage
    does not turn a step's rewards into zeros; ``details`` marks those episodes (``judge_failed``, logged
    as ``reward/judge_failed``). A judge that refuses its key or is not found (401/403/404) before it has
    ever replied is no outage: ``batch`` and ``details`` raise its ``JudgeRefused`` (a refused ``submit``'s too),
    stopping the run, rather than train the whole run on the fallback.

    Args:
        judge: the judge (``class_path: mmsr.reward.judge.OpenAIJudge``; its API key from an env var).
        search_penalty, format_weight, per_search_penalty: as ``MMSearchR1Reward``.
        fallback: "EM" or "SubEM", used where the judge gave no verdict.
        cache_size: verdicts remembered (least recently used dropped first; 0: none). A missing verdict
            is not remembered: the next step asks again.
    """

    def __init__(self, judge: OpenAIJudge, search_penalty: float = 0.1, format_weight: float = 0.1,
                 per_search_penalty: bool = False, fallback: Mode = "EM",
                 cache_size: int = 100_000) -> None:  # fmt: skip
        self.judge, self.cache_size = judge, cache_size
        self._cache: OrderedDict[Key, bool] = OrderedDict()
        self.table = MMSearchR1Reward(search_penalty, format_weight, fallback, per_search_penalty)
        self._verdicts: dict[Key, bool | None] = {}  # the last batch's, for ``details``
        self._pending: dict[Key, Future] = {}  # submitted, not yet taken by a batch or harvested
        self._worker: _Worker | None = None

    def __getstate__(self) -> dict:
        # a copy (checkpoint hyper-parameters, a deepcopy) gets no requests in flight and no worker thread
        return self.__dict__ | {"_pending": {}, "_worker": None}

    def submit(self, trajectory: Trajectory, sample: Sample) -> None:
        """Start judging a finished episode's answer in the background; ``batch`` takes the verdict."""
        key = _key(trajectory, sample)
        self._harvest()
        if key is not None and key in self._cache:
            self._hit(key)  # used again: kept longer
        if key is None or key in self._pending or key in self._cache:
            return
        self._worker = self._worker or _Worker(self.judge)
        self._pending[key] = self._worker.submit(key)

    def batch(self, trajectories: Sequence[Trajectory], samples: Sequence[Sample]) -> list[float]:
        """Rewards of ``trajectories[i]`` answering ``samples[i]``, the judge asked once per distinct answer."""
        keys = [_key(t, s) for t, s in zip(trajectories, samples)]
        wanted = {k for k in keys if k is not None}
        taken = {k: self._pending.pop(k).result() for k in wanted if k in self._pending}
        self._remember(taken)
        known = {k: self._hit(k) for k in wanted if k in self._cache} | taken
        self._verdicts = known | self._ask([k if k not in known else None for k in keys])
        return [self._reward(t, s, k) for t, s, k in zip(trajectories, samples, keys)]

    def __call__(self, trajectory: Trajectory, sample: Sample) -> float:
        return self.batch([trajectory], [sample])[0]

    def details(self, trajectory: Trajectory, sample: Sample) -> dict[str, float]:
        """``MMSearchR1Reward.details`` with the judged ``correct`` and ``judge_failed`` (the fallback decided);
        the verdicts are the last ``batch``'s (an episode it did not score is judged on its own)."""
        key = _key(trajectory, sample)
        if key is not None and key not in self._verdicts:
            self._verdicts |= self._ask([key])
        failed = key is not None and self._verdicts[key] is None
        correct = self._correct(trajectory, sample, key)
        return {"correct": float(correct), **shape_details(trajectory), "judge_failed": float(failed)}

    def _harvest(self) -> None:
        """Moves the verdicts that came in to the cache, so ``_pending`` holds only requests in flight, even
        when no ``batch`` takes them (a ``compute_rewards`` override that scores episodes one by one). A request
        that raised (``JudgeRefused``) stays for ``batch`` to raise: raised here, mid-rollout, on one rank, the
        other ranks went on into the step and waited for it (``GRPOModule.agreed_scores`` stops them all)."""
        done = [k for k, future in self._pending.items() if future.done() and future.exception() is None]
        self._remember({k: self._pending.pop(k).result() for k in done})

    def _ask(self, keys: Sequence[Key | None]) -> dict[Key, bool | None]:
        """The judge's verdict on each distinct item of ``keys`` (None: an episode without an answer, not
        asked), each definite one remembered."""
        items = list(dict.fromkeys(k for k in keys if k is not None))
        verdicts = {k: v.correct for k, v in zip(items, self.judge.judge(items) if items else [])}
        self._remember(verdicts)
        return verdicts

    def _hit(self, key: Key) -> bool:
        """A remembered verdict, now the most recently used (the cache drops the least recently used first)."""
        self._cache.move_to_end(key)
        return self._cache[key]

    def _remember(self, verdicts: dict[Key, bool | None]) -> None:
        for key, verdict in verdicts.items():
            if verdict is not None and self.cache_size > 0:
                self._cache[key] = verdict
                self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _correct(self, trajectory: Trajectory, sample: Sample, key: Key | None) -> bool:
        if key is None:
            return False
        verdict = self._verdicts[key]
        if verdict is None:
            turns = trajectory.assistant_texts
            return is_correct(turns, sample.ground_truth, sample.candidate_answers, self.table.mode)
        return verdict

    def _reward(self, trajectory: Trajectory, sample: Sample, key: Key | None) -> float:
        return self.table.shaped(trajectory, self._correct(trajectory, sample, key))


def _key(trajectory: Trajectory, sample: Sample) -> Key | None:
    """What the judge is asked about: the last turn's answer to the sample; None without an answer."""
    answer = episode_answer(trajectory.assistant_texts)
    if answer is None:
        return None
    return JudgeInput(sample.question, sample.ground_truth, tuple(sample.candidate_answers), answer)


class _Worker:
    """Submitted requests' event loop on a daemon thread, with one HTTP session (connections reused across
    requests and steps) and one semaphore capping them at the judge's ``concurrency``. The session is
    closed and the loop stopped when the worker is collected, or at exit."""

    def __init__(self, judge: OpenAIJudge) -> None:
        self.judge, self.loop = judge, asyncio.new_event_loop()
        self.semaphore = asyncio.Semaphore(judge.concurrency)
        self.sessions: list[aiohttp.ClientSession] = []  # one, made on the loop's thread by the first request
        threading.Thread(target=_serve, args=(self.loop,), name="judged-reward", daemon=True).start()
        weakref.finalize(self, _shut, self.loop, self.sessions)

    def submit(self, item: JudgeInput) -> Future:
        return asyncio.run_coroutine_threadsafe(self._correct(item), self.loop)

    async def _correct(self, item: JudgeInput) -> bool | None:
        if not self.sessions:  # only the loop's thread runs this, so no second session races in
            self.sessions.append(self.judge.session())
        return (await self.judge.ajudge_one(self.sessions[0], self.semaphore, item)).correct


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_forever()
    loop.close()


def _shut(loop: asyncio.AbstractEventLoop, sessions: list[aiohttp.ClientSession]) -> None:
    if sessions:
        try:  # an unclosed session warns at exit; a loop stuck past the wait is left to the daemon thread's end
            asyncio.run_coroutine_threadsafe(sessions[0].close(), loop).result(timeout=5.0)
        except (FutureTimeout, RuntimeError):
            pass
    loop.call_soon_threadsafe(loop.stop)
