"""Pipelined frame streams: while chunk k is on the wire, chunk k+1 is being
encoded and chunk k-1 decoded, so moving n chunks tends to the slowest stage's
time rather than the sum of all three.

`pipelined_map` runs the encode stage: a worker thread works up to `depth`
chunks ahead of the consumer (the gRPC send). `PipelinedSink` runs the decode
stage: chunks go to a worker thread as they arrive, with at most `depth` queued,
so a slow decoder pushes back on the wire instead of buffering everything.
torch kernels and zstd release the GIL, so the stages overlap for real.
Each stage keeps its busy time (`StageClock`) for benchmarks and logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_DEPTH = 3


@dataclass
class StageClock:
    """Seconds a stage spent working, and on how many items."""

    busy_s: float = 0.0
    num_items: int = 0

    def timed(self, fn: Callable[[T], R]) -> Callable[[T], R]:
        def run(item: T) -> R:
            start = time.perf_counter()
            try:
                return fn(item)
            finally:
                self.busy_s += time.perf_counter() - start
                self.num_items += 1

        return run


async def _aiter_of(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def pipelined_map(
    items: Iterable[T] | AsyncIterable[T],
    fn: Callable[[T], R],
    *,
    depth: int = DEFAULT_DEPTH,
    clock: StageClock | None = None,
    name: str = "encode",
) -> AsyncIterator[R]:
    """fn(item) for each item, in order; up to `depth` results are computed ahead on
    a worker thread while the consumer handles earlier ones. Closing the iterator
    early drops the work not yet started."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    work = clock.timed(fn) if clock is not None else fn
    pool = ThreadPoolExecutor(1, thread_name_prefix=f"kv-{name}")
    pending: deque[Future[R]] = deque()
    source = _aiter_of(items)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < depth:
                try:
                    item = await anext(source)
                except StopAsyncIteration:
                    exhausted = True
                    break
                pending.append(pool.submit(work, item))
            if not pending:
                return
            yield await asyncio.wrap_future(pending.popleft())
    finally:
        for fut in pending:
            fut.cancel()
        # The item in progress may read memory its caller frees next: let it end.
        pool.shutdown(wait=True, cancel_futures=True)


class PipelinedSink(Generic[T]):
    """Applies fn to each item put, in order, on a worker thread; `put` waits only
    while `depth` items are queued. `close` waits for the rest and raises the first
    error (which also makes later `put`s raise)."""

    def __init__(
        self,
        fn: Callable[[T], object],
        *,
        depth: int = DEFAULT_DEPTH,
        clock: StageClock | None = None,
        name: str = "decode",
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._fn = clock.timed(fn) if clock is not None else fn
        self._depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"kv-{name}")
        self._pending: deque[Future[object]] = deque()

    async def put(self, item: T) -> None:
        while self._pending and (len(self._pending) >= self._depth or self._pending[0].done()):
            await asyncio.wrap_future(self._pending.popleft())  # raises a failed item's error
        self._pending.append(self._pool.submit(self._fn, item))

    async def close(self) -> None:
        try:
            while self._pending:
                await asyncio.wrap_future(self._pending.popleft())
        finally:
            self.abort()

    def abort(self) -> None:
        """Drops what has not started; the worker ends after its current item."""
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def discard(self) -> None:
        """Drops what has not started and waits for the item in progress (after
        this, nothing of the sink touches memory any more)."""
        self.abort()
        await asyncio.to_thread(self._pool.shutdown, wait=True)
