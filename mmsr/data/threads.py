"""Per-item work on a thread pool, in input order: for work that releases the GIL (Pillow decodes and
encodes images without it), so a machine's cores share it while the results keep their order.

Checking every image of a 4,800-row parquet file by decoding it took 2.4 s on one core of a 2-core
machine and 1.55 s on both; building the CPU demo's world (~6,100 PNGs) 17.9 s and 10.4 s.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def worker_threads(most: int = 8) -> int:
    """A thread per core, at most ``most`` (on a many-core node a few already keep up with the reader)."""
    return max(1, min(most, os.cpu_count() or 1))


def in_order(fn: Callable[[T], R], items: Iterable[T], window: int = 64) -> Iterator[Future[R]]:
    """``fn(item)`` of every item on ``worker_threads()`` threads, as futures in input order.

    ``items`` is iterated in the calling thread, in order (a seeded generator draws in sequence), at
    most ``window`` items ahead of the caller: only those are held at once. An error raised by ``items``
    itself comes after the futures of the items before it, as a plain loop would meet it.
    """
    with ThreadPoolExecutor(worker_threads()) as pool:
        pending: deque[Future[R]] = deque()
        iterator, error = iter(items), None
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - re-raised below, in its place in the order
                error = exc
                break
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
        if error is not None:
            raise error
