"""Micro-batching and admission control for the server.

Requests arrive one image at a time; the model is many times faster per image in batches (coatnet_tiny at
64 px on two CPU cores: 6.9 ms for one image, 3.5 ms per image in a batch of 64; onnxruntime 1.3 ms).
:class:`MicroBatcher` gathers what arrives within a short wait (``max_wait_ms``) into one model call of
at most ``max_batch`` images, on one worker thread, so the model never competes with itself for the cores.
:class:`Admission` bounds the requests in the server at once: past ``limit``, a request is answered 429
with ``Retry-After`` before its body is read, and the server keeps serving the others.

Written here because the serving libraries that batch (Triton, TorchServe, Ray Serve) are servers of
their own; medsight's server is one FastAPI process and needs only this queue.
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from medsight.errors import MedsightError, UsageError

__all__ = ["BatchSettings", "MicroBatcher", "Admission", "Ticket", "ServerBusyError"]


@dataclass(frozen=True)
class BatchSettings:
    """How the server gathers requests: ``enabled=False`` answers each request on its own (one model call
    per image, in the request's thread), as servers without batching do."""

    enabled: bool = True
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue_limit: int = 256  # requests inside the server at once (reading, decoding, waiting, running)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UsageError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise UsageError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms}")
        if self.queue_limit < 1:
            raise UsageError(f"queue_limit must be at least 1, got {self.queue_limit}")


class ServerBusyError(MedsightError, RuntimeError):
    """More requests than the server's queue limit: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


_STOP = object()


class MicroBatcher:
    """Run ``fn`` on batches of submitted items on one worker thread; ``submit`` returns a future.

    ``fn`` takes a list of items and returns one result per item, in order. The worker takes the first
    waiting item, then whatever else arrives within ``max_wait_ms`` (up to ``max_batch`` items), and
    calls ``fn`` once. An exception in ``fn`` goes to every future of that batch; the worker goes on.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32, max_wait_ms: float = 5.0,
                 name: str = "medsight-batcher") -> None:
        self.fn, self.max_batch, self.max_wait = fn, int(max_batch), max_wait_ms / 1000
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()
        self.batches = 0  # model calls made, and images in them: the mean batch size is images / batches
        self.images = 0

    def submit(self, item: Any) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((item, fut))
        return fut

    def close(self, timeout: float = 30.0) -> None:
        """Finish what was submitted, then stop the worker (idempotent)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _gather(self, first: Any) -> tuple[list[Any], bool]:
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            batch, stop = self._gather(first)
            futures = [f for _, f in batch]
            try:
                results = self.fn([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # noqa: BLE001 - handed to the callers, who answer with it
                for f in futures:
                    f.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(batch)
            for f, r in zip(futures, results):
                f.set_result(r)


class Ticket:
    """A place in the server (:meth:`Admission.ticket`); :meth:`release` gives it back (once, idempotent)."""

    __slots__ = ("_admission", "deadline", "released")

    def __init__(self, admission: Admission, deadline: float | None) -> None:
        self._admission, self.deadline, self.released = admission, deadline, False

    def release(self) -> None:
        self._admission._release(self)


class Admission:
    """At most ``limit`` requests inside at once; one more raises :class:`ServerBusyError` (no waiting).

    A place is a :class:`Ticket`. A request answered within its HTTP exchange gives its ticket back when it
    ends; a page call that Gradio queues gives it back when its function ends, or after ``hold_s`` seconds
    at the latest (a call cancelled or refused before its function runs never says so).
    ``Retry-After`` is the time the requests inside take at the recent rate (at least one second).
    """

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self._inside = 0
        self._held: set[Ticket] = set()  # tickets with a deadline
        self._lock = threading.Lock()
        self._rate = 0.0  # requests finished per second, smoothed
        self._last = time.monotonic()

    def ticket(self, hold_s: float | None = None) -> Ticket:
        """A place, or :class:`ServerBusyError`; with ``hold_s``, the place is given back after that long."""
        with self._lock:
            now = time.monotonic()
            for t in [t for t in self._held if t.deadline is not None and t.deadline <= now]:
                self._give_back(t, now)
            if self._inside >= self.limit:
                wait = math.ceil(self._inside / self._rate) if self._rate > 0 else 1
                raise ServerBusyError(f"the server is busy: {self._inside} requests are waiting (limit "
                                      f"{self.limit}); try again shortly", retry_after=max(1, min(wait, 60)))
            self._inside += 1
            t = Ticket(self, now + hold_s if hold_s is not None else None)
            if hold_s is not None:
                self._held.add(t)
            return t

    def _give_back(self, t: Ticket, now: float) -> None:
        t.released = True
        self._held.discard(t)
        self._inside -= 1
        dt, self._last = max(now - self._last, 1e-6), now
        self._rate = 0.9 * self._rate + 0.1 / dt if self._rate else 1 / dt

    def _release(self, t: Ticket) -> None:
        with self._lock:
            if not t.released:
                self._give_back(t, time.monotonic())

    @property
    def inside(self) -> int:
        return self._inside
