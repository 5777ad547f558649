"""The decode threads, under the request's deadline: the wait for a thread and the decode itself.

A request waits for a decode slot only until its deadline (then 504, and nothing is decoded for it). A
decode still running at the deadline cannot be interrupted (PIL holds the thread), so its request gets
504 at once and the decode is *isolated*: its slot goes back to the pool and the thread finishes on one
of ``spare`` extra threads, so a few slow images cannot hold normal requests behind them. When every spare
thread is taken by such overruns, an overrunning decode keeps its slot until it ends (memory stays bounded
by ``threads + spare`` decodes, each within the image limits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from service.exceptions import QueueTimeout

log = logging.getLogger("service.decode")
T = TypeVar("T")


class DecodePool:
    def __init__(self, threads: int, spare: int | None = None) -> None:
        self.threads = threads
        self.spare = threads if spare is None else spare
        self.executor = ThreadPoolExecutor(threads + self.spare, thread_name_prefix="evit-decode")
        self.free = threads  # slots not held by a decode (or by a waiter about to take one)
        self.overrunning = 0  # decodes past their request's deadline whose slot was given back
        self._waiters: deque[asyncio.Future[None]] = deque()  # FIFO

    async def run(self, fn: Callable[[bytes], T], data: bytes, deadline: float) -> T:
        """``fn(data)`` on a decode thread; 504 when a slot or the result does not come by ``deadline``
        (``time.monotonic()`` seconds)."""
        await self._acquire(deadline)
        if time.monotonic() >= deadline:  # nothing is started for a request already out of time
            self._release()
            raise QueueTimeout("the request's deadline or the request timeout passed before its image could be "
                           "decoded")
        future = self.executor.submit(fn, data)
        result = asyncio.wrap_future(future)
        result.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(result), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise QueueTimeout("the image could not be decoded within the request's deadline or the request "
                           "timeout") from None
        finally:
            if future.done():
                self._release()
            else:  # timed out or the request was cancelled: the thread is still busy
                self._detach(future)

    async def _acquire(self, deadline: float) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), max(deadline - time.monotonic(), 0.0))
        except BaseException as e:
            if waiter.done():  # a slot was handed over just as the request gave up: pass it on
                self._release()
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(e, TimeoutError):
                raise QueueTimeout("no decode thread became free within the request's deadline or the "
                               "request timeout") from None
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the oldest waiter
                return
        self.free += 1

    def _detach(self, future: ThreadFuture[T]) -> None:
        loop = asyncio.get_running_loop()
        if self.overrunning < self.spare:
            self.overrunning += 1
            self._release()  # the overrun runs on a spare thread from now on
            log.warning("a decode overran its request's deadline; isolated on a spare thread (%d of %d in use)",
                        self.overrunning, self.spare)
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._end_overrun))
        else:
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))

    def _end_overrun(self) -> None:
        self.overrunning -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _retrieve(future: asyncio.Future[object]) -> None:
    """Mark a late decode's error as seen (its request already has its answer)."""
    if not future.cancelled():
        future.exception()
