"""The multipart transfer of one file: an object with an explicit state and one lock.

A pipeline per file: the dispatching thread hands the file to a reader (the dispatcher's
reader pool, a few files at once). The reader opens the upload, then reads the file once,
sequentially, ``readinto`` pooled part buffers, hashing the whole file with SHA-256 as it
reads (so the file's digest comes from the upload's own pass), and hands each part that
the server does not already hold to the shared pool of upload streams. The stream that
sends a part computes its CRC; the CRCs are combined in part order at completion, from
the parts the journal recorded. Whichever thread sees the transfer settle (the whole file
read, or a problem, and no part in flight) finishes it, once: completes the upload,
leaves it for the resumer, or aborts it and fails the file.

Durability order (docs/design.md): the upload id is in the journal the moment
CreateMultipartUpload returns; a part is recorded after UploadPart returned; the
file is marked uploaded only after CompleteMultipartUpload returned.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections.abc import Callable
from enum import Enum
from typing import IO

from . import source
from .checksums import (
    CRC_ALGORITHMS,
    SHA256_B64_LENGTH,
    crc_algorithm_of,
    crc_combine,
    crc_from_b64,
    crc_of,
    part_matches,
)
from .crashpoints import crash_point
from .dispatch import Dispatcher, PartBuffer
from .errors import ArchupError, TransferError
from .journal import FileRecord, Journal, PartRecord
from .outcomes import Outcomes
from .reconcile import Reconciler
from .source import FileChanged, SourceTree, check_unchanged, describe_read_error
from .states import FileState
from .store import CHECKSUM_REFUSED, SHA256_METADATA, MultipartChecksum, ObjectStore, UploadedPart
from .unreadable import permanent_reason

log = logging.getLogger("archup.upload")

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
MEMORY_CAP = 1024 * MiB  # file bytes in flight a grown part size may raise the budget to
READERS = 4  # multipart files read at once (each reader feeds the shared upload streams)


def part_size_for(size: int, configured: int) -> int:
    """The configured part size, grown (in whole MiB) so the file needs at most 10,000 parts."""
    part_size = max(configured, MIN_PART_SIZE)
    if size > part_size * MAX_PARTS:
        needed = -(-size // MAX_PARTS)
        part_size = -(-needed // MiB) * MiB
    return part_size


class TransferState(Enum):
    READING = "reading"          # the reader is still reading parts
    READ = "read"                # the whole file was read; parts may still be in flight
    INTERRUPTED = "interrupted"  # the run stops: the upload is left for the resumer as recorded
    FAILED = "failed"            # give up: abort the upload, fail the file (or send it again if lost)
    FINISHED = "finished"        # one thread has taken the ending; nothing else happens to it


_LIVE = (TransferState.READING, TransferState.READ)


class MultipartTransfer:
    """Book-keeping of one multipart file whose parts are spread over the pool."""

    def __init__(self, record: FileRecord, upload_id: str, part_size: int, checksum: MultipartChecksum,
                 expected_sha256: str | None) -> None:
        self.record = record
        self.upload_id = upload_id
        self.part_size = part_size
        self.checksum = checksum
        # The SHA-256 the upload was created with (its metadata), from a read before this one.
        self.expected_sha256 = expected_sha256
        self.lock = threading.Lock()
        self.state = TransferState.READING
        self.ending: TransferState | None = None  # what FINISHED ended as: READ, INTERRUPTED or FAILED
        self.reason: str | None = None
        self.lost = False  # the server answered NoSuchUpload: the upload is gone
        self.outstanding = 0
        self.sha256: str | None = None

    @property
    def live(self) -> bool:
        """Parts are still worth sending."""
        with self.lock:
            return self.state in _LIVE

    def part_started(self) -> None:
        with self.lock:
            self.outstanding += 1

    def part_ended(self) -> bool:
        """A part's request ended; True for the one caller that must now finish the transfer."""
        with self.lock:
            self.outstanding -= 1
            return self._take_ending()

    def fail(self, reason: str, *, lost: bool = False) -> None:
        with self.lock:
            self.lost = self.lost or lost
            if self.state in _LIVE:
                self.state, self.reason = TransferState.FAILED, reason

    def interrupt(self) -> None:
        with self.lock:
            if self.state in _LIVE:
                self.state = TransferState.INTERRUPTED

    def reader_ended(self, *, read_all: bool, sha256: str, error: str | None) -> bool:
        """The reader stopped: the whole file read, a read error, or a stop. True for the one
        caller that must now finish the transfer."""
        with self.lock:
            if self.state is TransferState.READING:
                if error is not None:
                    self.state, self.reason = TransferState.FAILED, error
                elif not read_all:
                    self.state = TransferState.INTERRUPTED
                elif self.expected_sha256 and sha256 != self.expected_sha256:
                    self.state = TransferState.FAILED
                    self.reason = ("changed during upload: its SHA-256 differs from the one read "
                                   "before the upload (and put in the object's metadata)")
                else:
                    self.state, self.sha256 = TransferState.READ, sha256
            return self._take_ending()

    def _take_ending(self) -> bool:
        """Under the lock: the transfer settles once nothing is read or in flight."""
        if self.state in (TransferState.READING, TransferState.FINISHED) or self.outstanding:
            return False
        self.ending, self.state = self.state, TransferState.FINISHED
        return True


