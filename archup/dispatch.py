"""Bounded submission: the one way work reaches the pool of upload streams.

Two pools: ``parallel`` upload streams, and a few file readers (one per multipart file
being read, :mod:`archup.multipart`), which feed the streams. A submitter blocks while
the queue is full (slots) or the file bytes held in memory would pass their budget; a
task's slot and bytes are released on one path, when its future is done, whatever ended
it. Part bodies are read into pooled buffers (:class:`PartBuffer`) that count against
the same budget. Model: s3transfer's ``BoundedExecutor`` and ``TaskSemaphore``.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from .errors import ArchupError


class ByteBudget:
    """A counting semaphore over bytes: caps the file data held in memory at once.

    Bytes go to the waiter with the lowest ticket first (the file dispatched earliest), so
    with several large files read at once the oldest one takes the streams whenever its
    reader asks, and the others fill in while it reads and hashes. Files then finish one
    after another, and each CompleteMultipartUpload (slow where the server joins the parts)
    overlaps the next file's parts instead of all of them queueing at the end."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._available = capacity
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int]] = []  # a heap of (ticket, unique id) of the waiters
        self._ids = itertools.count()
        self._tickets = itertools.count()

    @property
    def available(self) -> int:
        with self._cond:
            return self._available

    def waiting_count(self, at_least: int, timeout: float) -> bool:
        """Block until ``at_least`` acquirers are waiting (for tests and diagnostics)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._waiting) >= at_least, timeout)

    def ticket(self) -> int:
        """A place in line: earlier tickets are served first."""
        return next(self._tickets)

    def acquire(self, count: int, ticket: int | None = None) -> int:
        count = min(count, self.capacity)  # a single oversized request waits for the whole budget
        with self._cond:
            entry = (self.ticket() if ticket is None else ticket, next(self._ids))
            heapq.heappush(self._waiting, entry)
            self._cond.notify_all()  # (lets a watcher see the line grow: waiting_count)
            try:
                self._cond.wait_for(lambda: self._waiting[0] == entry and self._available >= count)
                self._available -= count
            finally:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
                self._cond.notify_all()  # the next in line may be served now
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

    def __init__(self, budget: ByteBudget, count: int, ticket: int | None = None) -> None:
        self._budget = budget
        self._count = budget.acquire(count, ticket) if count else 0

    def release(self) -> None:
        count, self._count = self._count, 0
        if count:
            self._budget.release(count)


class BufferPool:
    """Part buffers to ``readinto``, reused: a new 8 MiB bytearray per part costs its page
    faults and zeroing on every part. Free buffers are kept while free plus lent bytes stay
    within the budget's capacity, so the pool never holds more than the budget allows."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self._free: dict[int, list[bytearray]] = {}
        self._free_bytes = 0
        self._lent = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        with self._lock:
            self._lent += size
            kept = self._free.get(size)
            if kept:
                self._free_bytes -= size
                return kept.pop()
        return bytearray(size)

    def give_back(self, buffer: bytearray) -> None:
        size = len(buffer)
        with self._lock:
            self._lent -= size
            if self._free_bytes + self._lent + size <= self._budget.capacity:
                self._free.setdefault(size, []).append(buffer)
                self._free_bytes += size


class PartBuffer(Reservation):
    """A reservation that lends a buffer of exactly the reserved size; both go back on release."""

    def __init__(self, budget: ByteBudget, pool: BufferPool, size: int, ticket: int | None = None) -> None:
        super().__init__(budget, size, ticket)
        self._pool = pool
        self.data: bytearray | None = pool.take(size)

    def release(self) -> None:
        data, self.data = self.data, None
        if data is not None:
            self._pool.give_back(data)
        super().release()


