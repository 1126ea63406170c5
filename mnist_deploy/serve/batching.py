"""A dynamic batcher with Triton's semantics, for an asyncio server.

Requests that wait at the same time are concatenated into one model call and each caller gets its
own rows back. The rules are those of Triton's dynamic batcher (``dynamic_batching`` in a model's
``config.pbtxt``):

- Requests join a batch in arrival order, up to ``max_batch_size`` rows. A request larger than
  ``max_batch_size`` runs alone (it is never split, and never blocks the queue behind it longer
  than its own call).
- A batch is dispatched as soon as it is full: it holds ``max_batch_size`` rows, the next request
  does not fit, or it reaches the largest preferred size.
- Otherwise it waits until the oldest request has waited ``max_queue_delay_us``; then, when
  preferred sizes are given and the queued rows reach one of them, the batch is cut at the largest
  preferred size reached, else everything queued (up to ``max_batch_size``) goes. With a delay of 0
  nothing waits: whatever is queued when the scheduler runs is taken.
- One model call runs at a time (one Triton model instance); requests that arrive while it runs
  form the next batch, so batches grow with the load on their own, even with no delay.
- If the model call raises, every caller in that batch gets the exception, and nobody else.
  Validation happens before :meth:`DynamicBatcher.infer`, so a bad request never reaches a batch.

The model call runs inline on the event loop by default; ``run_in_thread=True`` moves it to one
worker thread. Measured (benchmarks/bench_batching.py, 2 shared CPUs, MLP on ONNX Runtime with one
thread, a 10 us call at batch 1): inline served 22,800 calls/s to one caller against 8,500 through
the thread (p99 58 us against 2.5 ms), 92,000 against 55,000 at 16 callers and 103,000 against
88,000 at 64; with 250 us of simulated request work per call on the loop the two tie (0.98-1.04x).
The hop costs more than the call it moves: waking the worker, the GIL hand-over and waking the
loop again are each slower than 10 us, and while the model runs there is nothing else for this
process's loop to do on a saturated machine anyway. A thread pays off only when one call is long
(a big model, or large batches on a slow runtime) and the loop has other work to overlap with it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import BatcherClosed

__all__ = ["BatcherClosed", "DynamicBatcher", "PassThrough", "make_batcher"]

_log = logging.getLogger(__name__)


class PassThrough:
    """The batcher's interface with batching off (a batch of one request): :meth:`infer` is one direct
    call of ``fn``, inline, with no queue and no task. The server has one request path either way."""

    max_batch_size = 1

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.fn = fn
        self._closing = False

    async def infer(self, x: np.ndarray) -> np.ndarray:
        if self._closing:
            raise BatcherClosed("the server is shutting down; the request was not run")
        return self.fn(x)

    async def close(self, *, drain: bool = True) -> None:
        self._closing = True


def make_batcher(fn: Callable[[np.ndarray], np.ndarray], *, max_batch_size: int, max_queue_delay_us: int = 0,
                 preferred_batch_sizes: Sequence[int] = (),
                 on_batch: Callable[[int, list[float]], None] | None = None) -> DynamicBatcher | PassThrough:
    """A :class:`DynamicBatcher` when ``max_batch_size`` > 1, else a :class:`PassThrough`."""
    if max_batch_size <= 1:
        return PassThrough(fn)
    return DynamicBatcher(fn, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                          preferred_batch_sizes=preferred_batch_sizes, on_batch=on_batch)


@dataclass(eq=False)
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float  # loop.time()

    @property
    def rows(self) -> int:
        return len(self.x)


class DynamicBatcher:
    """Batch concurrent :meth:`infer` calls into calls of ``fn`` (float32 rows in, rows out).

    ``on_batch(batch_rows, queue_seconds_per_request)`` is called after each dispatch, for metrics;
    it must not raise (an exception there is logged and otherwise ignored). The batcher belongs to
    the event loop of its first :meth:`infer` call.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], *, max_batch_size: int, max_queue_delay_us: int,
                 preferred_batch_sizes: Sequence[int] = (),
                 on_batch: Callable[[int, list[float]], None] | None = None,
                 run_in_thread: bool = False) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
        preferred = sorted(set(int(p) for p in preferred_batch_sizes))
        if preferred and not (1 <= preferred[0] and preferred[-1] <= max_batch_size):
            raise ValueError(f"preferred batch sizes must lie in 1..{max_batch_size}, got {preferred}")
        self.fn = fn
        self.max_batch_size = int(max_batch_size)
        self.max_queue_delay_us = int(max_queue_delay_us)
        self.preferred_batch_sizes = tuple(preferred)
        self.on_batch = on_batch
        self.run_in_thread = run_in_thread
        self._delay = max_queue_delay_us / 1e6
        self._full_at = preferred[-1] if preferred else self.max_batch_size
        self._queue: deque[_Pending] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._drain = True

    # -- callers ------------------------------------------------------------------------------

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """Run ``x`` ((n, ...) rows of one request) in the next batch; return its own n output rows."""
        if self._closing:
            raise BatcherClosed("the batcher is closed; the request was not run")
        if x.ndim < 1 or len(x) == 0:
            raise ValueError(f"infer needs a batch of at least one row, got shape {x.shape}")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._task = loop.create_task(self._schedule(), name="DynamicBatcher")
        elif self._loop is not loop:
            raise RuntimeError("a DynamicBatcher is bound to the event loop of its first infer call")
        item = _Pending(x, loop.create_future(), loop.time())
        self._queue.append(item)
        self._wake()
        return await item.future

    async def close(self, *, drain: bool = True) -> None:
        """Stop taking requests. ``drain=True`` runs what is queued now (without waiting for the delay);
        ``drain=False`` fails it with :class:`BatcherClosed`. Returns once the scheduler has stopped."""
        self._closing = True
        self._drain = self._drain and drain
        if self._task is not None:
            self._wake()
            await asyncio.shield(self._task)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- the scheduler ------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _sleep(self, seconds: float | None) -> None:
        """Wait for a new request, close(), or ``seconds`` (None: no time limit)."""
        loop = self._loop
        self._wakeup = loop.create_future()
        timer = loop.call_later(seconds, self._wake) if seconds is not None else None
        try:
            await self._wakeup
        finally:
            if timer is not None:
                timer.cancel()
            self._wakeup = None

    def _prefix(self) -> tuple[int, int, bool]:
        """(requests, rows) of the batch the queue's head would form now, and whether it is full."""
        count = rows = 0
        for item in self._queue:
            if count and rows + item.rows > self.max_batch_size:
                return count, rows, True  # the next request does not fit
            count += 1
            rows += item.rows
            if rows >= self._full_at:
                return count, rows, True
        return count, rows, False

    def _cut_at_preferred(self, count: int) -> int:
        """How many of the first ``count`` requests to send when the delay ran out: the longest run
        whose rows equal a preferred size (the largest such), else all ``count``."""
        best, rows = 0, 0
        for i, item in enumerate(self._queue):
            if i == count:
                break
            rows += item.rows
            j = bisect.bisect_left(self.preferred_batch_sizes, rows)
            if j < len(self.preferred_batch_sizes) and self.preferred_batch_sizes[j] == rows:
                best = i + 1
        return best or count

    async def _schedule(self) -> None:
        try:
            while True:
                while self._queue and self._queue[0].future.done():  # cancelled while waiting
                    self._queue.popleft()
                if not self._queue:
                    if self._closing:
                        return
                    await self._sleep(None)
                    continue
                if self._closing and not self._drain:
                    self._fail_all(BatcherClosed("the batcher was closed before the request ran"))
                    continue
                count, _rows, full = self._prefix()
                if not (full or self._delay == 0 or self._closing):
                    waited = self._loop.time() - self._queue[0].enqueued
                    if waited < self._delay:
                        await self._sleep(self._delay - waited)
                        continue
                    if self.preferred_batch_sizes:
                        count = self._cut_at_preferred(count)
                await self._dispatch([self._queue.popleft() for _ in range(count)])
        except BaseException as exc:  # never leave a caller waiting on a dead scheduler
            self._fail_all(exc if isinstance(exc, Exception) else BatcherClosed("the batcher was stopped"))
            raise

    def _fail_all(self, exc: BaseException) -> None:
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(exc)

    async def _dispatch(self, batch: list[_Pending]) -> None:
        batch = [item for item in batch if not item.future.done()]
        if not batch:
            return
        now = self._loop.time()
        x = batch[0].x if len(batch) == 1 else np.concatenate([item.x for item in batch])
        try:
            if self.run_in_thread:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")
                y = await self._loop.run_in_executor(self._executor, self.fn, x)
            else:
                y = self.fn(x)
            if len(y) != len(x):
                raise RuntimeError(f"the model returned {len(y)} rows for a batch of {len(x)}")
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            start = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(y[start:start + item.rows])
                start += item.rows
        if self.on_batch is not None:
            try:
                self.on_batch(len(x), [now - item.enqueued for item in batch])
            except Exception:
                _log.exception("on_batch callback failed")
