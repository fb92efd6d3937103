"""Several hosts, one batch: this process's part of a batch in a shared (PostgreSQL) journal.

Every host runs the same command. Each one joins the batch as a worker with a heartbeat;
one of them, elected in the database, scans the source into the journal; all of them
claim chunks of files with leases and send them through the usual engine, whose writes
the journal fences; when the scan is complete and no chunk is left, they race to
finalize, and exactly one wins and seals the batch while the others wait for the seal.
A worker that dies stops renewing its leases; its chunks are claimed again by another
host, which settles what the dead one left (PUTs finished but not recorded are adopted
after a HEAD and a SHA-256 compare; multipart uploads continue from their recorded
parts). docs/design.md, "Several hosts, one batch", gives the order and the proofs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from enum import Enum
from types import TracebackType
from typing import TypeVar

from .batches import write_marker
from .errors import ArchupError, BatchBusy, IllegalTransition, JournalError, LeaseLost, SourceMismatch
from .finalize import FinalizeSummary, check_complete, finalize
from .journal import DEFAULT_LEASE, BatchRecord, Claims, FileRecord, Journal
from .outcomes import UploadObserver, UploadResult
from .source import same_file
from .states import BatchState, FileState
from .store import ObjectStore
from .uploader import Uploader, UploadOptions

log = logging.getLogger("archup.shared")

T = TypeVar("T")

SOURCE_SAMPLE = 8  # files of the batch this host checks on its own disk before it claims any

# Around a send: an observer of its progress (or None), given the files and bytes left to send.
Progress = Callable[[int, int], AbstractContextManager[UploadObserver | None]]

__all__ = ["Claims", "MoreWork", "SharedWorker", "Stopped", "Turn", "check_source", "finalize_shared", "run_shared"]


def run_shared(journal: Journal, claims: Claims, store: ObjectStore, record: BatchRecord, options: UploadOptions, *,
               stop: threading.Event, lease: float, local_root: str | None, no_finalize: bool,
               progress: Progress, end: Callable[[UploadResult, bool], T]) -> T:
    """This host's part of a batch in a shared journal: join, scan if elected, claim and send
    chunks until none is left, then race to finalize (exactly one host seals; the others
    wait for the seal and report it). docs/design.md, "Several hosts, one batch".

    ``end(result, partial)`` says how the run ended (and finalizes, if this host won the race or
    another sealed the batch) while this host still holds its leases; ``partial``: nothing is
    left to send, and files failed on the hosts sharing the batch."""
    batch_id = record.batch_id
    with SharedWorker(claims, batch_id, lease=lease, stop=stop) as worker:
        turn = Turn.SEALED
        result = UploadResult(batch_id)
        if record.state is not BatchState.ENQUEUED:
            write_marker(store, record)  # the same bytes from every host
            uploader = Uploader(journal, store, batch_id, options, stop=stop, source_root=local_root,
                                sole_owner=False)
            worker.on_lost = uploader.stop_with
            worker.result = uploader.result
            if journal.get_batch(batch_id).state in (BatchState.OPEN, BatchState.FAILED):
                journal.set_batch_state(batch_id, BatchState.UPLOADING)
            claims.reopen_chunks(batch_id)
            if worker.scan_turn():
                uploader.scan_into_journal()
            else:
                worker.wait_for_first_files()
            check_source(claims, batch_id, uploader.source_root, uploader.stat_source)
            turn = _send_shared(journal, uploader, worker, progress, no_finalize)
            result = uploader.result
            if result.fatal is None and worker.lost is not None:
                result.fatal = worker.lost
        try:
            return end(result, turn is Turn.PARTIAL)
        finally:
            if turn is Turn.FINALIZE:
                worker.release_finalize()  # a finalize that failed leaves the race to the next host at once


def finalize_shared(journal: Journal, claims: Claims, batch_id: str,
                    store_for: Callable[[BatchRecord], ObjectStore]) -> FinalizeSummary:
    """``archup finalize`` on a shared journal: it takes part in the finalize race like a host,
    and seals only if it wins (a batch sealed already: its summary)."""
    with SharedWorker(claims, batch_id, stop=threading.Event()) as worker:
        batch = journal.get_batch(batch_id)
        if batch.state.terminal or claims.claim_finalize(batch_id, worker.worker_id, worker.lease):
            try:
                return finalize(journal, store_for(batch), batch_id)  # sealed already: its summary
            finally:
                worker.release_finalize()
        if batch.state is BatchState.FINALIZING:
            raise BatchBusy(f"batch {batch_id} is being finalized by another host; 'archup status {batch_id}' "
                            "shows when it is sealed")
        check_complete(journal, journal.get_batch(batch_id))  # names what is not uploaded
        raise BatchBusy(f"batch {batch_id}: its files are being sent by hosts that hold them; try again "
                        "when they finish")


def _mark_failed(journal: Journal, batch_id: str) -> None:
    """Nothing is left to send and files failed: the batch is failed (resumable), as whichever
    host gets here first records it."""
    try:
        journal.set_batch_state(batch_id, BatchState.FAILED, error="some files failed; resume the batch")
    except IllegalTransition:
        pass  # sealed, aborted or expired meanwhile: that state stands


def _send_shared(journal: Journal, uploader: Uploader, worker: SharedWorker, progress: Progress,
                 no_finalize: bool) -> Turn:
    """Claim and send until no chunk is left; then the finalize race (unless --no-finalize)."""
    while True:
        state = journal.get_state(uploader.batch_id, problem_limit=0)
        done = (FileState.UPLOADED, FileState.SKIPPED)
        with progress(state.files_total - sum(state.counts[s] for s in done),
                      state.bytes_total - sum(state.bytes_by_state[s] for s in done)) as observer:
            if observer is not None:
                uploader.observer = observer
            result = uploader.send(worker.claimed_files(uploader.settle_lost_puts_among,
                                                        uploader.scan_into_journal))
        worker.finish_all()
        if result.fatal is not None or uploader.stop.is_set() or no_finalize:
            return Turn.SEALED if no_finalize else Turn.PARTIAL
        try:
            turn = worker.finalize_turn()
            if turn is Turn.PARTIAL:
                _mark_failed(journal, uploader.batch_id)
            return turn
        except MoreWork:
            continue  # a host died holding chunks: claim them
        except Stopped:
            result.interrupted = True
            return Turn.PARTIAL


def new_worker_id() -> str:
    """Unique per process run: a restarted process is a new worker, never its old self."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Turn(Enum):
    """What the finalize race told this host."""

    FINALIZE = "finalize"   # this host won: it seals the batch
    SEALED = "sealed"       # another host sealed it: report the summary
    PARTIAL = "partial"     # nothing is left to send, and some files failed


