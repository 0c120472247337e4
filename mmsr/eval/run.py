"""Evaluation: the training rollout loop, greedy, one episode per question, scored and written out.

Greedy really is greedy: every turn is generated with ``SamplingParams(temperature=0)``, which
``HFEngine`` turns into argmax (upstream builds greedy kwargs for validation and never applies
them, so it evaluates at temperature 1; spec §9).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from mmsr.data.sample import Sample
from mmsr.eval.forced import ForcedTurnsEngine
from mmsr.reward.judge import JudgeInput, OpenAIJudge, request_failed
from mmsr.eval.report import EvalRecord, markdown, summarize
from mmsr.eval.work import EvalWork
from mmsr.eval.workflows import Workflow, WorkflowSetup, setup
from mmsr.models.policy import Policy
from mmsr.prompt.render import PromptBuilder
from mmsr.reward.answer import episode_answer, exact_match, sub_exact_match
from mmsr.reward.base import Reward, scored
from mmsr.reward.format import format_ok
from mmsr.reward.mmsearch_r1 import MMSearchR1Reward
from mmsr.rollout.engine import Engine, SamplingParams
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.rollout.trajectory import Trajectory
from mmsr.tools.base import SearchTool
from mmsr.tools.secrets import redact_all
from mmsr.tools.spec import declared

NOT_ASKED = "not asked: the episode has no <answer> (wrong, as the reward counts it)"  # a judge_reply


def turn_record(turn) -> dict:
    call = turn.tool_call
    return {
        "text": turn.text,
        "action": type(turn.action).__name__,
        "query": getattr(turn.action, "arg", "") or None,  # a tool call's text argument
        "tool_ok": call.result.ok if call else None,
        "titles": list(call.result.titles) if call else [],
    }


class BatchRewards(Protocol):
    """A run's own ``compute_rewards`` (``mmsr.eval.load.RunRewards``): ``[N]`` one batch's rewards at once, a
    trajectory ``t``'s question ``samples[t.group_id]``, as a training step's are."""

    def episode_rewards(self, trajectories: Sequence[Trajectory], samples: Sequence[Sample]) -> list[float]: ...


def repeated_id(samples: Sequence[Sample]) -> str | None:
    """The first sample id that occurs twice, or None: an episode is found by its question's id (RAG's empty
    query turn searches the question of its id, the work file keys batches by ids)."""
    seen = set()
    for sample in samples:
        if sample.id in seen:
            return sample.id
        seen.add(sample.id)
    return None


class Evaluator:
    """Runs workflows over eval sets and scores every episode.

    Args:
        policy: the policy (tokenizer, chat format, image processing).
        engine: generates tokens (e.g. ``HFEngine`` bound to ``policy``).
        tools: ``{"image_search": tool, "text_search": tool}`` (``direct`` never calls them).
        settings: on-demand episode limits (``direct`` / ``rag`` derive theirs, see ``workflows``).
        prompts: on-demand templates (default: the MMSearch-R1 ones).
        judge: optional LLM judge.
        reward: the run's reward, reported per episode (``mmsr eval --ckpt``: the checkpoint's, see
            ``load.scoring_reward``, or its module's ``compute_rewards`` override, ``load.RunRewards``); default
            ``MMSearchR1Reward()``, the paper's.
        batch_size: questions per ``RolloutLoop.run`` call.
    """

    def __init__(self, policy: Policy, engine: Engine, tools: Mapping[str, SearchTool | None],
                 settings: RolloutSettings = RolloutSettings(), prompts: PromptBuilder | None = None,
                 judge: OpenAIJudge | None = None, reward: Reward | BatchRewards | None = None,
                 batch_size: int = 16) -> None:  # fmt: skip
        self.policy, self.engine, self.tools = policy, engine, dict(tools)
        self.settings, self.prompts, self.judge = settings, prompts, judge
        self.reward = reward or MMSearchR1Reward()
        self.batch_size = batch_size

    def loop(self, flow: WorkflowSetup, samples: Sequence[Sample] = ()) -> RolloutLoop:
        """The loop of ``flow``, for episodes of ``samples`` (whose questions RAG's empty query turn searches)."""
        engine, tools = self.engine, self.tools if flow.use_tools else {}
        if flow.forced:
            tags = ("answer", *(spec.tag for spec in declared(tools)))  # the loop's action grammar
            questions = {s.id: s.question for s in samples}
            engine = ForcedTurnsEngine(engine, self.policy.tokenizer, flow.forced, self.policy.stop_token_ids(), tags,
                                       questions)  # fmt: skip
        return RolloutLoop(engine, self.policy, flow.prompts, tools, flow.settings)

    def run(self, samples: Sequence[Sample], workflow: Workflow, name: str, work: EvalWork | None = None) -> list[EvalRecord]:
        """One greedy episode per sample; records in sample order. With ``work``, the batches it holds are taken
        from it, and every batch run (and judged) is added to it as soon as it finishes.

        Raises:
            ValueError: a sample id repeats (``repeated_id``), before any episode.
        """
        if (sample_id := repeated_id(samples)) is not None:
            raise ValueError(f"sample id {sample_id!r} repeats in set {name}: each question needs its own id")
        flow = setup(workflow, self.settings, self.prompts, declared(self.tools))
        loop = self.loop(flow, samples)
        greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=flow.settings.max_tokens_per_turn)
        records = []
        for start in range(0, len(samples), self.batch_size):
            batch = samples[start : start + self.batch_size]
            key, ids = (name, workflow, start), [s.id for s in batch]
            done = work.done(key, ids) if work is not None else None
            if done is None:
                trajs = loop.run(batch, 1, greedy)
                done = new = [self.record(t, batch[t.group_id], workflow, name, flow.allowed_calls, reward)
                              for t, reward in zip(trajs, self.rewards(trajs, batch))]  # fmt: skip
            else:  # from the work file: the verdicts a judge that never replied did not give are asked for again
                new = [r for r in done if request_failed(r.judge_reply)]
            if new and self.judge is not None:
                self.add_verdicts(new)
            if new and work is not None:
                work.add(key, ids, done)
            records += done
        return records

    def rewards(self, trajs: Sequence[Trajectory], batch: Sequence[Sample]) -> list[float]:
        """The ``reward`` column of one batch's episodes, ``batch[t.group_id]`` each one's question: a run's own
        ``compute_rewards`` over them all (``load.RunRewards``), else the reward's values, checked as in training
        (``scored``: an error names the reward, the episode and its sample)."""
        if hasattr(self.reward, "episode_rewards"):
            return self.reward.episode_rewards(trajs, batch)
        return scored(self.reward, trajs, [batch[t.group_id] for t in trajs])

    def record(self, traj: Trajectory, sample: Sample, workflow: str, name: str, allowed: int,
               reward: float) -> EvalRecord:  # fmt: skip
        answer = episode_answer(traj.assistant_texts)  # what the reward column grades, too
        return EvalRecord(
            set=name, workflow=workflow, sample_id=sample.id, data_source=sample.data_source,
            category=sample.category, question=sample.question, ground_truth=sample.ground_truth,
            candidate_answers=list(sample.candidate_answers), answer=answer,
            em=answer is not None and exact_match(answer, sample.answers),
            subem=answer is not None and sub_exact_match(answer, sample.answers),
            reward=reward, format_ok=format_ok(traj.assistant_texts, traj.tools),
            image_searches=traj.num_image_searches, text_searches=traj.num_text_searches, allowed_calls=allowed,
            finish_reason=traj.finish_reason, num_tokens=len(traj), turns=[turn_record(t) for t in traj.turns],
            tool_calls={spec.name: traj.num_calls(spec.name) for spec in traj.tools},
        )  # fmt: skip

    def add_verdicts(self, records: list[EvalRecord]) -> None:
        """The judge grades the answer the reward grades (``episode_answer``). An episode without one is wrong
        without asking, as for ``JudgedReward``: shown the last turn, the judge had passed answers the reward failed."""
        asked = [r for r in records if r.answer is not None]
        for record in records:
            if record.answer is None:
                record.judge, record.judge_reply = False, NOT_ASKED
        items = [JudgeInput(r.question, r.ground_truth, tuple(r.candidate_answers), r.answer) for r in asked]
        for record, verdict in zip(asked, self.judge.judge(items) if items else []):
            record.judge, record.judge_reply = verdict.correct, verdict.reply


def judge_failed(work: EvalWork) -> int:
    """Episodes of the batches this run took from ``work`` or added to it that the judge never replied for
    (``request_failed``): while there are some, the work file stays, and the rerun asks again only for those."""
    return sum(request_failed(record.judge_reply) for record in work.taken())


def write_outputs(records: Sequence[EvalRecord], out_dir: str | Path) -> dict:
    """``trajectories.jsonl`` (every episode), ``summary.json`` and ``summary.md``; returns the summary. Every
    record is masked (``redact_all``, as ``TrajectoryLogger`` does): a page or a reply may quote an API key."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "trajectories.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(redact_all(r)), ensure_ascii=False) + "\n")
    summary = summarize(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown(summary), encoding="utf-8")
    return summary
