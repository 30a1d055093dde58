"""`DynamicBatcher` on its own: batch sizes, waiting window, per-item errors, bounded queue."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from unified_vl.app.inference.batcher import DynamicBatcher, QueueFullError


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_items_are_gathered_up_to_max_batch():
    sizes, threads = [], set()

    def run_batch(items):
        threads.add(threading.get_ident())
        sizes.append(len(items))
        time.sleep(0.02)
        return [item * 10 for item in items]

    async def main():
        batcher = DynamicBatcher(run_batch, max_batch=4, max_wait_ms=50, max_queue=100)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        finally:
            await batcher.stop()

    assert _run(main()) == [i * 10 for i in range(10)]
    assert sizes == [4, 4, 2]
    assert threads and threading.get_ident() not in threads  # the model runs off the event loop


def test_a_lone_item_waits_at_most_max_wait_ms():
    async def main():
        batcher = DynamicBatcher(lambda items: items, max_batch=8, max_wait_ms=30)
        await batcher.start()
        start = time.monotonic()
        result = await batcher.submit("x")
        elapsed = time.monotonic() - start
        await batcher.stop()
        return result, elapsed

    result, elapsed = _run(main())
    assert result == "x" and 0.025 <= elapsed < 1.0


def test_an_item_that_fails_fails_alone_and_a_failed_batch_fails_all():
    def run_batch(items):
        if "crash" in items:
            raise RuntimeError("the model crashed")
        return [ValueError(f"bad {i}") if i == "bad" else i.upper() for i in items]

    async def main():
        batcher = DynamicBatcher(run_batch, max_batch=8, max_wait_ms=20)
        await batcher.start()
        try:
            mixed = await asyncio.gather(batcher.submit("good"), batcher.submit("bad"), return_exceptions=True)
            crashed = await asyncio.gather(batcher.submit("a"), batcher.submit("crash"), return_exceptions=True)
            after = await batcher.submit("ok")
        finally:
            await batcher.stop()
        return mixed, crashed, after

    mixed, crashed, after = _run(main())
    assert mixed[0] == "GOOD" and isinstance(mixed[1], ValueError)
    assert all(isinstance(e, RuntimeError) and "crashed" in str(e) for e in crashed)
    assert after == "OK"


def test_a_full_queue_refuses_at_once():
    release = threading.Event()

    def run_batch(items):
        release.wait(5)
        return items

    async def main():
        batcher = DynamicBatcher(run_batch, max_batch=1, max_wait_ms=0, max_queue=2)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # item 0 is in the model; the queue is empty again
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="queue is full"):
            await batcher.submit(3)
        release.set()
        results = await asyncio.gather(running, *waiting)
        await batcher.stop()
        return results

    assert _run(main()) == [0, 1, 2]


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_wait_ms": -1}, {"max_queue": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DynamicBatcher(lambda items: items, **kwargs)
