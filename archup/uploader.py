"""The upload engine: scan into the journal, then send every file that needs it.

Durability order (docs/design.md): a file's journal row is marked uploaded only
after the store confirmed its object. The journal is the work queue: the scan
writes every file into it first (grouped transactions), then the dispatcher
streams the files that still need work out of it, so a rerun of the same batch
picks up where a crash left.

Threads: the calling thread walks the directory and dispatches; a few readers each
read one large file part by part (:mod:`archup.multipart`); a pool of ``parallel``
workers reads small files and does the network requests (:mod:`archup.dispatch`);
one thread commits single-PUT completions in groups
(:class:`archup.outcomes.CompletionWriter`). Where the store sends a PUT without a
waiting thread (``--transport crt``: :func:`archup.store.async_puts`), the dispatching
thread reads and hashes a small file itself and the store's callback hands its
completion to the writer: no pool worker per small file; a PUT sent that way holds one
of the ``parallel`` streams as a pool worker's request does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from . import source
from .crashpoints import crash_point
from .dispatch import Dispatcher
from .errors import ArchupError, TransferError
from .journal import EncodedFiles, FileRecord, Journal, NewFile
from .multipart import READERS, MultipartSender
from .outcomes import CompletionWriter, NullObserver, Outcomes, UploadObserver, UploadResult
from .packing import DEFAULT_SHARD_SIZE, ShardPlanner, ShardSender
from .reconcile import Reconciler
from .scan import ScanItem, identity_of, object_key, read_ahead, scan, scan_list
from .select import Selector
from .source import FileChanged, HeldRead, SourceTree, describe_read_error
from .states import BatchState, FileState
from .store import SHA256_METADATA, AsyncPuts, ObjectStore, async_puts
from .unreadable import permanent_reason

log = logging.getLogger("archup.upload")

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
SCAN_GROUP = 5000
CHANGED_ATTEMPTS = 3  # reads of a small file that keeps changing before it is failed

T = TypeVar("T")


@dataclass(frozen=True)
class UploadOptions:
    parallel: int = 5
    part_size: int = DEFAULT_PART_SIZE
    multipart_threshold: int = DEFAULT_PART_SIZE
    select: Selector | None = None   # --include / --exclude
    files_from: tuple[str, ...] | None = None     # --files-from: only these paths
    skip_archived: bool = False                   # skip files unchanged since an earlier finalized batch
    prehash: bool = False                         # hash a multipart file first, for its object metadata
    follow_symlinks: bool = False                 # take a symlink inside the source root as its target
    pack_under: int | None = None                 # --pack-under: smaller files go into tar shards
    shard_size: int = DEFAULT_SHARD_SIZE          # --shard-size: about this many bytes a shard


class Uploader:
    def __init__(self, journal: Journal, store: ObjectStore, batch_id: str, options: UploadOptions,
                 observer: UploadObserver | None = None, stop: threading.Event | None = None,
                 source_root: str | None = None, sole_owner: bool = True) -> None:
        """``source_root``: where this host finds the batch's source, if not where the batch
        recorded it (--source-root: another mount point of a shared tree). ``sole_owner``:
        this run's end is the batch's (False for one host of a shared batch: its failure
        leaves the batch to the others)."""
        self.sole_owner = sole_owner
        self.journal = journal
        self.store = store
        self.batch = journal.get_batch(batch_id)
        self.batch_id = batch_id
        self.options = options
        self.stop = stop or threading.Event()
        self.outcomes = Outcomes(journal, batch_id, self.stop, observer or NullObserver())
        # Every open is checked against where the file must be (see archup.source).
        self.source_root = source_root or self.batch.source_root  # where this host walks and reads
        self.tree = SourceTree(self.source_root, options.follow_symlinks)
        self.reconciler = Reconciler(journal, store, self.batch, self.tree, self.outcomes,
                                     options.multipart_threshold)
        self._writer: CompletionWriter  # one per send()
        # A small file's PUT without a pool worker, where the store can (--transport crt).
        self._async: AsyncPuts | None = async_puts(store)

    @property
    def result(self) -> UploadResult:
        return self.outcomes.result

    @property
    def observer(self) -> UploadObserver:
        return self.outcomes.observer

    @observer.setter
    def observer(self, observer: UploadObserver) -> None:
        self.outcomes.observer = observer

    # -- the run ------------------------------------------------------------

    def run(self) -> UploadResult:
        """Scan (unless an earlier run finished it), then send."""
        self.scan()
        return self.send()

    def sweep_orphan_uploads(self) -> int:
        return self.reconciler.sweep_orphan_uploads()

    def settle_lost_puts(self, limit: int = 10_000) -> int:
        return self.reconciler.settle_lost_puts(limit)

    def settle_lost_puts_among(self, records: list[FileRecord]) -> int:
        """Settle the PUTs of these files that finished unrecorded (a chunk another host held)."""
        return self.reconciler.settle_lost_puts_among(records)

    def stop_with(self, error: ArchupError) -> None:
        """Stop the run for a reason outside the send (a host's lost lease): its fatal error."""
        self.outcomes.stop_with(error)

    def stat_source(self, path: str) -> os.stat_result:
        """A path under :attr:`source_root` as this run's reads see it (symlinks followed or not)."""
        return self.tree.stat(path)

    def scan(self) -> None:
        """Write every file of the source into the journal (grouped transactions), then mark the scan complete."""
        self.journal.set_batch_state(self.batch_id, BatchState.UPLOADING)
        if not self.journal.get_batch(self.batch_id).scan_complete:
            self.scan_into_journal()

    def send(self, records: Iterable[FileRecord | None] | None = None) -> UploadResult:
        """Upload every file the journal says still needs it (or these ``records``: the files
        this host claimed of a shared batch, None where a claimed chunk ends); never raises for
        one file's failure."""
        outcomes = self.outcomes
        dispatcher = Dispatcher(self.options.parallel, self.options.parallel * self.options.part_size,
                                outcomes.stop_with, readers=min(self.options.parallel, READERS))
        multipart = MultipartSender(self.journal, self.store, self.batch_id, self.tree, dispatcher, outcomes,
                                    self.reconciler, part_size=self.options.part_size, prehash=self.options.prehash,
                                    metadata=self._metadata)
        shards = ShardSender(self.journal, self.store, self.batch_id, self.tree, dispatcher, outcomes,
                             part_size=self.options.part_size, metadata=self._metadata)
        self._writer = CompletionWriter(self.journal, self.batch_id, outcomes.reported, outcomes.stop_with)
        try:
            with dispatcher.running():
                self._dispatch(dispatcher, multipart, shards, records)
            # Uploads the server lost mid-run (NoSuchUpload: expired, aborted by someone else)
            # start over once, in this run, with a new upload.
            restarted = [self.journal.get_file(self.batch_id, rel_path) for rel_path in multipart.restarted]
            if restarted and not self.stop.is_set():
                with dispatcher.running():
                    self._dispatch(dispatcher, multipart, shards, restarted)
        except ArchupError as error:
            outcomes.stop_with(error)
        finally:
            self._writer.close()  # after the pool: every completion handed over is committed
        result = outcomes.result
        if result.fatal is None and self.stop.is_set():
            result.interrupted = True
        if self.sole_owner and (result.fatal is not None or result.files_failed):
            reason = str(result.fatal) if result.fatal else f"{result.files_failed} file(s) failed"
            self.journal.set_batch_state(self.batch_id, BatchState.FAILED, error=reason)
        return result

    def scan_into_journal(self) -> None:
        """Walk the source into the journal in groups; mark the scan complete unless stopped."""
        prefix = self.batch.batch_prefix
        root, select = self.source_root, self.options.select
        follow = self.options.follow_symlinks
        items = (scan_list(root, self.options.files_from, select, follow_symlinks=follow)
                 if self.options.files_from is not None else scan(root, select, follow_symlinks=follow))
        stopped = False
        archived = 0

        def walked() -> Iterator[ScanItem]:  # runs in read_ahead's thread
            nonlocal stopped
            for item in items:
                if self.stop.is_set():
                    stopped = True
                    return
                yield item

        def prepare(group: list[ScanItem]) -> tuple[EncodedFiles, list[str]]:  # read_ahead's thread too
            nonlocal archived
            found: set[str] = set()
            if self.options.skip_archived:
                # Counted and marked seen, not a row each: an hourly job over a million files
                # would otherwise add a million rows to the journal every hour.
                found = self.journal.find_archived(self.batch.destination, [
                    (item.rel_path, item.size, item.mtime_ns) for item in group if item.skip_reason is None])
                archived += len(found)
            new = [self._new_file(prefix, item) for item in group if item.rel_path not in found]
            return self.journal.encode_files(new), sorted(found)

        # The walk runs a few groups ahead in its own thread while this one inserts.
        groups = read_ahead(walked(), SCAN_GROUP, prepare)
        try:
            for group, seen in groups:
                if self.stop.is_set():
                    return
                self.journal.add_files(self.batch_id, group, durable=False, seen_archived=seen)
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

    def _dispatch(self, dispatcher: Dispatcher, multipart: MultipartSender, shards: ShardSender,
                  records: Iterable[FileRecord | None] | None = None) -> None:
        todo = (FileState.PENDING, FileState.FAILED, FileState.UPLOADING)
        pack_under = self.options.pack_under
        planner = ShardPlanner(self.options.shard_size, shards.plan) if pack_under else None
        resent: set[int] = set()
        for record in self.journal.iter_files(self.batch_id, todo) if records is None else records:
            if self.stop.is_set():
                break
            if record is None:  # a claimed chunk ends: its small files' last shard with it
                if planner is not None:
                    planner.flush()
                continue
            if record.shard_no is not None:
                # A member of a shard an earlier run planned: the shard is sent again whole.
                if record.state is FileState.UPLOADING and record.shard_no not in resent:
                    resent.add(record.shard_no)
                    shards.resend(record.shard_no)
                continue
            path = self.tree.path(record)
            if record.state is FileState.FAILED:
                record = self._rescan(record, path)
            if (planner is not None and pack_under is not None and record.size < pack_under
                    and record.state is not FileState.UPLOADING and not record.upload_id):
                planner.add(record)
            elif record.size >= self.options.multipart_threshold or record.upload_id:
                multipart.send(record, path)
            elif self._async is not None:
                self._send_single_async(self._async, dispatcher, record, path)
            else:
                dispatcher.submit(self._send_single, record, path, reservation=dispatcher.reserve(record.size))
        if planner is not None and not self.stop.is_set():
            planner.flush()

    def _metadata(self, extra: dict[str, str]) -> dict[str, str]:
        return {"archup-batch": self.batch_id, **extra}

    # -- single PUT ---------------------------------------------------------

    def _rescan(self, record: FileRecord, path: str) -> FileRecord:
        """A file to send again takes its current size and mtime (it may have changed since the scan)."""
        try:
            info = self.tree.stat(path)
        except OSError:
            return record  # the read reports it (vanished, unreadable)
        if not stat.S_ISREG(info.st_mode) or source.same_file(info, record):
            return record
        return self.journal.refresh_file(self.batch_id, record.rel_path, info.st_size, info.st_mtime_ns,
                                         identity_of(info))

    def _read_single(self, record: FileRecord, path: str,
                     read: Callable[[str, FileRecord], T]) -> tuple[FileRecord, T] | None:
        """The file's bytes, as ``read`` gives them (the tree's read_whole or read_held), read
        again (up to CHANGED_ATTEMPTS) while it keeps changing; None: failed."""
        for attempt in range(1, CHANGED_ATTEMPTS + 1):
            try:
                return record, read(path, record)
            except FileChanged as error:
                fresh = self._rescan(record, path)
                if attempt == CHANGED_ATTEMPTS or fresh is record:
                    self.outcomes.failed(record, f"{error} ({attempt} attempt(s))")
                    return None
                if fresh.size >= self.options.multipart_threshold:
                    self.outcomes.failed(fresh, "grew past the multipart threshold during upload; resuming sends it")
                    return None
                record = fresh
            except OSError as error:
                reason = permanent_reason(error)
                if reason is not None:
                    self.outcomes.skipped(record, reason)  # sealed without it, as an unreadable directory
                else:
                    self.outcomes.failed(record, describe_read_error(error))
                return None
        return None

    def _send_single(self, record: FileRecord, path: str) -> None:
        if self.stop.is_set():
            return  # queued before the stop: the file stays pending for the resumer
        self.outcomes.started(record)
        read = self._read_single(record, path, self.tree.read_whole)
        if read is None:
            return
        record, body = read
        digest = hashlib.sha256(body).digest()
        sha256 = digest.hex()
        crash_point("before-put-object")
        try:
            etag = self.store.put_object(record.key, body, sha256_digest=digest,
                                         metadata=self._metadata({SHA256_METADATA: sha256}),
                                         content_type=source.content_type(record.rel_path), archive=True)
        except TransferError as error:
            self.outcomes.failed(record, str(error))
            return
        crash_point("after-put-object")
        self.outcomes.sent(len(body))
        self._writer.put(record, sha256, etag)

    def _send_single_async(self, puts: AsyncPuts, dispatcher: Dispatcher, record: FileRecord, path: str) -> None:
        """A small file on the dispatching thread: read and hash it here, start its PUT, and
        end it in the store's callback (no pool worker waits on it). Its slot and bytes are
        held from the read to that callback, and the file kept open: the CRT sends it by
        reading it again itself (through the descriptor's own path, never the file's name).
        If the file is not what was read once the PUT ended, the bytes read and hashed are
        sent again from memory, so the object is always the recorded one."""
        release = dispatcher.hold(record.size)
        held: HeldRead | None = None

        def end() -> None:
            if held is not None:
                held.close()
            release()

        try:
            if self.stop.is_set():
                end()  # stopped while waiting for a stream: the file stays pending for the resumer
                return
            self.outcomes.started(record)
            read = self._read_single(record, path, self.tree.read_held)
            if read is None:
                end()
                return
            record, held = read
            body = held.body
            digest = hashlib.sha256(body).digest()
            sha256 = digest.hex()
            metadata = self._metadata({SHA256_METADATA: sha256})
            content_type = source.content_type(record.rel_path)
            crash_point("before-put-object")

            def send_again() -> None:
                try:
                    puts.put_object_async(record.key, body, sha256_digest=digest, metadata=metadata,
                                          content_type=content_type, archive=True,
                                          done=lambda etag, error: done(etag, error, from_file=False))
                except Exception as error:
                    self._stop_for(error)
                    end()

            def done(etag: str | None, error: Exception | None, *, from_file: bool = True) -> None:
                # on the store's thread
                try:
                    if from_file and held is not None and not held.unchanged():
                        # What the store read may not be what was hashed: a server that checks the
                        # checksum (or, with --checksum none, the signed payload) refused it, one
                        # that does not may have stored it.
                        log.info("%s changed while it was sent; sending the bytes read again", record.rel_path)
                        # From a thread of its own: this is the store's thread, which a --bwlimit
                        # wait before the PUT would hold up for every other request.
                        threading.Thread(target=send_again, name="archup-send-again", daemon=True).start()
                        return  # ends with that PUT
                    if error is None and etag is not None:
                        crash_point("after-put-object")
                        self.outcomes.sent(len(body))
                        self._writer.put(record, sha256, etag)
                    elif isinstance(error, TransferError):
                        self.outcomes.failed(record, str(error))
                    else:
                        self._stop_for(error or ArchupError("PutObject answered without an ETag"))
                except Exception as failure:  # never lost in the store's thread
                    self._stop_for(failure)
                end()

        except Exception as error:
            end()
            self._stop_for(error)
            return
        except BaseException:
            end()
            raise
        try:
            puts.put_object_async(record.key, body, sha256_digest=digest, metadata=metadata,
                                  content_type=content_type, archive=True, send_filepath=held.fd_path, done=done)
        except Exception as error:
            end()
            self._stop_for(error)

    def _stop_for(self, error: Exception) -> None:
        """A destination-wide error stops the batch as itself; anything else is a bug, which
        stops it too (as in a pool worker: never lost in a callback or a thread)."""
        self.outcomes.stop_with(error if isinstance(error, ArchupError)
                                else ArchupError(f"internal error in an upload: {error!r}"))
