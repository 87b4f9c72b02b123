"""The batcher as a unit: requests merge into one run, each gets exactly its own rows, limits hold."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from bnpipe.serve.batcher import Batcher, QueueFull, Stopped


class Recorder:
    """A model that doubles its input and records every batch; ``gate`` holds the first run."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        self.sizes.append(len(x))
        return x * 2


def run(coro_fn, *args):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro_fn(*args), 10))


def started(model: Callable[[np.ndarray], np.ndarray], max_batch: int, max_delay: float, max_queue: int) -> Batcher:
    """A batcher working for the running event loop."""
    batcher = Batcher(model, max_batch=max_batch, max_delay=max_delay, max_queue=max_queue)
    batcher.start(asyncio.get_running_loop())
    return batcher


def test_concurrent_requests_merge_and_each_gets_its_rows_in_order() -> None:
    model = Recorder()

    async def go() -> None:
        batcher = started(model, max_batch=64, max_delay=0.05, max_queue=256)
        model.gate.clear()  # the first request runs alone and blocks; the others queue up behind it
        first = batcher.submit(np.full((1, 3), 100))
        await asyncio.sleep(0.05)
        rows = [np.arange(n * 3).reshape(n, 3) + 1000 * i for i, n in enumerate([1, 4, 2, 7, 1, 3])]
        futures = [batcher.submit(r) for r in rows]
        model.gate.set()
        results = await asyncio.gather(first, *futures)
        batcher.stop()
        assert np.array_equal(results[0], np.full((1, 3), 200))
        for r, got in zip(rows, results[1:]):
            assert np.array_equal(got, r * 2)
        assert model.sizes == [1, 18]  # the six queued requests went through one run
        assert batcher.busy == 0 and batcher.queued == 0

    run(go)


def test_a_lone_request_does_not_wait_for_the_delay() -> None:
    model = Recorder()

    async def go() -> float:
        batcher = started(model, max_batch=64, max_delay=2.0, max_queue=256)
        t0 = time.perf_counter()
        await batcher.submit(np.ones((1, 3)))
        batcher.stop()
        return time.perf_counter() - t0

    assert run(go) < 1.0  # nothing else is in service: no reason to wait 2 s


def test_the_delay_lets_requests_join_and_batches_never_exceed_the_maximum() -> None:
    model = Recorder()

    async def go() -> None:
        batcher = started(model, max_batch=5, max_delay=0.2, max_queue=100)
        futures = [batcher.submit(np.ones((n, 2)) * n) for n in [2, 2, 2, 3, 1]]
        results = await asyncio.gather(*futures)
        batcher.stop()
        assert [len(r) for r in results] == [2, 2, 2, 3, 1]
        assert all(np.all(r == 2 * len(r)) for r in results)
        assert max(model.sizes) <= 5 and sum(model.sizes) == 10 and len(model.sizes) < 5

    run(go)


def test_full_queue_refuses_at_once_and_stop_drains() -> None:
    model = Recorder()

    async def go() -> None:
        batcher = started(model, max_batch=4, max_delay=0.0, max_queue=6)
        model.gate.clear()
        running = batcher.submit(np.ones((4, 1)))
        await asyncio.sleep(0.05)  # the worker holds it: the queue is empty again
        queued = [batcher.submit(np.ones((3, 1))), batcher.submit(np.ones((3, 1)))]
        with pytest.raises(QueueFull, match="6 of 6 images waiting"):
            batcher.submit(np.ones((1, 1)))
        model.gate.set()
        stop = asyncio.get_running_loop().run_in_executor(None, batcher.stop)
        results = await asyncio.gather(running, *queued)  # everything accepted is answered
        await stop
        assert [len(r) for r in results] == [4, 3, 3]
        with pytest.raises(Stopped):
            batcher.submit(np.ones((1, 1)))

    run(go)


def test_a_failing_model_fails_its_requests_and_the_worker_lives_on() -> None:
    calls = []

    def flaky(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return x

    async def go() -> None:
        batcher = started(flaky, max_batch=4, max_delay=0.0, max_queue=8)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(np.ones((1, 1)))
        assert np.array_equal(await batcher.submit(np.ones((2, 1))), np.ones((2, 1)))
        batcher.stop()

    run(go)


def test_the_worker_runs_at_once_when_every_request_in_service_is_queued() -> None:
    model = Recorder()

    async def go() -> float:
        batcher = started(model, max_batch=64, max_delay=2.0, max_queue=256)
        first = batcher.submit(np.ones((1, 3)))
        time.sleep(0.2)  # the loop is held: the worker has run `first`, whose answer is not delivered yet
        t0 = time.perf_counter()
        second = batcher.submit(np.ones((2, 3)))
        time.sleep(0.2)  # `first` still counts as in service: the worker waits for the delay
        await asyncio.gather(first, second)  # delivering `first` leaves only `second` in service
        elapsed = time.perf_counter() - t0
        batcher.stop()
        assert model.sizes == [1, 2]
        return elapsed

    assert run(go) < 1.0  # not the 2 s delay: no other client will send


def test_a_full_batch_runs_without_waiting_for_the_delay() -> None:
    model = Recorder()

    async def go() -> None:
        batcher = started(model, max_batch=4, max_delay=2.0, max_queue=256)
        model.gate.clear()
        first = batcher.submit(np.ones((1, 3)))
        await asyncio.sleep(0.05)  # the worker holds `first`
        queued = [batcher.submit(np.ones((1, 3))), batcher.submit(np.ones((1, 3)))]
        model.gate.set()
        time.sleep(0.2)  # the loop is held: `first` stays in service, so the worker waits for the delay
        queued.append(batcher.submit(np.ones((2, 3))))  # 4 rows: a full batch
        time.sleep(0.2)
        assert model.sizes == [1, 4]  # it ran before any answer was delivered, long before the 2 s
        await asyncio.gather(first, *queued)
        batcher.stop()

    run(go)


def test_more_rows_than_a_batch_are_refused_not_queued() -> None:
    async def go() -> None:
        batcher = started(Recorder(), max_batch=4, max_delay=0.0, max_queue=100)
        with pytest.raises(ValueError, match="5 rows do not fit a batch of at most 4"):
            batcher.submit(np.ones((5, 1)))
        assert batcher.queued == 0 and batcher.busy == 0
        batcher.stop()

    run(go)
