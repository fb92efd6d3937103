"""Bounded submission: the one way work reaches the pool of upload streams.

The dispatching thread blocks while the queue is full (slots) or the file bytes
held in memory would pass their budget; a task's slot and bytes are released on
one path, when its future is done, whatever ended it. Model: s3transfer's
``BoundedExecutor`` and ``TaskSemaphore``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from .errors import ArchupError


class ByteBudget:
    """A counting semaphore over bytes: caps the file data held in memory at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._available = capacity
        self._cond = threading.Condition()

    @property
    def available(self) -> int:
        with self._cond:
            return self._available

    def acquire(self, count: int) -> int:
        count = min(count, self.capacity)  # a single oversized request waits for the whole budget
        with self._cond:
            self._cond.wait_for(lambda: self._available >= count)
            self._available -= count
        return count

    def release(self, count: int) -> None:
        with self._cond:
            self._available += count
            self._cond.notify_all()

    def ensure(self, capacity: int) -> None:
        """Grow to at least ``capacity``: a file whose part size had to grow (to stay within
        10,000 parts) still gets N parts in flight, so memory is about N x its part size."""
        with self._cond:
            if capacity > self.capacity:
                self._available += capacity - self.capacity
                self.capacity = capacity
                self._cond.notify_all()


class Reservation:
    """Bytes taken from a budget, given back exactly once."""

    def __init__(self, budget: ByteBudget, count: int) -> None:
        self._budget = budget
        self._count = budget.acquire(count) if count else 0

    def release(self) -> None:
        count, self._count = self._count, 0
        if count:
            self._budget.release(count)


class Dispatcher:
    """Runs tasks on ``parallel`` worker threads with bounded submission.

    A task that raises an ArchupError (a destination-wide error) or anything else (a bug)
    hands it to ``on_error``, which stops the batch instead of failing every file; nothing
    vanishes inside a future.
    """

    def __init__(self, parallel: int, budget_bytes: int, on_error: Callable[[ArchupError], None]) -> None:
        self.parallel = parallel
        self.budget = ByteBudget(budget_bytes)
        self._slots = threading.BoundedSemaphore(parallel * 2)
        self._on_error = on_error
        self._pool: ThreadPoolExecutor | None = None

    @contextmanager
    def running(self) -> Iterator[Dispatcher]:
        """A pool for one pass over the work; on leaving, every task submitted has ended."""
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="archup-upload") as pool:
            self._pool = pool
            try:
                yield self
            finally:
                self._pool = None  # the pool's exit below waits for what is in flight

    def reserve(self, count: int) -> Reservation:
        """Block until ``count`` bytes (at most the whole budget) may be held in memory."""
        return Reservation(self.budget, count)

    def submit(self, task: Callable[..., None], *args: object, reservation: Reservation | None = None) -> None:
        """Queue a task; blocks while the queue is full. ``reservation`` is released with the slot."""
        assert self._pool is not None, "submit() outside running()"
        try:
            self._slots.acquire()
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise

        def release(_: Future[None] | None = None) -> None:
            if reservation is not None:
                reservation.release()
            self._slots.release()

        try:
            future = self._pool.submit(self._guarded, task, *args)
        except BaseException:
            release()
            raise
        future.add_done_callback(release)

    def _guarded(self, task: Callable[..., None], *args: object) -> None:
        try:
            task(*args)
        except ArchupError as error:
            self._on_error(error)
        except Exception as error:  # a bug must stop the batch, never vanish inside a future
            self._on_error(ArchupError(f"internal error in an upload worker: {error!r}"))
