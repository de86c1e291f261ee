"""Batching of requests onto one synchronous, CPU- or GPU-bound engine (dynamic batches that
waiting requests can join while they run).

Contract:
- ``submit(key, payload)`` queues a job and returns it at once; ``await job.future`` gives its
  result. Jobs whose ``key`` is equal (same method, parameters and decoding mode) may share one
  call of ``run(key, payloads) -> results``; jobs with different keys never do.
- ``run(key, payloads, publish, admit)`` executes in ONE worker thread, one batch at a time, so the
  event loop stays free to accept, validate and answer requests while the engine works. It
  returns one result per payload, in order; an item that is an exception is raised to that
  job's waiter only, and an exception raised by ``run`` itself fails every job of the batch
  (but those already published). ``publish(i, result)``, callable from the worker thread, hands
  job ``i`` its final result at once, while the rest of the batch still runs (its waiter need
  not wait for the longest job); the result ``run`` returns for it later is then ignored.
- Joining (continuous batching): ``admit(n_live)``, passed to ``run`` and callable from the worker
  thread while the batch runs, moves waiting jobs with the batch's key into it, up to
  ``max_batch_size`` live jobs, and returns their payloads; ``run`` then returns results for the
  payloads it was given followed by the admitted ones, in that order. It admits only while the
  oldest waiting job has the batch's key, so a batch that keeps admitting cannot starve another
  key: once such a job waits, the batch drains and that job starts the next one.
- Order: the oldest waiting job picks the key of the next batch, which takes up to
  ``max_batch_size`` waiting jobs with that key, oldest first.
- Gathering: when the previous batch held more than one job (requests are arriving
  concurrently) and the queue cannot fill a batch yet, the worker waits up to ``batch_wait_s``
  for more to join: until the queue holds as many jobs as the previous batch and ``incoming()``
  (requests the server is still validating) is zero, or the batch is full. A lone sequential
  client never waits.
- Bounded: more than ``max_queue_size`` waiting jobs -> ``QueueFull`` (the server answers 429).
- Cancellation: ``cancel(job)`` drops a waiting job from the queue; a job already inside a running
  batch is marked (its future cancelled) and its result discarded; stopping its work is the
  ``run`` function's business (the chat server's ends the row at its next token).
- Shutdown: ``close()`` refuses new jobs (``ShuttingDown``), lets every queued and running job
  finish, then stops the worker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

Publish = Callable[[int, Any], None]
Admit = Callable[[int], list[Any]]
RunFn = Callable[[Hashable, list[Any], Publish, Admit], Sequence[Any]]


class QueueFull(Exception):
    """The queue holds ``max_queue_size`` jobs already."""


class ShuttingDown(Exception):
    """The batcher is closing and takes no new jobs."""


@dataclass(eq=False)
class Job:
    key: Hashable
    payload: Any
    future: asyncio.Future
    submitted: float = field(default_factory=time.monotonic)
    running: bool = False


@dataclass
class Stats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    batches: int = 0
    largest_batch: int = 0  # most jobs one batch ran, joined ones included
    joined: int = 0  # jobs that joined a running batch

    @property
    def mean_batch_size(self) -> float:
        return (self.completed + self.failed) / self.batches if self.batches else 0.0


class Batcher:
    """See the module docstring."""

    def __init__(self, run: RunFn, *, max_batch_size: int = 8, max_queue_size: int = 64,
                 batch_wait_s: float = 0.02, incoming: Callable[[], int] = lambda: 0) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or batch_wait_s < 0:
            raise ValueError(
                f"max_batch_size={max_batch_size}, max_queue_size={max_queue_size} must be >= 1 "
                f"and batch_wait_s={batch_wait_s} >= 0")
        self._run = run
        self._incoming = incoming
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.batch_wait_s = batch_wait_s
        self.stats = Stats()
        self._pending: list[Job] = []  # guarded by _lock (the worker thread admits from it)
        self._lock = threading.Lock()
        self._running: list[Job] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._last_batch = 0

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def closing(self) -> bool:
        return self._closing

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("Batcher.start() was called twice")
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="veridical-engine")
        self._task = asyncio.create_task(self._loop(), name="veridical-batcher")

    def submit(self, key: Hashable, payload: Any) -> Job:
        if self._task is None or self._wake is None:
            raise RuntimeError("Batcher.submit() before start()")
        if self._closing:
            self.stats.rejected += 1
            raise ShuttingDown("the server is shutting down and takes no new requests")
        if len(self._pending) >= self.max_queue_size:
            self.stats.rejected += 1
            raise QueueFull(f"the request queue is full ({self.max_queue_size} waiting); "
                            "retry after a short wait")
        job = Job(key, payload, asyncio.get_running_loop().create_future())
        with self._lock:
            self._pending.append(job)
        self.stats.submitted += 1
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The job's client went away: drop it if it is still waiting, else discard its result."""
        if job.future.done():
            return
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
        job.future.cancel()
        self.stats.cancelled += 1

    async def close(self) -> None:
        """Finish every queued and running job, then stop (idempotent)."""
        self._closing = True
        if self._task is None or self._wake is None:
            return
        self._wake.set()
        await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # The worker ---------------------------------------------------------------------------------
    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            await self._gather()
            batch = self._take()
            if not batch:
                continue
            self._running = batch
            self._last_batch = len(batch)
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))

            def publish(i: int, result: Any, batch: list[Job] = batch) -> None:
                loop.call_soon_threadsafe(_settle, batch[i].future, result)

            def admit(n_live: int, batch: list[Job] = batch) -> list[Any]:
                return [job.payload for job in self._admit(batch, n_live)]

            try:
                results = await loop.run_in_executor(self._executor, self._call, batch, publish,
                                                     admit)
            finally:
                self._running = []
            for job, result in zip(batch, results):
                failed = isinstance(result, BaseException)
                self.stats.failed += failed
                self.stats.completed += not failed
                _settle(job.future, result)  # unless published or cancelled already

    async def _gather(self) -> None:
        """Wait (bounded) for the jobs a concurrent load is about to send (module docstring)."""
        assert self._wake is not None
        if self.batch_wait_s <= 0 or self._last_batch <= 1:
            return
        deadline = time.monotonic() + self.batch_wait_s
        while not self._closing and len(self._pending) < self.max_batch_size:
            if len(self._pending) >= self._last_batch and self._incoming() == 0:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[Job]:
        """Up to max_batch_size waiting jobs with the oldest job's key, oldest first."""
        with self._lock:
            if not self._pending:
                return []
            return self._move(self._pending[0].key, self.max_batch_size)

    def _admit(self, batch: list[Job], n_live: int) -> list[Job]:
        """(worker thread) Waiting jobs that join the running ``batch`` (module docstring)."""
        with self._lock:
            room = self.max_batch_size - n_live
            if room <= 0 or not self._pending or self._pending[0].key != batch[0].key:
                return []
            joined = self._move(batch[0].key, room)
        batch.extend(joined)  # the running list is ``batch`` itself
        self.stats.joined += len(joined)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        return joined

    def _move(self, key: Hashable, limit: int) -> list[Job]:
        """Take up to ``limit`` waiting jobs with ``key``, oldest first (holding the lock)."""
        jobs = [j for j in self._pending if j.key == key][:limit]
        taken = set(map(id, jobs))
        self._pending = [j for j in self._pending if id(j) not in taken]
        for job in jobs:
            job.running = True
        return jobs

    def _call(self, batch: list[Job], publish: Publish, admit: Admit) -> list[Any]:
        """``run`` on the batch's payloads; one result per job, the joined ones included."""
        try:
            results = list(self._run(batch[0].key, [j.payload for j in batch], publish, admit))
        except Exception as exc:  # handed to the waiters, never lost
            logger.exception("batch of %d failed", len(batch))
            return [exc] * len(batch)
        if len(results) != len(batch):  # ``batch`` has grown by the jobs ``admit`` let in
            error = RuntimeError(f"run() returned {len(results)} results for {len(batch)} jobs")
            return [error] * len(batch)
        return results


def _settle(future: asyncio.Future, result: Any) -> None:
    """Give a job its result (an exception fails it) unless it has one or was cancelled."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
