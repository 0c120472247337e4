"""The multi-turn rollout: an explicit, engine-agnostic state machine that owns the loss mask.

Each episode moves GENERATE -> (CALL_TOOL -> GENERATE)* -> DONE, on its own: a tool call starts the
moment its episode asks for it (on the tools' event loop, ``ToolRunner``, bounded and each with a
timeout) and the episode re-enters generation as soon as its result is in, batched with whatever
else is ready, while other episodes generate or wait. Tool latency is hidden behind generation
instead of adding up round by round (``rollout/overlap``), and since every episode samples from its
own stream (``mmsr.rollout.sampling``), which episodes share a batch does not change its noise; the
logits it is added to still move in their last bits with the batch, so for runs that repeat bit for
bit an episode can instead rejoin a fixed number of engine steps after its call started
(``RolloutSettings.tool_rejoin_steps``).
Tokens the policy sampled get mask 1; everything the loop inserts (prompt, end-of-turn scaffolding,
observations, image tokens) gets mask 0. Sampled tokens are never overwritten: a turn that runs out of
budget is kept as sampled and marked truncated.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace
from enum import Enum

from mmsr.data.sample import Sample
from mmsr.models.policy import Policy
from mmsr.checks import refuse_out_of_range
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.actions import Answer, Invalid, stop_strings
from mmsr.rollout.context import describe, fit
from mmsr.rollout.engine import (Engine, GenerationOutput, GenerationRequest, IncrementalEngine, SamplingParams,
                                 checked_output, engine_name, incremental, submitted)
from mmsr.rollout.images import ProcessedImages
from mmsr.rollout.parse import parser_for
from mmsr.rollout.stats import RolloutStats, covered_seconds
from mmsr.rollout.tool_runner import ToolRunner
from mmsr.rollout.trajectory import FinishReason, ToolCall, Trajectory, Turn
from mmsr.tools.base import FatalToolError, SearchTool, ToolRequest, ToolResult, failure, quoted
from mmsr.tools.spec import ToolSpec, declared


@dataclass(frozen=True)
class RolloutSettings:
    """Limits of one episode. The rounds and search limits default to MMSearch-R1's (3 rounds, 1 image search,
    2 text searches); the token limits do not: 256 a turn and 4096 an episode keep CPU runs small, where
    MMSearch-R1 samples up to 2048 a turn within 6144 an episode (``configs/mmsearch_r1/`` sets those).

    Attributes:
        max_rounds: most assistant turns; a search requested in the last round ends the episode.
        image_search_limit: most image searches per episode (``None``: the tool's declared limit, 1).
        text_search_limit: most text searches per episode (``None``: the tool's declared limit, 2).
        tool_limits: most calls per episode of the named tools, over the fields above and the tools'
            declared limits (``ToolSpec.limit``, ``limit:`` of a ``tools:`` entry). Each key must name one of
            the loop's tools: ``RolloutLoop`` refuses others as it is built (``refuse_unknown_tools``).
        max_tokens_per_turn: most tokens sampled per turn.
        max_context_tokens: most tokens of the whole episode (images expanded).
        tool_concurrency: most tool calls in flight at once.
        fit_observations: an observation that does not leave room in the context for a full turn after it
            (``max_tokens_per_turn``) is cut to leave that room (its images dropped, then its text shortened; ``mmsr.rollout.context``) instead of
            ending the episode. Either way ``Trajectory.context`` says what was cut or dropped.
        tool_timeout_s: per-call cap; a timed-out call becomes a failure observation. Tools get it as
            ``ToolRequest.budget_s`` and plan their nested steps within it (``mmsr.tools.budget``);
            ``GRPOModule`` refuses tools whose nested timeouts cannot fit it.
        tool_rejoin_steps: when an episode whose tool call is done generates again. ``None``: at once,
            batched with whatever else is ready (tool latency hidden behind generation; but which episodes
            share a batch then depends on timing, and a batch's composition changes its logits in the last
            bits, so two runs can sample differently once such a difference decides a draw). ``k``: a call
            started after the engine's step ``s`` rejoins after step ``s + k`` (when nothing generates, the
            earliest due calls rejoin), waiting for it if it is late: batches are a function of the episodes
            alone, and two runs on ``HFEngine`` or ``VLLMEngine`` draw the same tokens bit for bit (tested
            with k = 0). With ``HFEngine``, whose step generates a whole submission, every ``k`` waits for each
            round's calls before it generates.

    Raises:
        ValueError: a field out of range (``max_rounds=0``, a negative limit), each named with its value.
    """

    max_rounds: int = 3
    image_search_limit: int | None = None
    text_search_limit: int | None = None
    max_tokens_per_turn: int = 256
    max_context_tokens: int = 4096
    tool_concurrency: int = 16
    tool_timeout_s: float = 30.0
    tool_limits: dict[str, int] = field(default_factory=dict)
    fit_observations: bool = False
    tool_rejoin_steps: int | None = None

    def __post_init__(self) -> None:
        # Out of range, these run without a word: max_rounds=0 still samples a turn, a negative search limit ends
        # every search as search_limit, tool_concurrency=0 waits forever on the first call, a timeout <= 0 times out
        # every call that awaits anything. Refused here, before any rollout; a NaN fails every test.
        s, rejoin = self, self.tool_rejoin_steps
        searches = {"image_search_limit": s.image_search_limit, "text_search_limit": s.text_search_limit}
        refuse_out_of_range("RolloutSettings", [
            ("max_rounds", s.max_rounds, s.max_rounds >= 1, ">= 1"),
            *[(name, n, n is None or n >= 0, ">= 0 (None: the tool's declared limit)") for name, n in searches.items()],
            *[(f"tool_limits[{name!r}]", n, n >= 0, ">= 0") for name, n in s.tool_limits.items()],
            ("max_tokens_per_turn", s.max_tokens_per_turn, s.max_tokens_per_turn >= 1, ">= 1"),
            ("max_context_tokens", s.max_context_tokens, s.max_context_tokens >= 1, ">= 1"),
            ("tool_concurrency", s.tool_concurrency, s.tool_concurrency >= 1, ">= 1"),
            ("tool_timeout_s", s.tool_timeout_s, s.tool_timeout_s > 0, "> 0"),
            ("tool_rejoin_steps", rejoin, rejoin is None or rejoin >= 0, ">= 0 (None: at once)")])  # fmt: skip

    def refuse_unknown_tools(self, names: Sequence[str]) -> None:
        """Refuse ``tool_limits`` keys that are not among ``names`` (the loop's declared tools): a misspelt one
        (``imge_search``) limited nothing, without a word. The settings alone cannot know the tools; the loop
        calls this as it is built.

        Raises:
            ValueError: naming each unknown key and the configured tools.
        """
        unknown = [name for name in self.tool_limits if name not in names]
        if unknown:
            raise ValueError(f"RolloutSettings.tool_limits names {', '.join(map(repr, unknown))}, not a configured tool "
                             f"(configured: {', '.join(names)}): fix the name, or drop the entry")  # fmt: skip

    def refuse_overridden_limits(self, tools: Mapping[str, object]) -> None:
        """Refuse a ``tools:`` entry of image or text search whose own ``limit:`` the pair's setting
        (``image_search_limit`` / ``text_search_limit``, which every shipped config sets) would override: the entry's
        ``limit: 10`` gave 2 calls an episode without a word. Equal values, and a name in ``tool_limits`` (which
        overrides both), pass. The training modules check their configured settings (``GRPOModule``, ``SFTModule``);
        the loop does not, since evaluation's workflows derive theirs (RAG: one search of each kind).

        Raises:
            ValueError: naming the entry's limit and the setting, and how to keep either.
        """
        for name, setting in (("image_search", "image_search_limit"), ("text_search", "text_search_limit")):
            given, pair = getattr(tools.get(name), "limit_given", None), getattr(self, setting)
            if given is not None and pair is not None and given != pair and name not in self.tool_limits:
                raise ValueError(f"the {name} entry of tools sets limit: {given}, and rollout.{setting}: {pair} would "
                                 f"override it: set rollout.{setting}: null to keep the entry's, or give one value")  # fmt: skip

    def limit(self, spec: ToolSpec) -> int:
        """Most calls per episode of tool ``spec``."""
        pair = {"image_search": self.image_search_limit, "text_search": self.text_search_limit}
        if spec.name in self.tool_limits:
            return self.tool_limits[spec.name]
        return spec.limit if pair.get(spec.name) is None else pair[spec.name]


class Phase(Enum):
    GENERATE = "generate"
    CALL_TOOL = "call_tool"
    DONE = "done"


@dataclass
class Episode:
    """Mutable state of one trajectory while it is being rolled out."""

    sample: Sample
    key: str
    traj: Trajectory
    phase: Phase = Phase.GENERATE
    pending: ToolRequest | None = None
    needs_end_of_turn: bool = False

    def finish(self, reason: FinishReason) -> None:
        self.phase, self.traj.finish_reason = Phase.DONE, reason


class RolloutLoop:
    """Runs episodes for a batch of samples.

    Args:
        engine: generates tokens (``HFEngine``, ``VLLMEngine``, ``ScriptedEngine``).
        policy: tokenizer, chat format and image processing of the policy.
        prompts: the user-side texts; the loop keeps a copy bound to the declared tools (``for_tools``).
        tools: ``{name: tool}``: ``Tool`` objects (``mmsr.tools.spec``), whose specs declare the action grammar,
            or plain backends for ``image_search`` / ``text_search`` (MMSearch-R1's pair, both declared); a
            declared tool that is ``None`` answers with a failure.
        settings: episode limits; ``tool_limits`` naming a tool that is not among ``tools``' declared ones
            raises ValueError here.

    ``on_episode_end(trajectory, sample)``, when set, is called as each episode ends, while the others may
    still generate or wait on tools (``GRPOModule`` sets a reward's ``submit`` there: an LLM judge starts
    on an answer at once, ``mmsr.reward.judged``).
    """

    def __init__(self, engine: Engine, policy: Policy, prompts: PromptBuilder,
                 tools: Mapping[str, SearchTool | None], settings: RolloutSettings = RolloutSettings()) -> None:  # fmt: skip
        self.engine, self.policy, self.settings = engine, policy, settings
        self.tools = dict(tools)
        self.specs = declared(self.tools)
        self.prompts = prompts.for_tools(self.specs)  # round 1 describes the configured tools
        self._by_name = {spec.name: spec for spec in self.specs}
        settings.refuse_unknown_tools(list(self._by_name))  # before any rollout: a misspelt name limits nothing
        self.parse = parser_for(self.specs)
        self.stops = stop_strings(self.specs)
        self.encoder = policy.encoder()
        self.eot_ids = self.encoder.text(policy.chat.end_of_turn)
        self.stats = RolloutStats()
        self.on_episode_end: Callable[[Trajectory, Sample], None] | None = None
        self.runs = 0  # rollouts so far: each one's requests sample from streams of their own
        # a rollout's group shares its inputs (emptied when the rollout ends)
        self._images = ProcessedImages(policy)
        self._first: dict[int, tuple[Sample, list[int], list]] = {}  # id(sample) -> (sample, ids, vision)

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to draw the same tokens (checkpointed by ``GRPOModule``)."""
        return {"runs": self.runs}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.runs = state["runs"]

    def run(self, samples: Sequence[Sample], n: int, sampling: SamplingParams) -> list[Trajectory]:
        """``n`` episodes per sample; trajectory ``i*n + k`` is sample ``i``'s k-th (group ``i``)."""
        self.stats = RolloutStats(tool_calls=dict.fromkeys(self._by_name, 0))
        self.runs += 1
        episodes = [self._start(s, i, k) for i, s in enumerate(samples) for k in range(n)]
        for e in episodes:
            self._report_if_done(e)
        try:
            with ToolRunner() as runner:
                self._advance(episodes, sampling, runner, asyncio.Semaphore(self.settings.tool_concurrency))
        finally:
            self._images, self._first = ProcessedImages(self.policy), {}  # the images go with the trajectories
        self.stats.tool_busy_s = covered_seconds(self.stats.tool_spans)
        return [e.traj for e in episodes]

    def _advance(self, episodes: list[Episode], sampling: SamplingParams, runner: ToolRunner,
                 semaphore: asyncio.Semaphore) -> None:  # fmt: skip
        """Submit every ready episode's turn, step the engine, start the tool calls of the turns that
        ended, take back the episodes whose calls are done (or due: ``tool_rejoin_steps``), until every
        episode is done. An engine that steps (``IncrementalEngine``) hands each turn back as it ends, so
        its tool call starts while other turns still generate; any other engine generates each submission
        as one batch."""
        engine, sampling = incremental(self.engine), self._with_tool_stops(sampling)
        ready = [e for e in episodes if e.phase is Phase.GENERATE]
        turns: dict[str, Episode] = {}
        calls: dict[Future, Episode] = {}
        due: dict[Future, int] = {}  # the engine step after which a call's episode rejoins (tool_rejoin_steps)
        steps, lag = 0, self.settings.tool_rejoin_steps
        try:
            while ready or turns or calls:
                if ready:
                    turns |= zip(submitted(engine, [self._request(e) for e in ready], sampling, turns), ready)
                ended, steps = (self._step(engine, turns), steps + 1) if turns else ([], steps)
                started = {runner.submit(self._call_tool(e, semaphore)): e for e in ended if e.phase is Phase.CALL_TOOL}
                calls |= started
                if lag is not None:
                    due |= dict.fromkeys(started, steps + lag)
                ready = self._collect(calls, due if lag is not None else None, steps, block=not turns) if calls else []
        except BaseException:
            engine.cancel(list(turns))  # the engine must not keep generating for a rollout that failed
            raise

    def _with_tool_stops(self, sampling: SamplingParams) -> SamplingParams:
        """``sampling`` whose stop strings include the declared tools' closing tags."""
        stop = sampling.stop + tuple(s for s in self.stops if s not in sampling.stop)
        return sampling if stop == sampling.stop else replace(sampling, stop=stop)

    def _step(self, engine: IncrementalEngine, turns: dict[str, Episode]) -> list[Episode]:
        """One engine step: the episodes whose turn ended, each moved to its next phase."""
        start = time.perf_counter()
        finished = engine.step()
        self.stats.generate_s += time.perf_counter() - start
        if not isinstance(finished, (list, tuple)):
            raise ValueError(f"engine {engine_name(self.engine)}.step returned a {type(finished).__name__}, not a list "
                             "of (ticket, GenerationOutput)")  # fmt: skip
        ended = []
        for item in finished:
            episode, output = self._finished_turn(item, turns)
            ended.append(episode)
            self._on_generated(episode, output)
            self._report_if_done(episode)
        return ended

    def _finished_turn(self, item: object, turns: dict[str, Episode]) -> tuple[Episode, GenerationOutput]:
        """The episode and output of one ``(ticket, output)`` of an engine step, taken from ``turns``: a pair of
        another shape or ticket, or an output that is no ``GenerationOutput`` with a log-prob per token
        (``checked_output``), is a ValueError naming the engine (and the request), not an error deeper down."""
        pair = tuple(item) if isinstance(item, (tuple, list)) else ()
        if len(pair) != 2 or not isinstance(pair[0], Hashable) or pair[0] not in turns:
            raise ValueError(f"engine {engine_name(self.engine)}.step returned {item!r:.100}: not a (ticket, "
                             f"GenerationOutput) of one of the {len(turns)} requests in flight (each returned once)")  # fmt: skip
        episode = turns.pop(pair[0])
        return episode, checked_output(self.engine, episode.key, pair[1])

    def _collect(self, calls: dict[Future, Episode], due: dict[Future, int] | None, step: int, block: bool) -> list[Episode]:
        """The episodes that generate next, their calls observed. Without ``due``: every finished call
        (with ``block``, waiting for one if none is: nothing is generating). With ``due`` (engine step
        after which each call rejoins): the calls due by ``step``, or when nothing is generating
        (``block``) by the earliest due one, each waited for. A ``FatalToolError`` propagates (the runner
        cancels the other calls)."""
        start = time.perf_counter()
        if due is None:
            done, _ = wait(calls, timeout=None if block else 0, return_when=FIRST_COMPLETED)
            waited = block
        else:
            now = max(step, min(due[f] for f in calls)) if block else step
            due_now = [f for f in calls if due[f] <= now]
            done, _ = wait(due_now)
            waited = bool(due_now)
        if waited:
            self.stats.tools_s += time.perf_counter() - start
        ready = []
        for future in done:
            episode = calls.pop(future)
            if due is not None:
                del due[future]
            self._observe(episode, future.result())
            self._report_if_done(episode)
            if episode.phase is Phase.GENERATE:
                ready.append(episode)
        return sorted(ready, key=lambda e: e.key)  # a batch order that does not depend on timing

    def _report_if_done(self, e: Episode) -> None:
        if e.phase is Phase.DONE and self.on_episode_end is not None:
            self.on_episode_end(e.traj, e.sample)

    # -- states ------------------------------------------------------------------------------
    def _start(self, sample: Sample, group: int, k: int) -> Episode:
        ids, vision = self._first_context(sample)
        traj = Trajectory(sample.id, group, list(ids), [0] * len(ids), [0.0] * len(ids), list(vision), len(ids),
                          tools=self.specs)  # fmt: skip
        episode = Episode(sample, f"{sample.id}#{k}", traj)
        if len(ids) >= self.settings.max_context_tokens:
            # no room for even one sampled token: say why the episode has no turns
            traj.context.append(f"prompt of {len(ids)} tokens fills max_context_tokens={self.settings.max_context_tokens}: "
                                "no turn generated, the episode ends (truncated)")  # fmt: skip
            episode.finish("truncated")
        return episode

    def _first_context(self, sample: Sample) -> tuple[list[int], list]:
        """The first prompt's ids and the question image's input, made once per sample in a rollout."""
        if id(sample) not in self._first:
            image = sample.image if self.policy.is_vision else None
            vision = [self._question_image(sample, image)] if image is not None else []
            text = self.policy.chat.first_prompt(self.prompts.first_user_text(self._seen(sample)))
            self._first[id(sample)] = (sample, self.encoder.encode(text, [v.num_tokens for v in vision]), vision)
        return self._first[id(sample)][1:]

    def _question_image(self, sample: Sample, image) -> object:
        """The question image's vision input; an image the processor refuses raises ``ValueError`` naming the
        sample (the loaders refuse the shapes known to fail; a sample built in Python is not checked there)."""
        try:
            return self._images(image)
        except Exception as exc:  # noqa: BLE001 - whatever the processor raises, the last line names the sample
            raise ValueError(f"sample {sample.id!r}: the image processor refused its question image "
                             f"({image.width}x{image.height}): {type(exc).__name__}: {exc}") from exc

    def _request(self, e: Episode) -> GenerationRequest:
        room = self.settings.max_context_tokens - len(e.traj)
        budget = min(self.settings.max_tokens_per_turn, room)
        return GenerationRequest(tuple(e.traj.input_ids), tuple(e.traj.vision), e.key, len(e.traj.turns), budget, self.runs)

    def _on_generated(self, e: Episode, out: GenerationOutput) -> None:
        traj, start = e.traj, len(e.traj)
        traj.input_ids += out.token_ids
        traj.loss_mask += [1] * len(out.token_ids)
        traj.logprobs += out.logprobs
        self.stats.sampled_tokens += len(out.token_ids)
        text = self.encoder.decode(out.token_ids)
        action = self.parse(text) if out.finish != "length" else Invalid("turn truncated")
        traj.turns.append(Turn(text, action, (start, len(traj)), truncated=out.finish == "length"))
        # Not "finish != eos": a turn can end on an eos id other than the chat's end of turn (Qwen2.5-VL's
        # generation config adds <|endoftext|>), and the next user turn must still follow <|im_end|>.
        e.needs_end_of_turn = list(out.token_ids[-len(self.eot_ids) :]) != self.eot_ids
        if out.finish == "length" and self.settings.max_context_tokens - start < self.settings.max_tokens_per_turn:
            traj.context.append(f"turn {len(traj.turns)}: cut at the context limit after {len(out.token_ids)} tokens")
        self._transition(e, action, out)

    def _transition(self, e: Episode, action, out: GenerationOutput) -> None:
        if out.finish == "length":
            return e.finish("truncated")
        if isinstance(action, Answer):
            return e.finish("answer")
        if isinstance(action, Invalid):
            return e.finish("no_action")
        if len(e.traj.turns) >= self.settings.max_rounds:
            return e.finish("max_rounds")
        spec = self._by_name[action.tool]
        if e.traj.num_calls(spec.name) >= self.settings.limit(spec):
            return e.finish("search_limit")
        s = e.sample
        image = s.image if spec.with_image else None
        e.pending = ToolRequest(spec.name, action.arg, image, s.image_url, s.id, s.question, self.settings.tool_timeout_s,
                                self._seen_size(e.traj) if image is not None else None)  # fmt: skip
        e.phase = Phase.CALL_TOOL

    def _seen(self, sample: Sample) -> Sample:
        """``sample`` as the prompts show it: its question is data, so a marker or a chat token it spells stays text."""
        question = self.encoder.plain(quoted(sample.question))
        return sample if question == sample.question else replace(sample, question=question, image=sample.stored_image)

    def _readable(self, kind: str, result: ToolResult) -> ToolResult:
        """``result``, or a failure saying why the image processor refused one of its images (an aspect ratio
        over 200, a truncated file): a tool's bad image must not end the rollout."""
        try:
            for image in result.images if self.policy.is_vision else ():
                self._images(image, tool=self._thumbnails(kind))  # remembered: the observation's encoding reuses it
        except Exception as exc:  # noqa: BLE001 - whatever the processor raises, the model sees a failed call
            self.stats.tool_failures += result.ok
            return failure(kind, f"a returned image could not be read: {type(exc).__name__}: {exc}", result.latency_s)
        return result

    def _encode_observation(self, e: Episode, kind: str, result: ToolResult) -> tuple[list[int], list]:
        """The observation's token ids (``[n]``, images expanded) and its images' vision inputs. The result's
        text is from outside: a chat token it spells stays text (``Encoder.plain``)."""
        vision = [self._images(im, tool=self._thumbnails(kind)) for im in result.images] if self.policy.is_vision else []
        shown = replace(result, text=self.encoder.plain(result.text))
        text = self.policy.chat.observation(self.prompts.observation_text(self._seen(e.sample), self._by_name[kind], shown))
        ids = (self.eot_ids if e.needs_end_of_turn else []) + self.encoder.encode(text, [v.num_tokens for v in vision])
        return ids, vision

    def _thumbnails(self, kind: str) -> bool:
        """Whether tool ``kind``'s images are processed within the tool images' bounds (thumbnails): not a crop's
        regions (``ToolSpec.region_images``), which would otherwise show less detail than the question image."""
        return not self._by_name[kind].region_images

    def _fit(self, e: Episode, kind: str, result: ToolResult) -> tuple[ToolResult, list[int], list] | None:
        """``(shown, ids, vision)``: ``result`` as the context budget lets it in, whole if it fits (with
        ``fit_observations``: with a full turn's room after it), else (``fit_observations``) cut so a full turn
        still fits after it, or whole where even the shortest cut would not leave that room but the whole one
        fits; None: the episode ends. A cut or a drop is noted in ``Trajectory.context``."""
        room = self.settings.max_context_tokens - len(e.traj)
        ids, vision = self._encode_observation(e, kind, result)
        fitting = self.settings.fit_observations and room > self.settings.max_tokens_per_turn
        # fitting: whole only where a full turn still fits after it (else the next turn is cut and ends unanswered)
        limit = room - self.settings.max_tokens_per_turn if fitting else room - 1
        if len(ids) <= limit:
            return result, ids, vision
        shown = fit(result, lambda r: len(self._encode_observation(e, kind, r)[0]), limit) if fitting else None
        if shown is None and len(ids) < room:  # as without fitting: the episode goes on with what room is left
            return result, ids, vision
        e.traj.context.append(describe(len(e.traj.turns), kind, len(ids), limit, result, shown))
        return None if shown is None else (shown, *self._encode_observation(e, kind, shown))

    def _seen_size(self, traj: Trajectory) -> tuple[int, int] | None:
        """``(width, height)`` of the question image as the policy sees it: its patch grid times the patch size."""
        patch = getattr(self.policy.image_processor, "patch_size", None) if self.policy.is_vision else None
        if not traj.vision or patch is None:
            return None
        _, h, w = traj.vision[0].grid_thw
        return w * patch, h * patch

    async def _call_tool(self, e: Episode, semaphore: asyncio.Semaphore) -> ToolResult:
        request, tool = e.pending, self.tools.get(e.pending.kind)
        self.stats.tool_calls[request.kind] += 1
        async with semaphore:
            # timed from when the call may run: a wait behind ``tool_concurrency`` is no tool's latency, and a
            # span is when the tool ran (``tool_busy_s``, which calls queued behind others cover anyway)
            start = time.perf_counter()
            deadline = asyncio.timeout(self.settings.tool_timeout_s)
            try:
                result = await self._result(tool, request, deadline)
            except FatalToolError:
                raise
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # the rollout itself is cancelled (it failed, or is shutting down)
                # the tool cancelled a task of its own and let that escape: a tool bug like any other
                result = failure(request.kind, "the tool's call was cancelled")
            except Exception as exc:  # a tool bug must not kill the rollout: the model sees a failure
                # only our deadline "timed out after"; a tool's own TimeoutError (its HTTP client) says why
                ours = isinstance(exc, TimeoutError) and deadline.expired()
                why = f"timed out after {self.settings.tool_timeout_s:g} s" if ours else f"{type(exc).__name__}: {exc}"
                result = failure(request.kind, why)
        latency = time.perf_counter() - start
        self.stats.tool_failures += not result.ok
        self.stats.tool_latency_s.append(latency)
        self.stats.tool_spans.append((start, start + latency))
        # a tool's own latency wins (a cache replaying the recorded one) unless it is unset or nonsense (NaN,
        # inf, negative), which would reach the trajectory records
        kept = isinstance(result.latency_s, (int, float)) and 0 < result.latency_s < math.inf
        return result if kept else replace(result, latency_s=latency)

    @staticmethod
    async def _result(tool: SearchTool | None, request: ToolRequest, deadline: asyncio.Timeout) -> ToolResult:
        """``tool(request)`` within ``deadline``. Anything but a ``ToolResult`` back (a missing ``return``)
        raises TypeError, so the caller shows it as a failure like any other tool bug."""
        if tool is None:
            return failure(request.kind, f"no {request.kind} tool is configured")
        async with deadline:
            result = await tool(request)
        if not isinstance(result, ToolResult):
            raise TypeError(f"{type(tool).__name__} returned {type(result).__name__}, not a ToolResult")
        return result

    def _observe(self, e: Episode, result: ToolResult) -> None:
        request, traj = e.pending, e.traj
        e.pending = None
        result = self._readable(request.kind, result)
        fitted = self._fit(e, request.kind, result)
        traj.turns[-1].tool_call = ToolCall(request.kind, request.query, fitted[0] if fitted else result)
        if fitted is None:
            return e.finish("truncated")
        _, ids, vision = fitted
        traj.input_ids += ids
        traj.loss_mask += [0] * len(ids)
        traj.logprobs += [0.0] * len(ids)
        traj.vision += vision
        e.phase = Phase.GENERATE