def _resumed_checksum(reported: MultipartChecksum, recorded: list[PartRecord],
                      configured: MultipartChecksum) -> MultipartChecksum:
    """The checksum kind of an upload that a journal older than schema 4 did not record: as
    ListParts reports it, else as the parts the journal recorded show it, else (nothing sent
    yet) as configured now."""
    if reported.algorithm:
        return reported
    for part in recorded:
        algorithm = crc_algorithm_of(part.checksum)
        if algorithm is not None:
            return MultipartChecksum(algorithm, full_object=True)
        if part.checksum and len(part.checksum) == SHA256_B64_LENGTH:
            return MultipartChecksum("SHA256")
        if part.checksum is None:
            return MultipartChecksum(None)
    return configured


def full_crc(checksum: MultipartChecksum, parts: list[PartRecord]) -> int | None:
    """The whole file's CRC from its parts' CRCs (as each stream computed and sent them, or as
    a resumed run checked them against the bytes it read), combined in part order."""
    algorithm = checksum.algorithm
    if not checksum.full_object or algorithm not in CRC_ALGORITHMS or any(not p.checksum for p in parts):
        return None
    assert algorithm is not None
    crcs = [(crc_from_b64(part.checksum or ""), part.size) for part in parts]
    total = crcs[0][0]
    for crc, size in crcs[1:]:
        total = crc_combine(algorithm, total, crc, size)
    return total