class SharedWorker:
    """This process as one worker of a shared batch: its heartbeat, its claims, its turns.

    Use as a context manager: entering registers the worker and starts the heartbeat;
    leaving stops it and gives back the chunks not done, so another host takes them at
    once instead of after the lease."""

    def __init__(self, journal: Claims, batch_id: str, *, lease: float = DEFAULT_LEASE,
                 stop: threading.Event, on_lost: Callable[[ArchupError], None] | None = None) -> None:
        self.journal = journal
        self.batch_id = batch_id
        self.lease = lease
        self.stop = stop
        self.worker_id = new_worker_id()
        self.result: UploadResult | None = None  # this host's send, for the workers view
        self.on_lost = on_lost
        self._held: list[int] = []         # chunks claimed and sent, not yet marked done
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_ok = time.monotonic()
        self.lost: ArchupError | None = None

    # -- joining and leaving -----------------------------------------------------

    def __enter__(self) -> SharedWorker:
        self.journal.register_worker(self.batch_id, self.worker_id, self.lease)
        self._last_ok = time.monotonic()
        self._wake = threading.Event()
        self._threads = [threading.Thread(target=self._beat, name="archup-heartbeat", daemon=True),
                         threading.Thread(target=self._watch, name="archup-lease-watch", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._done.set()
        self._wake.set()
        # The heartbeat may be stuck in a call to an unreachable database: not waited for.
        self._threads[1].join()
        try:
            self.journal.end_worker(self.batch_id, self.worker_id, *self._done_so_far())
        except JournalError as failure:
            log.warning("could not give back this host's claims (they expire in %.0f s): %s", self.lease, failure)

    def _beat(self) -> None:
        """Renew every lease this worker holds, a few times per lease (or at once when the
        watchdog asks)."""
        while not self._done.is_set():
            self._wake.wait(self.lease / 4)
            self._wake.clear()
            if self._done.is_set():
                return
            try:
                began = time.monotonic()
                held = self.journal.heartbeat(self.batch_id, self.worker_id, self.lease, *self._done_so_far())
                self._last_ok = began  # the lease now runs from before the request, to be safe
                log.debug("batch %s: heartbeat renewed %d chunk(s) in %.3f s", self.batch_id, held,
                          time.monotonic() - began)
            except ArchupError as error:
                log.warning("batch %s: heartbeat failed: %s", self.batch_id, error)

    def _watch(self) -> None:
        """A host that cannot renew its leases for half the lease stops sending: past the lease
        another host may take its files. Apart from the heartbeat, whose call may hang as long
        as the network does (a partition answers nothing). Silence alone is not enough: a
        process that was not scheduled for a while (a loaded machine) asks for a renewal at once
        and stops only if that does not come back in time either."""
        while not self._done.wait(self.lease / 8):
            if time.monotonic() - self._last_ok < self.lease / 2:
                continue
            self._wake.set()
            self._done.wait(min(self.lease / 8, 2.0))
            silent = time.monotonic() - self._last_ok
            if self._done.is_set() or silent < self.lease / 2:
                continue
            self.lost = LeaseLost(f"batch {self.batch_id}: this host could not renew its lease for {silent:.1f} s "
                                  "(the journal's database is unreachable); it stops sending, and another host "
                                  "takes its files over")
            log.error("%s", self.lost)
            if self.on_lost is not None:
                self.on_lost(self.lost)
            self.stop.set()
            return

    def _done_so_far(self) -> tuple[int, int]:
        result = self.result
        return (result.files_uploaded, result.bytes_sent) if result is not None else (0, 0)

    # -- the scan -------------------------------------------------------------------

    def scan_turn(self) -> bool:
        """True if this worker is elected to scan (or to take over a scan whose host died)."""
        return self.journal.claim_scan(self.batch_id, self.worker_id, self.lease)

    def wait_for_first_files(self) -> None:
        """Another host scans: wait (bounded polls) until it has written its first group, the
        scan is complete, or its scanner is gone (the claim loop then takes the scan over)."""
        wait = 0.05
        while not self.stop.is_set():
            if next(iter(self.journal.iter_files(self.batch_id, page_size=1)), None) is not None:
                return
            left = self.journal.work_left(self.batch_id)
            if left.scan_complete or not left.scanner_alive:
                return
            self.stop.wait(wait)
            wait = min(wait * 2, 1.0)

    # -- claims ----------------------------------------------------------------------

    def claimed_files(self, settle: Callable[[list[FileRecord]], int],
                      scan: Callable[[], None]) -> Iterator[FileRecord | None]:
        """The files of each chunk this worker claims, chunk after chunk (None after each), until the scan is
        complete and no chunk is left to claim. ``settle(records)`` runs on a chunk another
        worker held before (it adopts PUTs that finished unrecorded); ``scan()`` runs when the
        scanning host died and this one is elected to take the scan over."""
        wait = 0.05
        while not self.stop.is_set():
            self._finish_handled()
            claim = self.journal.claim_chunk(self.batch_id, self.worker_id, self.lease)
            if claim is None:
                left = self.journal.work_left(self.batch_id)
                if left.state.terminal or left.state is BatchState.FINALIZING:
                    return
                if left.scan_complete and not left.claimable:
                    # Nothing more to claim. This host's own chunks end with the send (a lost
                    # upload is started over after this loop), and the finalize race waits
                    # for the chunks other hosts hold.
                    return
                if not left.scan_complete and not left.scanner_alive and self.scan_turn():
                    scan()
                    continue
                # Bounded waits, never a fixed sleep: more files are scanned, or a lease runs out.
                if self.stop.wait(wait):
                    return
                wait = min(wait * 2, self.lease / 4, 1.0)
                continue
            wait = 0.05
            chunk_no = claim.chunk_no
            records = self.journal.chunk_files(self.batch_id, chunk_no)
            if claim.earlier_claims and records:
                if settle(records):
                    records = self.journal.chunk_files(self.batch_id, chunk_no)
            self._held.append(chunk_no)
            yield from records
            yield None  # the chunk ends: a shard never spans two chunks (each is one unit of claim)

    def _finish_handled(self) -> None:
        """Mark done the held chunks whose files have all reached an end (committed)."""
        still: list[int] = []
        for chunk_no in self._held:
            open_files = [r for r in self.journal.chunk_files(self.batch_id, chunk_no)
                          if r.state in (FileState.PENDING, FileState.UPLOADING)]
            if open_files or not self.journal.finish_chunk(self.batch_id, chunk_no, self.worker_id):
                still.append(chunk_no)
        self._held = still

    def finish_all(self) -> None:
        """After the send (every completion committed): the chunks handled are done."""
        self._finish_handled()

    # -- the finalize race -------------------------------------------------------------

    def finalize_turn(self) -> Turn:
        """Wait until nothing is left to send on any host, then race to finalize: exactly one
        worker wins. Files failed and nothing else left: the batch is partial, on every host."""
        wait = 0.05
        while True:
            left = self.journal.work_left(self.batch_id)
            if left.state.terminal:
                return Turn.SEALED
            if left.scan_complete and not left.open_files:
                if left.failed_files:
                    return Turn.PARTIAL
                if self.journal.claim_finalize(self.batch_id, self.worker_id, self.lease):
                    return Turn.FINALIZE
            elif left.claimable or (not left.scan_complete and not left.scanner_alive):
                raise MoreWork()  # a host died holding files: claim them
            if self.stop.wait(wait):
                raise Stopped()
            wait = min(wait * 2, self.lease / 4, 1.0)

    def release_finalize(self) -> None:
        try:
            self.journal.release_finalize(self.batch_id, self.worker_id)
        except JournalError:
            pass  # the lease runs out by itself


class MoreWork(Exception):
    """The finalize wait found chunks to claim again (a host died holding them)."""


class Stopped(Exception):
    """A signal stopped the wait."""


def check_source(journal: Claims, batch_id: str, root: str, tree_stat: Callable[[str], os.stat_result]) -> None:
    """Before claiming anything: the first files of the batch must be on this host's disk as
    the scan saw them (size, mtime, inode and ctime; not the device, which differs between the
    NFS clients of one export). Another tree, or a changed one, is refused by name."""
    if not os.path.isdir(root):
        raise SourceMismatch(f"batch {batch_id}: its source is not a directory on this host: {root}; "
                             "pass --source-root with where this host mounts it")
    checked = 0
    for record in journal.iter_files(batch_id, None, page_size=SOURCE_SAMPLE * 4):
        if record.state is FileState.SKIPPED:
            continue
        path = os.path.join(root, record.rel_path)
        try:
            info = tree_stat(path)
        except OSError as error:
            raise SourceMismatch(f"batch {batch_id}: {record.rel_path!r} is not in {root} on this host "
                                 f"({error.strerror}); this host's source is not the batch's "
                                 "(pass --source-root with where this host mounts it)") from None
        if not same_file(info, record):
            raise SourceMismatch(f"batch {batch_id}: {record.rel_path!r} in {root} differs from the batch's "
                                 f"(size {record.size} -> {info.st_size}, or its mtime, inode or ctime); this "
                                 "host's source is not the tree the batch was scanned from")
        checked += 1
        if checked >= SOURCE_SAMPLE:
            return
