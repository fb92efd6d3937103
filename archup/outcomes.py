"""What a run did, as it happens: counts, failures, the first fatal error, and progress.

:class:`Outcomes` is the one place the engine's pieces (the uploader, the multipart
transfers, crash reconciliation) report a file's end: it commits the file's final
state to the journal, counts it, and tells the observer, in that order, so nothing
is reported done before its commit.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .errors import ArchupError
from .journal import FileRecord, Journal
from .states import FileState

log = logging.getLogger("archup.upload")


class UploadObserver(Protocol):
    """Progress leaves the core through these callbacks (called from worker threads)."""

    def on_file_started(self, rel_path: str, size: int) -> None: ...

    def on_file_done(self, rel_path: str, state: FileState, size: int, error: str | None) -> None: ...

    def on_bytes(self, count: int) -> None: ...


class NullObserver:
    def on_file_started(self, rel_path: str, size: int) -> None:
        pass

    def on_file_done(self, rel_path: str, state: FileState, size: int, error: str | None) -> None:
        pass

    def on_bytes(self, count: int) -> None:
        pass


@dataclass
class UploadResult:
    batch_id: str
    files_uploaded: int = 0
    files_failed: int = 0
    bytes_sent: int = 0
    interrupted: bool = False
    fatal: ArchupError | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)


class Outcomes:
    """Thread-safe accounting of one send: every worker reports through it."""

    def __init__(self, journal: Journal, batch_id: str, stop: threading.Event,
                 observer: UploadObserver | None = None) -> None:
        self.journal = journal
        self.batch_id = batch_id
        self.stop = stop
        self.observer: UploadObserver = observer or NullObserver()
        self.result = UploadResult(batch_id)
        self._lock = threading.Lock()

    def stop_with(self, error: ArchupError) -> None:
        """A destination-wide error: the first one is the run's, and every worker stops."""
        with self._lock:
            if self.result.fatal is None:
                self.result.fatal = error
        self.stop.set()

    def started(self, record: FileRecord) -> None:
        self.observer.on_file_started(record.rel_path, record.size)

    def uploaded(self, record: FileRecord, sha256: str, etag: str) -> None:
        """Commit a file uploaded (a multipart file, or one settled on resume), then report it."""
        self.journal.complete_file(self.batch_id, record.rel_path, sha256=sha256, etag=etag)
        self.reported(record, sha256, etag)

    def reported(self, record: FileRecord, sha256: str, etag: str) -> None:
        """Called only after the file's completion is committed."""
        log.info("uploaded %s (%d bytes, sha256 %s)", record.rel_path, record.size, sha256)
        with self._lock:
            self.result.files_uploaded += 1
        self.observer.on_file_done(record.rel_path, FileState.UPLOADED, record.size, None)

    def packed(self, members: list[FileRecord]) -> None:
        """A shard's members, committed uploaded with it."""
        with self._lock:
            self.result.files_uploaded += len(members)
        for record in members:
            self.observer.on_file_done(record.rel_path, FileState.UPLOADED, record.size, None)

    def noted(self, record: FileRecord, state: FileState, reason: str) -> None:
        """A member the journal already moved out of its shard, failed or skipped: counted and reported."""
        log.info("%s %s: %s", state.value, record.rel_path, reason)
        if state is FileState.FAILED:
            with self._lock:
                self.result.files_failed += 1
                self.result.failures.append((record.rel_path, reason))
        self.observer.on_file_done(record.rel_path, state, record.size, reason)

    def failed(self, record: FileRecord, reason: str) -> None:
        self.journal.fail_file(self.batch_id, record.rel_path, reason)
        log.info("failed %s: %s", record.rel_path, reason)
        with self._lock:
            self.result.files_failed += 1
            self.result.failures.append((record.rel_path, reason))
        self.observer.on_file_done(record.rel_path, FileState.FAILED, record.size, reason)

    def skipped(self, record: FileRecord, reason: str) -> None:
        """The file cannot be read, for good (archup.unreadable): named, and sealed without."""
        self.journal.skip_file(self.batch_id, record.rel_path, reason)
        log.info("skipped %s: %s", record.rel_path, reason)
        self.observer.on_file_done(record.rel_path, FileState.SKIPPED, record.size, reason)

    def sent(self, count: int) -> None:
        with self._lock:
            self.result.bytes_sent += count
        self.observer.on_bytes(count)


class CompletionWriter:
    """One thread commits the completions of single-PUT files in groups.

    Workers hand over (record, sha256, etag) the moment PutObject returned and go
    on to the next file; the writer commits everything waiting in one transaction
    (one fsync), and only then reports those files done. A crash before that
    commit leaves them pending, and a resumer sends them again: a PUT of the same
    bytes is idempotent. So no file is ever reported done before its commit.
    """

    GROUP = 1000

    def __init__(self, journal: Journal, batch_id: str, on_committed: Callable[[FileRecord, str, str], None],
                 on_error: Callable[[ArchupError], None]) -> None:
        # A journal across the network waits a moment for more completions (see Journal.commit_linger).
        self._linger = journal.commit_linger
        self._journal = journal
        self._batch_id = batch_id
        self._on_committed = on_committed
        self._on_error = on_error
        self._queue: queue.SimpleQueue[tuple[FileRecord, str, str] | None] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="archup-journal-writer", daemon=True)
        self._thread.start()

    def put(self, record: FileRecord, sha256: str, etag: str) -> None:
        self._queue.put((record, sha256, etag))

    def close(self) -> None:
        """Commit whatever is still waiting, then stop."""
        self._closing.set()  # no more lingering: the last group is committed at once
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            # The first completion wakes this thread; the ones after it are left to queue up
            # for the linger (no wake-up each) and taken in one go: one transaction, one fsync
            # and one wake-up a group, however the completions trickle in.
            if self._linger > 0:
                self._closing.wait(self._linger)
            while len(group) < self.GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                group.append(item)
            self._commit(group)

    def _commit(self, group: list[tuple[FileRecord, str, str]]) -> None:
        try:
            refused = dict(self._journal.complete_files(
                self._batch_id, [(record.rel_path, sha256, etag) for record, sha256, etag in group]))
        except ArchupError as error:
            self._on_error(error)  # nothing of this group was committed: the files stay pending
            return
        except Exception as error:  # a bug must stop the batch, never kill this thread silently
            self._on_error(ArchupError(f"internal error in the journal writer: {error!r}"))
            return
        for record, sha256, etag in group:
            if record.rel_path in refused:
                self._on_error(refused[record.rel_path])
            else:
                self._on_committed(record, sha256, etag)
