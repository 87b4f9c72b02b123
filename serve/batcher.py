"""Dynamic batching: requests that arrive together go through one model run, each getting its own rows.

The event loop only appends a request to a queue and awaits a future. One worker thread takes
the requests from the queue, joins their arrays into one batch of at most ``max_batch`` rows,
runs the model (onnxruntime releases the GIL) and hands all the results of that batch back to
the loop in a single call. The wait for more requests to join (``max_delay``, 500 us by default)
is timed in the worker thread: uvloop's timers have a resolution of whole milliseconds.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# (images, requests, queue seconds of each request, compute seconds) for each batch run
BatchHook = Callable[[int, int, list[float], float], None]


class QueueFull(Exception):
    """The queue holds ``max_queue`` images already: the request is refused at once (503)."""


class Stopped(Exception):
    """The batcher is shutting down and takes no new requests (503)."""


@dataclass
class _Pending:
    pixels: np.ndarray  # [n, ...] one request's rows
    future: asyncio.Future[np.ndarray]
    arrived: float  # time.perf_counter() when queued


class Batcher:
    """Joins concurrent requests into batches for ``run``.

    Args:
        run: The model: an array of ``n`` rows -> an array of ``n`` rows. Called from the worker
            thread only, one batch at a time.
        max_batch: Rows per ``run`` call, at most. A single request must not exceed it.
        max_delay: Seconds the oldest queued request may wait for others to join its batch.
        max_queue: Rows waiting in the queue, at most; past it `submit` raises `QueueFull`.
        on_batch: Called in the worker thread after each run (metrics).
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, max_delay: float,
                 max_queue: int, on_batch: BatchHook | None = None) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.queued = 0  # rows in the queue
        self.busy = 0  # requests handed to `submit` whose result has not been delivered yet
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker thread; results are delivered on ``loop``."""
        self._loop = loop
        self._thread = threading.Thread(target=self._work, name="bnpipe-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> asyncio.Future[np.ndarray]:
        """Queue one request's rows; await the returned future for its rows of the model's output.

        Call on the event loop. Raises `QueueFull` or `Stopped` at once instead of queueing, and
        ValueError for more rows than one batch holds (callers refuse those first: no run could take them).
        """
        n = len(pixels)
        if n > self.max_batch:
            raise ValueError(f"{n} rows do not fit a batch of at most {self.max_batch}")
        if self._stopping or self._loop is None:
            raise Stopped("the server is shutting down")
        if self.queued + n > self.max_queue:
            raise QueueFull(f"the queue is full ({self.queued} of {self.max_queue} images waiting)")
        future = self._loop.create_future()
        with self._cond:
            first = not self._queue
            self._queue.append(_Pending(pixels, future, time.perf_counter()))
            self.queued += n
            self.busy += 1
            # Wake the worker only when `_take` would stop waiting; otherwise its deadline does.
            # Each wake-up takes the GIL from this loop, which holds it while busy: a wake-up
            # per request made the worker queue for the GIL instead of running the batch.
            if first or self.queued >= self.max_batch or self._all_in_service_queued():
                self._cond.notify()
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is queued, then end the worker thread (waiting at most ``timeout`` seconds)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _all_in_service_queued(self) -> bool:
        """Every request handed to `submit` and not yet answered is in the queue: no other will join."""
        return self.busy <= len(self._queue)

    def _take(self) -> list[_Pending] | None:
        """Block until a batch is due; return its requests (None: stopped and drained)."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0].arrived + self.max_delay
            # Wait for others only while other requests are in service (busy > queued: their
            # clients will send again): a request alone, as at concurrency 1, runs at once.
            while self.queued < self.max_batch and not self._stopping and not self._all_in_service_queued():
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = []
            rows = 0
            while self._queue and rows + len(self._queue[0].pixels) <= self.max_batch:
                item = self._queue.popleft()
                rows += len(item.pixels)
                batch.append(item)
            self.queued -= rows
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            start = time.perf_counter()
            try:
                # [sum n_i, ...]: the requests' rows, in queue order
                pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([p.pixels for p in batch])
                out: np.ndarray | BaseException = self.run(pixels)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure, the worker lives
                out = exc
            done = time.perf_counter()
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._deliver, batch, out)
            if self.on_batch is not None and not isinstance(out, BaseException):
                self.on_batch(len(out), len(batch), [start - p.arrived for p in batch], done - start)

    def _deliver(self, batch: list[_Pending], out: np.ndarray | BaseException) -> None:
        """On the loop: give each request its own rows of ``out`` (or the failure)."""
        row = 0
        for item in batch:
            n = len(item.pixels)
            if not item.future.done():
                if isinstance(out, BaseException):
                    item.future.set_exception(out)
                else:
                    item.future.set_result(out[row:row + n])
            row += n
        self.busy -= len(batch)
        if self._queue and self._all_in_service_queued():  # nobody else will send: run now
            with self._cond:
                self._cond.notify()