class MultipartSender:
    """Sends files as multipart uploads through the dispatcher, one :class:`MultipartTransfer` each."""

    def __init__(self, journal: Journal, store: ObjectStore, batch_id: str, tree: SourceTree,
                 dispatcher: Dispatcher, outcomes: Outcomes, reconciler: Reconciler, *,
                 part_size: int, prehash: bool, metadata: Callable[[dict[str, str]], dict[str, str]]) -> None:
        self.journal = journal
        self.store = store
        self.batch_id = batch_id
        self.tree = tree
        self.dispatcher = dispatcher
        self.outcomes = outcomes
        self.reconciler = reconciler
        self.part_size = part_size
        self.prehash = prehash
        self._metadata = metadata
        self._stop = outcomes.stop
        self._lock = threading.Lock()
        self.restarted: set[str] = set()  # files whose upload the server lost, sent again this run

    def send(self, record: FileRecord, path: str) -> None:
        """Runs in the dispatching thread: hands the file to a reader (blocks while every reader
        is busy). The file's ticket, taken now, puts its parts in line in dispatch order."""
        self.dispatcher.read(self._read_file, record, path, self.dispatcher.budget.ticket())

    def _read_file(self, record: FileRecord, path: str, ticket: int) -> None:
        """A reader: opens the file and its upload, then reads and submits its parts."""
        try:
            handle = self.tree.open(path)
            check_unchanged(os.fstat(handle.fileno()), record)
        except (OSError, FileChanged) as error:
            reason = permanent_reason(error)
            if reason is not None:  # sealed without it, as an unreadable directory (its upload: finalize aborts it)
                self.outcomes.skipped(record, reason)
                return
            if record.state is not FileState.UPLOADING:
                self.journal.start_file(self.batch_id, record.rel_path)
            self.outcomes.failed(record, describe_read_error(error))
            return
        with handle:
            try:
                opened = self._open_upload(record, handle)
            except TransferError as error:
                self.outcomes.failed(record, str(error))
                return
            except (OSError, FileChanged) as error:  # the hash before the upload
                self.outcomes.failed(record, describe_read_error(error))
                return
            if opened is None:
                return
            transfer, reusable = opened
            # N parts in flight for a file whose parts grew, up to MEMORY_CAP (a 2 TiB file has
            # 210 MiB parts: 16 of them would be 3.4 GiB); fewer streams for it past that.
            parallel = self.dispatcher.parallel
            self.dispatcher.budget.ensure(min(parallel * transfer.part_size,
                                              max(parallel * self.part_size, MEMORY_CAP)))
            self.outcomes.started(record)
            self._read_parts(transfer, handle, reusable, ticket)

    def _read_parts(self, transfer: MultipartTransfer, handle: io.BufferedReader, reusable: dict[int, PartRecord],
                    ticket: int) -> None:
        record = transfer.record
        hasher = hashlib.sha256()
        part_number = total = 0
        error_text: str | None = None
        try:
            while total < record.size:
                if self._stop.is_set() or not transfer.live:
                    break
                want = min(transfer.part_size, record.size - total)
                buffer = self.dispatcher.buffer(want, ticket)
                assert buffer.data is not None
                try:
                    got = handle.readinto(buffer.data)
                    if got != want:
                        raise FileChanged(f"short read: got {total + (got or 0)} of {record.size} bytes")
                    hasher.update(buffer.data)  # the GIL is released: the streams run meanwhile
                except BaseException:
                    buffer.release()
                    raise
                total += want
                part_number += 1
                recorded = reusable.get(part_number)
                if recorded is not None and part_matches(buffer.data, recorded):
                    buffer.release()  # the server already holds these bytes
                    continue
                transfer.part_started()
                self.dispatcher.submit(self._send_part, transfer, part_number, buffer, reservation=buffer)
            else:
                if handle.read(1):
                    raise FileChanged("file grew during upload")
                check_unchanged(os.fstat(handle.fileno()), record)
        except (OSError, FileChanged) as error:
            error_text = describe_read_error(error)
        if transfer.reader_ended(read_all=total == record.size, sha256=hasher.hexdigest(), error=error_text):
            self._finish(transfer)

    def _send_part(self, transfer: MultipartTransfer, part_number: int, buffer: PartBuffer) -> None:
        """An upload stream: the part's CRC, then the part. The buffer goes back to the pool
        when this task ends (the dispatcher releases it with the task's slot)."""
        body = buffer.data
        assert body is not None
        try:
            if not transfer.live:
                return
            if self._stop.is_set():
                transfer.interrupt()
                return
            algorithm = transfer.checksum.algorithm
            crc = crc_of(algorithm, body) if algorithm in CRC_ALGORITHMS else None
            part = self.store.upload_part(transfer.record.key, transfer.upload_id, part_number, body,
                                          transfer.checksum, crc=crc)
            crash_point("after-upload-part")
            self.journal.record_part(self.batch_id, transfer.record.rel_path,
                                     PartRecord(part_number, len(body), part.etag, part.checksum))
            self.outcomes.sent(len(body))
        except TransferError as error:
            transfer.fail(str(error), lost=error.code == "NoSuchUpload")
        except BaseException:
            # Credentials gone, the journal unwritable, ...: the run stops. The upload is left
            # as the journal knows it, for the resumer; never completed without this part.
            transfer.interrupt()
            raise
        finally:
            if transfer.part_ended():
                self._finish(transfer)

    def _open_upload(self, record: FileRecord,
                     handle: IO[bytes]) -> tuple[MultipartTransfer, dict[int, PartRecord]] | None:
        """The multipart upload to send this file into: the recorded one if the server still
        has it (with the parts that can be reused), else a new one. None: the file is settled,
        or the run was stopped while it was hashed first."""
        if record.state is FileState.UPLOADING and record.upload_id and record.part_size:
            on_server = self.store.list_parts(record.key, record.upload_id)
            if on_server is not None:
                recorded = self.journal.list_parts(self.batch_id, record.rel_path)
                reusable = {part.part_number: part for part in recorded
                            if on_server.parts.get(part.part_number) == (part.size, part.etag)}
                # The upload keeps the checksum kind it was created with, whatever this run's options.
                checksum = (MultipartChecksum.decode(record.checksum_kind) if record.checksum_kind
                            else _resumed_checksum(on_server.checksum, recorded, self.store.multipart_checksum()))
                return MultipartTransfer(record, record.upload_id, record.part_size, checksum, record.sha256), reusable
            if self.reconciler.settle_lost_completion(record):
                return None
            self.journal.reset_file(self.batch_id, record.rel_path,
                                    "the server no longer knows the upload; sending the file again")
        elif record.state is FileState.UPLOADING:
            # Started but no upload id recorded: any upload the crash left is an
            # orphan under the batch prefix, which the orphan sweep aborts.
            self.journal.reset_file(self.batch_id, record.rel_path, "restarted after an interrupted run")
        return self._create_upload(record, handle)

    def _create_upload(self, record: FileRecord,
                       handle: IO[bytes]) -> tuple[MultipartTransfer, dict[int, PartRecord]] | None:
        part_size = part_size_for(record.size, record.part_size or self.part_size)
        self.journal.start_file(self.batch_id, record.rel_path)
        metadata = {"archup-part-size": str(part_size)}
        expected: str | None = None
        if self.prehash:
            # Object metadata is fixed at creation, before the upload pass has read the file:
            # hash it first (as rclone does), and the upload pass must read the same digest.
            expected = source.hash_handle(handle, record, self._stop)
            if expected is None:
                return None  # stopped: the file stays uploading without an upload, restarted next run
            metadata[SHA256_METADATA] = expected
        checksum = self.store.multipart_checksum()
        tagged, content_type = self._metadata(metadata), source.content_type(record.rel_path)
        try:
            upload_id = self.store.create_multipart(record.key, checksum, metadata=tagged, content_type=content_type)
        except TransferError as error:
            if error.code != CHECKSUM_REFUSED:
                raise
            # The endpoint does not know CRC64NVME: this upload and every later one use CRC32.
            log.info("%s: the endpoint refused CRC64NVME; full-object checksums are CRC32", record.rel_path)
            checksum = self.store.multipart_checksum()
            upload_id = self.store.create_multipart(record.key, checksum, metadata=tagged, content_type=content_type)
        crash_point("after-create-multipart")
        # Record the undo as soon as the resource exists.
        self.journal.record_upload_id(self.batch_id, record.rel_path, upload_id, part_size, expected,
                                      checksum.encode())
        crash_point("after-record-upload-id")
        return MultipartTransfer(record, upload_id, part_size, checksum, expected), {}

    def _finish(self, transfer: MultipartTransfer) -> None:
        if transfer.ending is TransferState.INTERRUPTED:
            # Leave the upload as recorded (uploading, with its id and parts): the
            # resumer continues it from the parts the server holds.
            return
        if transfer.ending is TransferState.FAILED:
            assert transfer.reason is not None
            self._give_up(transfer, transfer.reason)
            return
        self._complete(transfer)

    def _complete(self, transfer: MultipartTransfer) -> None:
        record = transfer.record
        # The completion list comes from the journal: exactly the parts it recorded, which
        # must be the whole file read, part after part.
        parts = self.journal.list_parts(self.batch_id, record.rel_path)
        if ([p.part_number for p in parts] != list(range(1, len(parts) + 1))
                or sum(p.size for p in parts) != record.size):
            self._give_up(transfer, f"internal error: the journal's parts ({len(parts)}, "
                          f"{sum(p.size for p in parts)} bytes) do not make up the file")
            return
        try:
            etag = self.store.complete_multipart(
                record.key, transfer.upload_id, [UploadedPart(p.part_number, p.etag, p.checksum) for p in parts],
                transfer.checksum, full_crc=full_crc(transfer.checksum, parts), size=record.size)
        except TransferError as error:
            if error.code == "NoSuchUpload" and self.reconciler.settle_lost_completion(record):
                return  # a retried Complete whose first answer was lost
            transfer.lost = error.code == "NoSuchUpload"
            self._give_up(transfer, str(error))
            return
        crash_point("after-complete-multipart")
        assert transfer.sha256 is not None
        self.outcomes.uploaded(record, transfer.sha256, etag)

    def _give_up(self, transfer: MultipartTransfer, reason: str) -> None:
        """Abort the upload (its parts stop costing storage), then fail the file by name; an
        upload the server lost is sent again from the start, once a run."""
        record = transfer.record
        if transfer.lost:
            with self._lock:
                again = record.rel_path not in self.restarted
                self.restarted.add(record.rel_path)
            if again:
                log.info("%s: the server lost its upload (NoSuchUpload); sending it again", record.rel_path)
                self.journal.reset_file(self.batch_id, record.rel_path,
                                        "the server lost its upload (NoSuchUpload); sending it again")
                return
        try:
            if not transfer.lost:  # nothing left to abort
                self.store.abort_multipart(record.key, transfer.upload_id)
        except ArchupError:
            # An upload left open lives under the batch prefix, where finalize's sweep,
            # 'archup abort' and 'archup gc' find it with ListMultipartUploads.
            pass
        self.outcomes.failed(record, reason)
