"""The upload engine: scan into the journal, then send every file that needs it.

Durability order (docs/design.md): a file's journal row is marked uploaded only
after the store confirmed its object; a multipart upload id is recorded the
moment CreateMultipartUpload returns; each part is recorded after UploadPart
returned. The journal is the work queue: the scan writes every file into it
first (grouped transactions), then the dispatcher streams the files that still
need work out of it, so a rerun of the same batch picks up where a crash left.

Threads: the calling thread walks the directory, dispatches, and reads large
files part by part (hashing as it reads, so SHA-256 comes from the same read
pass as the upload); a pool of ``parallel`` workers does the network requests.
Backpressure: a semaphore bounds the queued tasks and a byte budget of
``parallel x part_size`` bounds the file bytes held in memory.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import mimetypes
import os
import queue
import stat
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Protocol

from .batches import list_open_uploads
from .crashpoints import crash_point
from .errors import ArchupError, FileNotInBatch, TransferError
from .journal import FileRecord, Journal, NewFile, PartRecord
from .scan import FILES_DIR, ScanItem, identity_of, inside, object_key, read_ahead, scan, scan_list
from .select import Selector
from .states import BatchState, FileState
from .store import SHA256_METADATA, MultipartChecksum, S3Store, UploadedPart, b64, crc32_b64, crc32_combine

log = logging.getLogger("archup.upload")

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
SCAN_GROUP = 5000
MEMORY_CAP = 1024 * MiB  # file bytes in flight a grown part size may raise the budget to
CHANGED_ATTEMPTS = 3  # reads of a small file that keeps changing before it is failed


def part_size_for(size: int, configured: int) -> int:
    """The configured part size, grown (in whole MiB) so the file needs at most 10,000 parts."""
    part_size = max(configured, MIN_PART_SIZE)
    if size > part_size * MAX_PARTS:
        needed = -(-size // MAX_PARTS)
        part_size = -(-needed // MiB) * MiB
    return part_size


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


@dataclass(frozen=True)
class UploadOptions:
    parallel: int = 5
    part_size: int = DEFAULT_PART_SIZE
    multipart_threshold: int = DEFAULT_PART_SIZE
    select: Selector | None = None   # --include / --exclude
    files_from: tuple[str, ...] | None = None     # --files-from: only these paths
    skip_archived: bool = False                   # skip files unchanged since an earlier finalized batch
    prehash: bool = True                          # hash a multipart file first, for its object metadata
    follow_symlinks: bool = False                 # take a symlink inside the source root as its target


@dataclass
class UploadResult:
    batch_id: str
    files_uploaded: int = 0
    files_failed: int = 0
    bytes_sent: int = 0
    interrupted: bool = False
    fatal: ArchupError | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)


class ByteBudget:
    """A counting semaphore over bytes: caps the file data held in memory at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._available = capacity
        self._cond = threading.Condition()

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
        self._journal = journal
        self._batch_id = batch_id
        self._on_committed = on_committed
        self._on_error = on_error
        self._queue: queue.SimpleQueue[tuple[FileRecord, str, str] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="archup-journal-writer", daemon=True)
        self._thread.start()

    def put(self, record: FileRecord, sha256: str, etag: str) -> None:
        self._queue.put((record, sha256, etag))

    def close(self) -> None:
        """Commit whatever is still waiting, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
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


class FileChanged(Exception):
    """The file differs from what the scan recorded (size, mtime) or was short-read."""


class PathEscaped(FileChanged):
    """What was opened is not the file the scan found there: a directory on its path was
    replaced by a symlink, or (following symlinks) one now leads out of the source root."""


class _MultipartFile:
    """Book-keeping for one multipart file whose parts are spread over the pool."""

    def __init__(self, record: FileRecord, upload_id: str, part_size: int, checksum: MultipartChecksum,
                 expected_sha256: str | None) -> None:
        self.record = record
        self.upload_id = upload_id
        self.part_size = part_size
        self.checksum = checksum
        # The SHA-256 the upload was created with (its metadata), from a read before this one.
        self.expected_sha256 = expected_sha256
        self.lock = threading.Lock()
        self.outstanding = 0
        self.read_done = False
        self.sha256: str | None = None
        self.crc32 = 0  # of the whole file as read, for a full-object checksum
        self.error: str | None = None
        self.lost = False  # the server answered NoSuchUpload: the upload is gone
        self.finished = False

    def ready_to_finish(self) -> bool:
        """Called under lock: the one caller that sees True completes or aborts the upload."""
        if self.finished or self.outstanding or not (self.read_done or self.error):
            return False
        self.finished = True
        return True


class Uploader:
    def __init__(self, journal: Journal, store: S3Store, batch_id: str, options: UploadOptions,
                 observer: UploadObserver | None = None, stop: threading.Event | None = None) -> None:
        self.journal = journal
        self.store = store
        self.batch = journal.get_batch(batch_id)
        self.batch_id = batch_id
        self.options = options
        self.observer: UploadObserver = observer or NullObserver()
        self.stop = stop or threading.Event()
        self.result = UploadResult(batch_id)
        self._result_lock = threading.Lock()
        self._restarted: set[str] = set()  # files whose upload the server lost, sent again this run
        self._slots = threading.BoundedSemaphore(options.parallel * 2)
        self._budget = ByteBudget(options.parallel * options.part_size)
        self._writer: CompletionWriter  # one per send()
        # Every open is checked against where the file must be (see _open_regular).
        self._root_real = os.path.realpath(self.batch.source_root)
        self._guard = PathGuard(within=self._root_real) if options.follow_symlinks else PathGuard(exact=True)

    # -- the run ------------------------------------------------------------

    def run(self) -> UploadResult:
        """Scan (unless an earlier run finished it), then send."""
        self.scan()
        return self.send()

    def _path(self, record: FileRecord) -> str:
        path = os.path.join(self._root_real, record.rel_path)
        # Following symlinks, the file is opened where its links lead (checked inside the root).
        return os.path.realpath(path) if self.options.follow_symlinks else path

    def scan(self) -> None:
        """Write every file of the source into the journal (grouped transactions), then mark the scan complete."""
        self.journal.set_batch_state(self.batch_id, BatchState.UPLOADING)
        if not self.journal.get_batch(self.batch_id).scan_complete:
            self._scan_into_journal()

    def send(self) -> UploadResult:
        """Upload every file the journal says still needs it; never raises for one file's failure."""
        self._writer = CompletionWriter(self.journal, self.batch_id, self._reported, self._stop_with)
        try:
            with ThreadPoolExecutor(self.options.parallel, thread_name_prefix="archup-upload") as pool:
                self._dispatch(pool)
            # Uploads the server lost mid-run (NoSuchUpload: expired, aborted by someone else)
            # start over once, in this run, with a new upload.
            restarted = [self.journal.get_file(self.batch_id, rel_path) for rel_path in self._restarted]
            if restarted and not self.stop.is_set():
                with ThreadPoolExecutor(self.options.parallel, thread_name_prefix="archup-upload") as pool:
                    self._dispatch(pool, restarted)
        except ArchupError as error:
            self._stop_with(error)
        finally:
            self._writer.close()  # after the pool: every completion handed over is committed
        if self.result.fatal is None and self.stop.is_set():
            self.result.interrupted = True
        self._settle_batch_state()
        return self.result

    def _settle_batch_state(self) -> None:
        if self.result.fatal is not None or self.result.files_failed:
            reason = str(self.result.fatal) if self.result.fatal else f"{self.result.files_failed} file(s) failed"
            self.journal.set_batch_state(self.batch_id, BatchState.FAILED, error=reason)

    def _scan_into_journal(self) -> None:
        prefix = self.batch.batch_prefix
        root, select = self.batch.source_root, self.options.select
        follow = self.options.follow_symlinks
        items = (scan_list(root, self.options.files_from, select, follow_symlinks=follow)
                 if self.options.files_from is not None else scan(root, select, follow_symlinks=follow))
        stopped = False
        archived = 0

        def new_files() -> Iterator[NewFile]:  # runs in read_ahead's thread
            nonlocal stopped, archived
            for item in items:
                if self.stop.is_set():
                    stopped = True
                    return
                if (self.options.skip_archived and item.skip_reason is None
                        and self.journal.archived_in(self.batch, item.rel_path, item.size, item.mtime_ns)):
                    # Counted, not a row: an hourly job over a million files would otherwise
                    # add a million rows to the journal every hour.
                    archived += 1
                    continue
                yield self._new_file(prefix, item)

        # The walk runs a few groups ahead in its own thread while this one inserts.
        groups = read_ahead(new_files(), SCAN_GROUP, Journal.encode_files)
        try:
            for group in groups:
                if self.stop.is_set():
                    return
                self.journal.add_files(self.batch_id, group, durable=False)
        finally:
            groups.close()  # stops the walking thread now, whatever ended the loop
        if not stopped:
            self.journal.mark_scan_complete(self.batch_id, files_archived=archived)

    @staticmethod
    def _new_file(prefix: str, item: ScanItem) -> NewFile:
        key = object_key(prefix, item.rel_path)
        if item.skip_reason:
            return NewFile(item.rel_path, key, item.size, item.mtime_ns, FileState.SKIPPED, item.skip_reason)
        return NewFile(item.rel_path, key, item.size, item.mtime_ns, identity=item.identity)

    def _dispatch(self, pool: ThreadPoolExecutor, records: Iterable[FileRecord] | None = None) -> None:
        todo = (FileState.PENDING, FileState.FAILED, FileState.UPLOADING)
        for record in self.journal.iter_files(self.batch_id, todo) if records is None else records:
            if self.stop.is_set():
                break
            path = self._path(record)
            if record.state is FileState.FAILED:
                record = self._rescan(record, path)
            if record.size >= self.options.multipart_threshold or record.upload_id:
                self._send_multipart(pool, record, path)
            else:
                self._submit(pool, self._send_single, record, path, reserve=record.size)

    def _submit(self, pool: ThreadPoolExecutor, task: Callable[..., None], *args: object,
                reserve: int = 0) -> None:
        """Submit with backpressure: blocks while the queue is full or the byte budget is spent."""
        self._slots.acquire()
        reserved = self._budget.acquire(reserve) if reserve else 0

        def release(_: Future[None]) -> None:
            if reserved:
                self._budget.release(reserved)
            self._slots.release()

        try:
            future = pool.submit(self._guarded, task, *args)
        except BaseException:
            release(None)  # type: ignore[arg-type]
            raise
        future.add_done_callback(release)

    def _guarded(self, task: Callable[..., None], *args: object) -> None:
        """Run a task; a destination-wide error stops the batch instead of failing every file."""
        try:
            task(*args)
        except ArchupError as error:
            self._stop_with(error)
        except Exception as error:  # a bug must stop the batch, never vanish inside a future
            self._stop_with(ArchupError(f"internal error in an upload worker: {error!r}"))

    def _stop_with(self, error: ArchupError) -> None:
        with self._result_lock:
            if self.result.fatal is None:
                self.result.fatal = error
        self.stop.set()

    # -- results ------------------------------------------------------------

    def _uploaded(self, record: FileRecord, sha256: str, etag: str) -> None:
        """A multipart file (rare, large): committed right here, by the finishing thread."""
        self.journal.complete_file(self.batch_id, record.rel_path, sha256=sha256, etag=etag)
        self._reported(record, sha256, etag)

    def _reported(self, record: FileRecord, sha256: str, etag: str) -> None:
        """Called only after the file's completion is committed."""
        log.info("uploaded %s (%d bytes, sha256 %s)", record.rel_path, record.size, sha256)
        with self._result_lock:
            self.result.files_uploaded += 1
        self.observer.on_file_done(record.rel_path, FileState.UPLOADED, record.size, None)

    def _failed(self, record: FileRecord, reason: str) -> None:
        self.journal.fail_file(self.batch_id, record.rel_path, reason)
        log.info("failed %s: %s", record.rel_path, reason)
        with self._result_lock:
            self.result.files_failed += 1
            self.result.failures.append((record.rel_path, reason))
        self.observer.on_file_done(record.rel_path, FileState.FAILED, record.size, reason)

    def _sent(self, count: int) -> None:
        with self._result_lock:
            self.result.bytes_sent += count
        self.observer.on_bytes(count)

    def _metadata(self, extra: dict[str, str]) -> dict[str, str]:
        return {"archup-batch": self.batch_id, **extra}

    # -- single PUT ---------------------------------------------------------

    def _rescan(self, record: FileRecord, path: str) -> FileRecord:
        """A file to send again takes its current size and mtime (it may have changed since the scan)."""
        try:
            info = os.stat(path) if self.options.follow_symlinks else os.lstat(path)
        except OSError:
            return record  # the read reports it (vanished, unreadable)
        if not stat.S_ISREG(info.st_mode) or _same_file(info, record):
            return record
        return self.journal.refresh_file(self.batch_id, record.rel_path, info.st_size, info.st_mtime_ns,
                                         identity_of(info))

    def _send_single(self, record: FileRecord, path: str) -> None:
        if self.stop.is_set():
            return  # queued before the stop: the file stays pending for the resumer
        self.observer.on_file_started(record.rel_path, record.size)
        for attempt in range(1, CHANGED_ATTEMPTS + 1):
            try:
                body = _read_whole(path, record, self._guard)
                break
            except FileChanged as error:
                fresh = self._rescan(record, path)
                if attempt == CHANGED_ATTEMPTS or fresh is record:
                    self._failed(record, f"{error} ({attempt} attempt(s))")
                    return
                if fresh.size >= self.options.multipart_threshold:
                    self._failed(fresh, "grew past the multipart threshold during upload; resuming sends it")
                    return
                record = fresh
            except OSError as error:
                self._failed(record, _describe_read_error(error))
                return
        digest = hashlib.sha256(body).digest()
        sha256 = digest.hex()
        crash_point("before-put-object")
        try:
            etag = self.store.put_object(record.key, body, sha256_digest=digest,
                                         metadata=self._metadata({SHA256_METADATA: sha256}),
                                         content_type=_content_type(record.rel_path), archive=True)
        except TransferError as error:
            self._failed(record, str(error))
            return
        crash_point("after-put-object")
        self._sent(len(body))
        self._writer.put(record, sha256, etag)

    # -- multipart ----------------------------------------------------------

    def settle_lost_puts(self, limit: int = 10_000) -> int:
        """On a resume: the files a crash caught after their PutObject but before the journal
        committed them are in the bucket already. Settled, never guessed: a pending file whose
        object is there with its size and an ``archup-sha256`` equal to the SHA-256 of the file
        read now is recorded uploaded instead of sent again. Returns how many.

        Files are sent in key order, so those objects lie at or after the first pending key:
        one listing from there (a page for a batch that stopped cleanly), at most ``limit``."""
        first = next(iter(self.journal.iter_files(self.batch_id, [FileState.PENDING])), None)
        if first is None:
            return 0
        settled = 0
        listed = self.store.list_objects(self.batch.batch_prefix + FILES_DIR, start_after=first.key[:-1])
        for found in itertools.islice(listed, limit):
            try:
                record = self.journal.get_file(self.batch_id, found.key[len(self.batch.batch_prefix + FILES_DIR):])
            except FileNotInBatch:
                continue
            if (record.state is not FileState.PENDING or record.key != found.key or found.size != record.size
                    or record.size >= self.options.multipart_threshold):
                continue
            stored = self.store.head(found.key)
            if stored is None or not stored.metadata.get(SHA256_METADATA):
                continue
            try:
                sha256 = _hash_file(self._path(record), record, self._guard)
            except (OSError, FileChanged):
                continue  # sent again, and the read reports what is wrong
            if sha256 == stored.metadata[SHA256_METADATA] and stored.size == record.size:
                self.journal.complete_file(self.batch_id, record.rel_path, sha256=sha256, etag=stored.etag)
                self._reported(record, sha256, stored.etag)
                settled += 1
        return settled

    def sweep_orphan_uploads(self) -> int:
        """Abort multipart uploads under this batch's prefix that the journal does not know.

        They are what a crash between CreateMultipartUpload and the journal's
        commit of its id leaves behind. Returns how many were aborted.
        """
        known = self.journal.upload_ids(self.batch_id)
        aborted = 0
        for key, upload_id in list_open_uploads(self.store, self.batch.batch_prefix) or []:
            if upload_id not in known:
                self.store.abort_multipart(key, upload_id)
                aborted += 1
        return aborted

    def _open_upload(self, record: FileRecord, handle: IO[bytes]) -> tuple[_MultipartFile, dict[int, PartRecord]] | None:
        """The multipart upload to send this file into: the recorded one if the server still
        has it (with the parts that can be reused), else a new one. None: the file is settled,
        or the run was stopped while it was hashed first."""
        if record.state is FileState.UPLOADING and record.upload_id and record.part_size:
            on_server = self.store.list_parts(record.key, record.upload_id)
            if on_server is None:
                if self._settle_lost_completion(record):
                    return None
                self.journal.reset_file(self.batch_id, record.rel_path,
                                        "the server no longer knows the upload; sending the file again")
            else:
                recorded = self.journal.list_parts(self.batch_id, record.rel_path)
                reusable = {part.part_number: part for part in recorded
                            if on_server.parts.get(part.part_number) == (part.size, part.etag)}
                # The upload keeps the checksum kind it was created with, whatever this run's options.
                checksum = (MultipartChecksum.decode(record.checksum_kind) if record.checksum_kind
                            else _resumed_checksum(on_server.checksum, recorded, self.store.multipart_checksum()))
                return _MultipartFile(record, record.upload_id, record.part_size, checksum, record.sha256), reusable
        elif record.state is FileState.UPLOADING:
            # Started but no upload id recorded: any upload the crash left is an
            # orphan under the batch prefix, which sweep_orphan_uploads aborts.
            self.journal.reset_file(self.batch_id, record.rel_path, "restarted after an interrupted run")
        part_size = part_size_for(record.size, record.part_size or self.options.part_size)
        self.journal.start_file(self.batch_id, record.rel_path)
        metadata = {"archup-part-size": str(part_size)}
        expected: str | None = None
        if self.options.prehash:
            # Object metadata is fixed at creation, before the upload pass has read the file:
            # hash it first (as rclone does), and the upload pass must read the same digest.
            expected = _hash_handle(handle, record, self.stop)
            if expected is None:
                return None  # stopped: the file stays uploading without an upload, restarted next run
            metadata[SHA256_METADATA] = expected
        checksum = self.store.multipart_checksum()
        upload_id = self.store.create_multipart(record.key, checksum, metadata=self._metadata(metadata),
                                                content_type=_content_type(record.rel_path))
        crash_point("after-create-multipart")
        # Record the undo as soon as the resource exists.
        self.journal.record_upload_id(self.batch_id, record.rel_path, upload_id, part_size, expected,
                                      checksum.encode())
        crash_point("after-record-upload-id")
        return _MultipartFile(record, upload_id, part_size, checksum, expected), {}

    def _settle_lost_completion(self, record: FileRecord) -> bool:
        """The upload is gone: if CompleteMultipartUpload did succeed (its answer was lost),
        the object is there with the ETag the recorded parts imply. Never guessed: settled
        only on that match, and with the SHA-256 of a fresh read of the file."""
        parts = self.journal.list_parts(self.batch_id, record.rel_path)
        found = self.store.head(record.key)
        if not parts or found is None or found.size != record.size or found.etag != multipart_etag(parts):
            return False
        try:
            sha256 = _hash_file(self._path(record), record, self._guard)
        except (OSError, FileChanged):
            return False
        self._uploaded(record, sha256, found.etag)
        return True

    def _send_multipart(self, pool: ThreadPoolExecutor, record: FileRecord, path: str) -> None:
        """Runs in the dispatching thread: reads the file part by part, hashing, and hands
        each part that the server does not already hold to the pool."""
        try:
            handle = _open_regular(path, self._guard)
            _check_unchanged(os.fstat(handle.fileno()), record)
        except (OSError, FileChanged) as error:
            if record.state is not FileState.UPLOADING:
                self.journal.start_file(self.batch_id, record.rel_path)
            self._failed(record, _describe_read_error(error))
            return
        with handle:
            try:
                opened = self._open_upload(record, handle)
            except TransferError as error:
                self._failed(record, str(error))
                return
            except (OSError, FileChanged) as error:  # the hash before the upload
                self._failed(record, _describe_read_error(error))
                return
            if opened is None:
                return
            upload, reusable = opened
            # N parts in flight for a file whose parts grew, up to MEMORY_CAP (a 2 TiB file has
            # 210 MiB parts: 16 of them would be 3.4 GiB); fewer streams for it past that.
            self._budget.ensure(min(self.options.parallel * upload.part_size,
                                    max(self.options.parallel * self.options.part_size, MEMORY_CAP)))
            self.observer.on_file_started(record.rel_path, record.size)
            hasher = hashlib.sha256()
            full_object = upload.checksum.full_object
            part_number = total = crc32 = 0
            error_text: str | None = None
            try:
                while total < record.size:
                    if self.stop.is_set() or upload.error:
                        break
                    want = min(upload.part_size, record.size - total)
                    reserved = self._budget.acquire(want)
                    body = handle.read(want)
                    if len(body) != want:
                        self._budget.release(reserved)
                        raise FileChanged(f"short read: got {total + len(body)} of {record.size} bytes")
                    hasher.update(body)
                    part_crc = zlib.crc32(body) if full_object else None
                    if part_crc is not None:
                        crc32 = crc32_combine(crc32, part_crc, want)
                    total += want
                    part_number += 1
                    recorded = reusable.get(part_number)
                    if recorded is not None and _part_matches(body, recorded, part_crc):
                        self._budget.release(reserved)  # the server already holds these bytes
                        continue
                    with upload.lock:
                        upload.outstanding += 1
                    self._slots.acquire()
                    future = pool.submit(self._guarded, self._send_part, upload, part_number, body, part_crc)
                    future.add_done_callback(_releaser(self._budget, reserved, self._slots))
                else:
                    if handle.read(1):
                        raise FileChanged("file grew during upload")
                    _check_unchanged(os.fstat(handle.fileno()), record)
            except (OSError, FileChanged) as error:
                error_text = _describe_read_error(error)
            with upload.lock:
                if error_text and not upload.error:
                    upload.error = error_text
                elif total == record.size and not upload.error:
                    upload.sha256 = hasher.hexdigest()
                    upload.crc32 = crc32
                    upload.read_done = True
                    if upload.expected_sha256 and upload.sha256 != upload.expected_sha256:
                        upload.error = ("changed during upload: its SHA-256 differs from the one read "
                                        "before the upload (and put in the object's metadata)")
                elif not upload.error:
                    upload.error = INTERRUPTED
                finish = upload.ready_to_finish()
            if finish:
                self._finish_multipart(upload)

    def _send_part(self, upload: _MultipartFile, part_number: int, body: bytes, crc32: int | None) -> None:
        try:
            if upload.error is None and not self.stop.is_set():
                part = self.store.upload_part(upload.record.key, upload.upload_id, part_number, body,
                                              upload.checksum, crc32=crc32)
                crash_point("after-upload-part")
                self.journal.record_part(self.batch_id, upload.record.rel_path,
                                         PartRecord(part_number, len(body), part.etag, part.checksum))
                self._sent(len(body))
            elif upload.error is None:
                with upload.lock:
                    upload.error = INTERRUPTED
        except TransferError as error:
            with upload.lock:
                upload.error = upload.error or str(error)
                upload.lost = upload.lost or error.code == "NoSuchUpload"
        except BaseException:
            # Credentials gone, the journal unwritable, ...: the run stops. The upload is left
            # as the journal knows it, for the resumer; never completed without this part.
            with upload.lock:
                upload.error = upload.error or INTERRUPTED
            raise
        finally:
            with upload.lock:
                upload.outstanding -= 1
                finish = upload.ready_to_finish()
            if finish:
                self._finish_multipart(upload)

    def _give_up(self, upload: _MultipartFile, reason: str) -> None:
        """Abort the upload (its parts stop costing storage), then fail the file by name; an
        upload the server lost is sent again from the start, once a run."""
        record = upload.record
        if upload.lost:
            with self._result_lock:
                again = record.rel_path not in self._restarted
                self._restarted.add(record.rel_path)
            if again:
                log.info("%s: the server lost its upload (NoSuchUpload); sending it again", record.rel_path)
                self.journal.reset_file(self.batch_id, record.rel_path,
                                        "the server lost its upload (NoSuchUpload); sending it again")
                return
        try:
            if not upload.lost:  # nothing left to abort
                self.store.abort_multipart(upload.record.key, upload.upload_id)
        except ArchupError:
            # An upload left open lives under the batch prefix, where finalize's sweep,
            # 'archup abort' and 'archup gc' find it with ListMultipartUploads.
            pass
        self._failed(upload.record, reason)

    def _finish_multipart(self, upload: _MultipartFile) -> None:
        record = upload.record
        if upload.error == INTERRUPTED:
            # Leave the upload as recorded (uploading, with its id and parts): the
            # resumer continues it from the parts the server holds.
            return
        if upload.error is not None:
            self._give_up(upload, upload.error)
            return
        # The completion list comes from the journal: exactly the parts it recorded, which
        # must be the whole file read, part after part.
        parts = self.journal.list_parts(self.batch_id, record.rel_path)
        if ([p.part_number for p in parts] != list(range(1, len(parts) + 1))
                or sum(p.size for p in parts) != record.size):
            self._give_up(upload, f"internal error: the journal's parts ({len(parts)}, "
                          f"{sum(p.size for p in parts)} bytes) do not make up the file")
            return
        try:
            etag = self.store.complete_multipart(
                record.key, upload.upload_id, [UploadedPart(p.part_number, p.etag, p.checksum) for p in parts],
                upload.checksum, full_crc32=upload.crc32, size=record.size)
        except TransferError as error:
            if error.code == "NoSuchUpload" and self._settle_lost_completion(record):
                return  # a retried Complete whose first answer was lost
            upload.lost = error.code == "NoSuchUpload"
            self._give_up(upload, str(error))
            return
        crash_point("after-complete-multipart")
        assert upload.sha256 is not None
        self._uploaded(record, upload.sha256, etag)


