"""Tool calls on an event loop of their own, so they run while the engine generates.

The engine generates on the caller's thread (a GPU engine's CUDA device and state belong to it); the
tools are coroutines (HTTP clients, sleeps, caches) that need a running event loop. ``ToolRunner``
runs one in a background thread for the length of a rollout: the loop submits a tool call the moment
an episode asks for it and collects the result when it is done, while other episodes generate.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ToolRunner:
    """A background thread running an asyncio event loop (``with ToolRunner() as runner``)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="mmsr-tools", daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def __enter__(self) -> ToolRunner:
        self.thread.start()
        return self

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coro`` on the tools' loop; its result or exception arrives in the future, a
        ``KeyboardInterrupt`` or ``SystemExit`` the coroutine raises included (``_settle``). Cancelling the
        future does not cancel the call: leaving the runner does."""
        future: Future[T] = Future()
        asyncio.run_coroutine_threadsafe(_settle(coro, future), self.loop)
        return future

    def __exit__(self, *exc: object) -> None:
        """Cancel what is still running (a failed rollout), stop the loop and close it."""
        cancel = asyncio.run_coroutine_threadsafe(_cancel_others(), self.loop)
        cancel.result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


async def _settle(coro: Coroutine[Any, Any, T], future: Future[T]) -> None:
    """``coro``'s outcome into ``future``. ``run_coroutine_threadsafe`` alone lets a ``KeyboardInterrupt`` or
    ``SystemExit`` that a tool raises itself out of the task: it stops the tools' loop before the future hears
    of it, and the caller waits forever. Here it reaches the caller's thread like any other exception."""
    try:
        result = await coro
    except asyncio.CancelledError:
        future.cancel()
        raise
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt and SystemExit included, see above
        if future.set_running_or_notify_cancel():
            future.set_exception(exc)
    else:
        if future.set_running_or_notify_cancel():
            future.set_result(result)


async def _cancel_others() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
