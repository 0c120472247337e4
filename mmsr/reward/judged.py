"""The MMSearch-R1 reward with an LLM judge deciding whether the answer is right (``JudgedReward``).

Exact match scores "the Eiffel Tower in Paris" wrong against "Eiffel Tower"; a judge (the paper's
evaluation protocol, ``mmsr.reward.judge``) does not. The reward's shape stays the paper's: 1.0 for a
correct answer without search, ``1 - search_penalty`` after searching, the format term for a wrong one.

A judge is a network call of a second or more. ``GRPOModule`` hands each episode to ``submit`` as it
ends (``RolloutLoop.on_episode_end``), so its request runs while the rest of the step still generates
or searches; ``batch`` (``GRPOModule.compute_rewards``) then waits for those verdicts and asks the rest.
Requests run concurrently (at most the judge's ``concurrency`` in flight), and a question answered the
same way by several episodes of its group is asked once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from mmsr.data.sample import Sample
from mmsr.reward.answer import extract_answer
from mmsr.reward.judge import JudgeInput, OpenAIJudge
from mmsr.reward.mmsearch_r1 import MMSearchR1Reward, Mode, is_correct, shaped_reward, trajectory_tools
from mmsr.rollout.trajectory import Trajectory

Key = tuple[str, str]  # (sample id, extracted answer)


class JudgedReward:
    """``mmsearch_r1_reward`` with correctness from an LLM judge's verdict on the extracted answer.

    An episode without an ``<answer>`` is wrong without asking. When no verdict comes (the requests keep
    failing, or the reply has none), correctness falls back to ``fallback`` matching, so a judge outage
    does not turn a step's rewards into zeros; ``details`` marks those episodes (``judge_failed``, logged
    as ``reward/judge_failed``).

    Args:
        judge: the judge (``class_path: mmsr.reward.judge.OpenAIJudge``; its API key from an env var).
        search_penalty, format_weight, per_search_penalty: as ``MMSearchR1Reward``.
        fallback: "EM" or "SubEM", used where the judge gave no verdict.
    """

    def __init__(self, judge: OpenAIJudge, search_penalty: float = 0.1, format_weight: float = 0.1,
                 per_search_penalty: bool = False, fallback: Mode = "EM") -> None:  # fmt: skip
        self.judge = judge
        self.table = MMSearchR1Reward(search_penalty, format_weight, fallback, per_search_penalty)
        self._verdicts: dict[Key, bool | None] = {}  # the last batch's, for ``details``
        self._pending: dict[Key, Future] = {}  # submitted, not yet taken by a batch
        self._worker: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    def __getstate__(self) -> dict:
        # a copy (checkpoint hyper-parameters, a deepcopy) gets no requests in flight and no worker thread
        return self.__dict__ | {"_pending": {}, "_worker": None}

    def submit(self, trajectory: Trajectory, sample: Sample) -> None:
        """Start judging a finished episode's answer in the background; ``batch`` takes the verdict."""
        key = _key(trajectory, sample)
        if key is None or key in self._pending:
            return
        loop, limit = self._worker = self._worker or _start_worker(self.judge.concurrency)
        item = JudgeInput(sample.question, sample.ground_truth, tuple(sample.candidate_answers), key[1])
        self._pending[key] = asyncio.run_coroutine_threadsafe(_limited(self.judge, limit, item), loop)

    def batch(self, trajectories: Sequence[Trajectory], samples: Sequence[Sample]) -> list[float]:
        """Rewards of ``trajectories[i]`` answering ``samples[i]``, the judge asked once per distinct answer."""
        keys = [_key(t, s) for t, s in zip(trajectories, samples)]
        pending, self._pending = self._pending, {}  # what this batch does not take is dropped
        known = {k: pending[k].result() for k in keys if k in pending}
        self._verdicts = known | self._ask([k if k not in known else None for k in keys], samples)
        return [self._reward(t, s, k) for t, s, k in zip(trajectories, samples, keys)]

    def __call__(self, trajectory: Trajectory, sample: Sample) -> float:
        return self.batch([trajectory], [sample])[0]

    def details(self, trajectory: Trajectory, sample: Sample) -> dict[str, float]:
        """``MMSearchR1Reward.details`` with the judged ``correct`` and ``judge_failed`` (the fallback decided);
        the verdicts are the last ``batch``'s (an episode it did not score is judged on its own)."""
        key = _key(trajectory, sample)
        if key is not None and key not in self._verdicts:
            self._verdicts |= self._ask([key], [sample])
        failed = key is not None and self._verdicts[key] is None
        return self.table.details(trajectory, sample) | {"correct": float(self._correct(trajectory, sample, key)),
                                                         "judge_failed": float(failed)}  # fmt: skip

    def _ask(self, keys: Sequence[Key | None], samples: Sequence[Sample]) -> dict[Key, bool | None]:
        """The judge's verdict for each distinct answer in ``keys`` (None: an episode without one, not asked)."""
        asked = {k: s for k, s in zip(keys, samples) if k is not None}
        items = [JudgeInput(s.question, s.ground_truth, tuple(s.candidate_answers), k[1]) for k, s in asked.items()]
        return {k: v.correct for k, v in zip(asked, self.judge.judge(items) if items else [])}

    def _correct(self, trajectory: Trajectory, sample: Sample, key: Key | None) -> bool:
        if key is None:
            return False
        verdict = self._verdicts[key]
        if verdict is None:
            return is_correct(trajectory.assistant_texts, sample.ground_truth, sample.candidate_answers, self.table.mode)
        return verdict

    def _reward(self, trajectory: Trajectory, sample: Sample, key: Key | None) -> float:
        t = self.table
        return shaped_reward(trajectory.assistant_texts, self._correct(trajectory, sample, key),
                             search_penalty=t.search_penalty, format_weight=t.format_weight,
                             per_search_penalty=t.per_search_penalty, tools=trajectory_tools(trajectory))  # fmt: skip


def _key(trajectory: Trajectory, sample: Sample) -> Key | None:
    """What the judge is asked about: the last turn's answer to the sample; None without an answer."""
    turns = trajectory.assistant_texts
    answer = extract_answer(turns[-1]) if turns else None
    return None if answer is None else (sample.id, answer)


async def _limited(judge: OpenAIJudge, limit: asyncio.Semaphore, item: JudgeInput) -> bool | None:
    async with limit:
        (verdict,) = await judge.ajudge([item])
    return verdict.correct


def _start_worker(concurrency: int) -> tuple[asyncio.AbstractEventLoop, asyncio.Semaphore]:
    """An event loop on a daemon thread for submitted requests, and the semaphore that caps them."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="judged-reward", daemon=True).start()
    return loop, asyncio.Semaphore(concurrency)