INTERRUPTED = "interrupted"


def multipart_etag(parts: list[PartRecord]) -> str:
    """The ETag S3 gives a completed multipart object: MD5 of the parts' MD5s, dash, count."""
    digests = b"".join(bytes.fromhex(part.etag.strip('"')) for part in parts)
    return f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'


def _part_matches(body: bytes, part: PartRecord, crc32: int | None = None) -> bool:
    """Reuse a stored part only if the bytes just read are the bytes it holds (by the checksum
    it was sent with; a full-object upload's completion checks every part's CRC32 once more)."""
    if len(body) != part.size:
        return False
    if part.checksum and len(part.checksum) == CRC32_B64_LENGTH:
        return crc32_b64(zlib.crc32(body) if crc32 is None else crc32) == part.checksum
    if part.checksum:
        return b64(hashlib.sha256(body).digest()) == part.checksum
    return hashlib.md5(body).hexdigest() == part.etag.strip('"')


CRC32_B64_LENGTH = 8    # four bytes in base64
SHA256_B64_LENGTH = 44  # thirty-two


def _resumed_checksum(reported: MultipartChecksum, recorded: list[PartRecord],
                      configured: MultipartChecksum) -> MultipartChecksum:
    """The checksum kind of an upload that a journal older than schema 4 did not record: as
    ListParts reports it, else as the parts the journal recorded show it, else (nothing sent
    yet) as configured now."""
    if reported.algorithm:
        return reported
    for part in recorded:
        if part.checksum and len(part.checksum) == CRC32_B64_LENGTH:
            return MultipartChecksum("CRC32", full_object=True)
        if part.checksum and len(part.checksum) == SHA256_B64_LENGTH:
            return MultipartChecksum("SHA256")
        if part.checksum is None:
            return MultipartChecksum(None)
    return configured


