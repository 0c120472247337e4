"""A faulty tool (a wrong return value, its own cancellation or timeout, a nonsense latency) costs one failed
observation, never the rollout, and the loss mask stays exact around it. A tool that raises
``KeyboardInterrupt`` or ``SystemExit`` ends the rollout with it, never hangs it."""

import asyncio
import math
import threading

import pytest

from mmsr.rollout.engine import SamplingParams
from mmsr.tools.base import FatalToolError, ToolResult
from tests.rollout.test_loop import ANS, TXT, make_loop, spans


def run_one(policy, sample, text_tool):
    """One episode that searches once then answers, with ``text_tool``: ``(trajectory, loop)``."""
    loop, _ = make_loop(policy, {f"{sample.id}#0": [TXT, ANS]}, text=text_tool)
    (traj,) = loop.run([sample], 1, SamplingParams())
    assert traj.finish_reason == "answer" and spans(traj.loss_mask) == [t.span for t in traj.turns]
    return traj, loop


class Returns:
    """A tool with a bug: it returns ``value`` (``None`` is a missing ``return``)."""

    def __init__(self, value):
        self.value = value

    async def __call__(self, request):
        return self.value


@pytest.mark.parametrize("value", [None, "plain text", {"text": "x"}])
def test_a_tool_that_returns_no_tool_result_fails_its_call_only(tiny_policy, fvqa_samples, value):
    traj, loop = run_one(tiny_policy, fvqa_samples[0], Returns(value))
    result = traj.turns[0].tool_call.result
    assert not result.ok and f"TypeError: Returns returned {type(value).__name__}, not a ToolResult" in result.text
    assert loop.stats.tool_failures == 1


class CancelsItsHelper:
    """Gives up on a helper task of its own (a hedged request) and lets its CancelledError out."""

    async def __call__(self, request):
        helper = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        helper.cancel()
        await helper
        return ToolResult("never")


def test_a_tools_own_cancelled_error_fails_its_call_only(tiny_policy, fvqa_samples):
    traj, loop = run_one(tiny_policy, fvqa_samples[0], CancelsItsHelper())
    result = traj.turns[0].tool_call.result
    assert not result.ok and "the tool's call was cancelled" in result.text and loop.stats.tool_failures == 1


def test_a_failed_rollout_still_cancels_the_calls_in_flight(tiny_policy, fvqa_samples):
    """The rollout's own cancellation (here: another call's FatalToolError) is not a tool failure."""
    fatal, slow = fvqa_samples[0], fvqa_samples[1]

    class Tool:
        cancelled = False

        async def __call__(self, request):
            if request.sample_id == fatal.id:
                raise FatalToolError("replay-only cache has no entry")
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                Tool.cancelled = True
                raise
            return ToolResult("never")

    loop, _ = make_loop(tiny_policy, {f"{s.id}#0": [TXT, ANS] for s in (fatal, slow)}, text=Tool())
    with pytest.raises(FatalToolError, match="replay-only"):
        loop.run([fatal, slow], 1, SamplingParams())
    assert Tool.cancelled and loop.stats.tool_failures == 0


def test_a_tools_own_timeout_error_keeps_its_message(tiny_policy, fvqa_samples):
    class HttpTimeout:
        async def __call__(self, request):
            raise TimeoutError("connect to search.example timed out")

    traj, _ = run_one(tiny_policy, fvqa_samples[0], HttpTimeout())
    text = traj.turns[0].tool_call.result.text
    assert "TimeoutError: connect to search.example timed out" in text and "timed out after" not in text


@pytest.mark.parametrize("latency", [math.nan, math.inf, -1.0])
def test_a_nonsense_tool_latency_is_replaced_by_the_measured_one(tiny_policy, fvqa_samples, latency):
    class Latency:
        async def __call__(self, request):
            result = ToolResult("[Text Search Results]\n1. a page", latency_s=1.0)
            object.__setattr__(result, "latency_s", latency)  # past any check ToolResult may make
            return result

    traj, loop = run_one(tiny_policy, fvqa_samples[0], Latency())
    result = traj.turns[0].tool_call.result
    assert result.ok and result.latency_s == loop.stats.tool_latency_s[0] and 0 < result.latency_s < 5


def test_a_tools_own_latency_is_kept(tiny_policy, fvqa_samples):
    """A cache replays the latency it recorded; the loop's measure (a lookup) would understate it."""

    class Replayed:
        async def __call__(self, request):
            return ToolResult("[Text Search Results]\n1. a page", latency_s=7.5)

    traj, _ = run_one(tiny_policy, fvqa_samples[0], Replayed())
    assert traj.turns[0].tool_call.result.latency_s == 7.5


class Raises:
    """A tool that raises ``exc`` itself (a library's ``sys.exit``, a stray ``KeyboardInterrupt``), not Ctrl-C,
    which reaches the main thread."""

    def __init__(self, exc: type[BaseException]) -> None:
        self.exc = exc

    async def __call__(self, request):
        await asyncio.sleep(0.01)
        raise self.exc


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_a_tools_own_keyboard_interrupt_or_system_exit_ends_the_rollout_with_it(tiny_policy, fvqa_samples, exc):
    """It used to stop the tools' event loop before the call's future heard of it: the rollout waited forever."""
    sample, raised = fvqa_samples[0], []
    loop, _ = make_loop(tiny_policy, {f"{sample.id}#0": [TXT, ANS]}, text=Raises(exc))

    def rollout():
        try:
            loop.run([sample], 1, SamplingParams())
        except BaseException as e:  # noqa: BLE001 - the exception under test
            raised.append(e)

    caller = threading.Thread(target=rollout, daemon=True)  # a hang fails the test instead of the test run
    caller.start()
    caller.join(timeout=20)
    assert not caller.is_alive(), "the rollout hangs"
    assert [type(e) for e in raised] == [exc]
    assert not [t for t in threading.enumerate() if t.name == "mmsr-tools"]  # the runner's thread was joined


def test_a_question_image_the_processor_refuses_names_the_sample(tiny_policy, fvqa_samples):
    """A sample built in Python (the loaders refuse such images) whose image the processor refuses ends the
    rollout with an error naming the sample, not the processor's bare ``aspect ratio`` line."""
    from dataclasses import replace

    from PIL import Image

    banner = replace(fvqa_samples[0], id="banner-row", image=Image.new("RGB", (2000, 8), "red"))
    loop, _ = make_loop(tiny_policy, {"banner-row#0": [ANS]})
    with pytest.raises(ValueError, match=r"sample 'banner-row': the image processor refused its question image \(2000x8\)"):
        loop.run([banner], 1, SamplingParams(max_tokens=64))