class Dispatcher:
    """Runs tasks on ``parallel`` worker threads with bounded submission.

    A task that raises an ArchupError (a destination-wide error) or anything else (a bug)
    hands it to ``on_error``, which stops the batch instead of failing every file; nothing
    vanishes inside a future.
    """

    def __init__(self, parallel: int, budget_bytes: int, on_error: Callable[[ArchupError], None], *,
                 readers: int = 1) -> None:
        self.parallel = parallel
        self.budget = ByteBudget(budget_bytes)
        self._buffers = BufferPool(self.budget)
        self._slots = threading.BoundedSemaphore(parallel * 2)
        # The upload streams themselves: a pool task holds one while it runs, a hold() from
        # when it is taken until it is given back, so no more than ``parallel`` requests are
        # out at once, whichever way they were sent.
        self._streams = threading.BoundedSemaphore(parallel)
        self._reader_slots = threading.BoundedSemaphore(readers)
        self._readers = readers
        self._on_error = on_error
        self._pool: ThreadPoolExecutor | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._held = 0  # slots held by work that runs on no pool thread (asynchronous PUTs)
        self._held_cond = threading.Condition()

    @contextmanager
    def running(self) -> Iterator[Dispatcher]:
        """The pools for one pass over the work; on leaving, every task submitted has ended
        (the readers first: they are what submits the streams' parts), and every hold()
        was given back."""
        try:
            with ThreadPoolExecutor(self.parallel, thread_name_prefix="archup-upload") as pool:
                self._pool = pool
                try:
                    with ThreadPoolExecutor(self._readers, thread_name_prefix="archup-read") as readers:
                        self._reader_pool = readers
                        try:
                            yield self
                        finally:
                            self._reader_pool = None  # the exit waits for the readers in flight
                finally:
                    self._pool = None  # the pool's exit below waits for the parts in flight
        finally:
            with self._held_cond:  # and for the asynchronous PUTs still out
                self._held_cond.wait_for(lambda: self._held == 0)

    def reserve(self, count: int) -> Reservation:
        """Block until ``count`` bytes (at most the whole budget) may be held in memory."""
        return Reservation(self.budget, count)

    def buffer(self, size: int, ticket: int | None = None) -> PartBuffer:
        """Block until ``size`` bytes may be held (served in ticket order); a pooled buffer of
        exactly that size to read into."""
        return PartBuffer(self.budget, self._buffers, size, ticket)

    def submit(self, task: Callable[..., None], *args: object, reservation: Reservation | None = None) -> None:
        """Queue a task on the upload streams; blocks while the queue is full. ``reservation`` is
        released with the slot."""
        assert self._pool is not None, "submit() outside running()"
        self._queue(self._pool, self._slots, task, args, reservation)

    def hold(self, size: int) -> Callable[[], None]:
        """One of the ``parallel`` upload streams and ``size`` bytes of the budget, for work
        that runs on no pool thread (a PUT the CRT sends and calls back from); blocks until
        both are free.
        The callable gives both back (once; later calls do nothing). Leaving running()
        waits until every hold is given back."""
        # The bytes first, then the stream: the order a part takes them in (its reader holds
        # its buffer before the part waits for a stream). A stream held while waiting for
        # bytes would wait for the very parts that cannot start without it.
        reservation = self.reserve(size)
        try:
            self._streams.acquire()
        except BaseException:
            reservation.release()
            raise
        with self._held_cond:
            self._held += 1
        released = False
        lock = threading.Lock()

        def release() -> None:
            nonlocal released
            with lock:
                if released:
                    return
                released = True
            reservation.release()
            self._streams.release()
            with self._held_cond:
                self._held -= 1
                if self._held == 0:
                    self._held_cond.notify_all()

        return release

    def read(self, task: Callable[..., None], *args: object) -> None:
        """Run a file's reader on the reader pool; blocks while every reader is busy."""
        assert self._reader_pool is not None, "read() outside running()"
        self._queue(self._reader_pool, self._reader_slots, task, args, None, stream=False)

    def _queue(self, pool: ThreadPoolExecutor, slots: threading.BoundedSemaphore, task: Callable[..., None],
               args: tuple[object, ...], reservation: Reservation | None, *, stream: bool = True) -> None:
        try:
            slots.acquire()
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise

        def release(_: Future[None] | None = None) -> None:
            if reservation is not None:
                reservation.release()
            slots.release()

        try:
            future = pool.submit(self._guarded, stream, task, *args)
        except BaseException:
            release()
            raise
        future.add_done_callback(release)

    def _guarded(self, stream: bool, task: Callable[..., None], *args: object) -> None:
        try:
            if stream:  # a request: it takes one of the streams (a reader only feeds them)
                with self._streams:
                    task(*args)
            else:
                task(*args)
        except ArchupError as error:
            self._on_error(error)
        except Exception as error:  # a bug must stop the batch, never vanish inside a future
            self._on_error(ArchupError(f"internal error in an upload worker: {error!r}"))