def _hash_file(path: str, record: FileRecord, guard: PathGuard | None = None) -> str:
    with _open_regular(path, guard) as handle:
        digest = _hash_handle(handle, record)
        assert digest is not None  # no stop event, never None
        return digest


def _hash_handle(handle: IO[bytes], record: FileRecord, stop: threading.Event | None = None,
                 chunk: int = MiB) -> str | None:
    """SHA-256 of an open file from its start, checked unchanged around the read; leaves the
    file positioned at its start again. None if ``stop`` was set meanwhile (checked each
    chunk, so a signal never waits for a whole large file to be read)."""
    hasher = hashlib.sha256()
    handle.seek(0)
    _check_unchanged(os.fstat(handle.fileno()), record)
    for block in iter(lambda: handle.read(chunk), b""):
        if stop is not None and stop.is_set():
            return None
        hasher.update(block)
    _check_unchanged(os.fstat(handle.fileno()), record)
    handle.seek(0)
    return hasher.hexdigest()


def _releaser(budget: ByteBudget, reserved: int, slots: threading.BoundedSemaphore) -> Callable[[Future[None]], None]:
    def release(_: Future[None]) -> None:
        budget.release(reserved)
        slots.release()
    return release


def _same_file(info: os.stat_result, record: FileRecord) -> bool:
    return (info.st_size == record.size and info.st_mtime_ns == record.mtime_ns
            and (record.identity is None or identity_of(info) == record.identity))


