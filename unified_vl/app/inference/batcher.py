"""Dynamic batching: concurrent requests gathered into one model call, behind a bounded queue.

    batcher = DynamicBatcher(predictor.run, max_batch=16, max_wait_ms=10, max_queue=256)
    await batcher.start()
    result = await batcher.submit(query)     # raises QueueFullError when the queue is full
    await batcher.stop()

One gathering loop runs on the event loop: it takes the first waiting item, then keeps taking
items until it holds ``max_batch`` of them or ``max_wait_ms`` have passed since the first, and
hands the batch to ``run_batch`` in a single worker thread (the model is not thread-safe, and the
event loop must stay free to accept requests while the model runs). Items that arrive during a
model call wait in the queue and form the next batch, so batches grow with the load by
themselves (the "continuous" half of dynamic batching; Triton Inference Server's dynamic batcher
works the same way with ``max_queue_delay_microseconds``).

``run_batch(items) -> list[result | Exception]`` returns one entry per item, an exception for an
item that failed on its own; it groups items that can share a forward pass (same decoding mode
and options) itself, see :meth:`unified_vl.app.inference.predictor.Predictor.run`.

The queue is bounded: when it is full, :meth:`DynamicBatcher.submit` raises
:class:`QueueFullError` at once (the server answers 429) instead of letting the backlog and the
latency of every request grow without limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The request queue is full; retry later."""


class DynamicBatcher:
    """Gathers submitted items into batches and runs them in one worker thread.

    Args:
        run_batch: ``run_batch(items) -> list[result | Exception]``, one entry per item, called in
            the worker thread.
        max_batch: the most items in one call of ``run_batch``.
        max_wait_ms: how long the first item of a batch waits for others to join it.
        max_queue: the most items waiting; beyond it :meth:`submit` raises :class:`QueueFullError`.
        on_batch: called in the event loop with the size of each batch run (metrics).
        on_queue: called in the event loop with the queue depth whenever it changes (metrics).
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], list[Any]],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 10.0,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda size: None)
        self._on_queue = on_queue or (lambda depth: None)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def queue_depth(self) -> int:
        """Items waiting to be batched (not counting the batch being run)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Starts the gathering loop on the running event loop."""
        if self._task is not None:
            return
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="uvl-model")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="uvl-batcher")

    async def stop(self) -> None:
        """Stops the loop; items still queued fail with ``RuntimeError``."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        self._executor.shutdown(wait=True)
        self._task = self._executor = self._queue = None

    async def submit(self, item: Any) -> Any:
        """Queues ``item`` and waits for its result.

        Raises:
            QueueFullError: ``max_queue`` items are already waiting.
            RuntimeError: the batcher is not running.
            Exception: whatever ``run_batch`` returned for this item.
        """
        if self._queue is None:
            raise RuntimeError("the batcher is not running; call start() first")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later") from None
        self._on_queue(self._queue.qsize())
        return await future

    async def _gather(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            # Take what is already waiting without yielding, then wait out the rest of the window.
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        self._on_queue(self._queue.qsize())
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            # A client that went away cancelled its future: do not spend the model on it.
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            items = [item for item, _ in batch]
            self._on_batch(len(items))
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
            except asyncio.CancelledError:  # stop() during a model call: nobody may wait forever
                for _, future in batch:
                    if not future.done():
                        future.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as exc:  # the whole batch failed: every item gets the error
                logger.exception("batch of %d failed", len(items))
                results = [exc] * len(items)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