def _check_unchanged(info: os.stat_result, record: FileRecord) -> None:
    if not _same_file(info, record):
        raise FileChanged(f"changed since the scan (size {record.size} -> {info.st_size}, "
                          f"mtime changed: {info.st_mtime_ns != record.mtime_ns}, "
                          f"inode or ctime changed: {identity_of(info) != record.identity})")


def _opened_path(fd: int) -> str | None:
    """The path the kernel resolved for an open file (Linux: /proc/self/fd); None if unknown."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


@dataclass(frozen=True)
class PathGuard:
    """Where an opened file must turn out to be: ``exact``, the very path asked for (no
    directory on the way swapped for a symlink since the scan); ``within``, inside that
    directory (following symlinks, but never out of the source root)."""

    within: str | None = None
    exact: bool = False


def _open_regular(path: str, guard: PathGuard | None = None) -> IO[bytes]:
    """Open for reading without following a symlink or blocking on a FIFO that replaced the
    file since the scan; anything but a regular file is refused. Then the guard is checked
    against what the kernel says it opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        opened = _opened_path(fd) if guard is not None else None
        if guard is not None and opened is not None:
            if guard.exact and opened != path:
                raise PathEscaped("a directory on its path was replaced by a symlink (not followed)")
            if guard.within and not inside(guard.within, opened):
                raise PathEscaped("a symlink on its path now leads out of the source root (not followed)")
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "replaced by a directory", path)
        if not stat.S_ISREG(mode):
            raise FileChanged("no longer a regular file (replaced by a fifo, socket or device)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_whole(path: str, record: FileRecord, guard: PathGuard | None = None) -> bytes:
    with _open_regular(path, guard) as handle:
        _check_unchanged(os.fstat(handle.fileno()), record)
        body = handle.read(record.size + 1)
        if len(body) != record.size:
            raise FileChanged(f"read {len(body)} bytes, expected {record.size}")
        _check_unchanged(os.fstat(handle.fileno()), record)
    return body


def _describe_read_error(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "vanished: no such file"
    if isinstance(error, IsADirectoryError):
        return "vanished: replaced by a directory"
    if isinstance(error, PermissionError):
        return "unreadable: permission denied"
    if isinstance(error, OSError) and error.errno == errno.ELOOP:
        return "replaced by a symlink (not followed)"
    if isinstance(error, OSError):
        return f"unreadable: {error.strerror or error}"
    return str(error)


def _content_type(rel_path: str) -> str:
    return mimetypes.guess_type(rel_path)[0] or "application/octet-stream"
