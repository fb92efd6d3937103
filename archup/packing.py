"""Packing small files into tar shards as they are uploaded (``--pack-under``).

The dispatching thread gathers the batch's small pending files, in journal order, into
shards of about the shard size (:class:`ShardPlanner`); each shard is planned in one
journal transaction -- its members and their order fixed, each member uploading in it --
before a byte is read (:meth:`ShardSender.plan`). An upload stream then reads the members
(every read checked as a single file's is: same file, inside the source, unchanged), lays
them out as :mod:`archup.shards` says, appends the index, and stores the shard: one
PutObject when it fits in a part, else a multipart upload whose parts are recorded as
they land. Only after the store confirmed the shard does one transaction mark it and its
members uploaded, each member with the SHA-256 of the bytes it has in the shard.

A member that changed since the scan, or can no longer be read, fails (or is skipped) by
name, and the shard is dropped and planned again without it, under a new number: no shard
is ever stored with member bytes other than the ones hashed into its index and the
journal. A shard left uploading by a crash is sent again from its recorded plan: its bytes
are a function of the journal and the files, so the parts the server holds are reused
where the bytes read again match them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence

from .checksums import CRC_ALGORITHMS, crc_of, part_matches
from .crashpoints import crash_point
from .dispatch import Dispatcher
from .errors import ArchupError, TransferError
from .journal import FileRecord, Journal, PartRecord, ShardRecord
from .multipart import full_crc
from .outcomes import Outcomes
from .shards import BLOCK, Layout, Member, Placed, header, index_line, index_member, layout, padding
from .source import FileChanged, SourceTree, describe_read_error
from .states import FileState, ShardState
from .store import CHECKSUM_REFUSED, SHA256_METADATA, MultipartChecksum, ObjectStore, UploadedPart
from .unreadable import permanent_reason

log = logging.getLogger("archup.upload")

MiB = 1024 * 1024
DEFAULT_SHARD_SIZE = 8 * MiB
MIN_SHARD_SIZE = 64 * 1024
MAX_SHARD_SIZE = 5 * 1024 * MiB
SHARD_CONTENT_TYPE = "application/x-tar"
SHARD_METADATA = "archup-shard-members"
# Shards planned or in flight at once: one being read while one is sent. Packing is bound
# by reading the members (the CPU), not by the network: 4 held 57 MiB more at 100,000 files
# and sent no faster (docs/benchmarks.md).
SHARDS_IN_FLIGHT = 2
_DIGEST_PLACEHOLDER = "0" * 64
REPLANNED = "its shard was planned again without a member that changed or could not be read"


def member_cost(record: FileRecord, head: bytes | None = None) -> int:
    """What one member adds to a shard, about: header(s), data, padding and index line
    (whose offset has at most 12 digits more than 0)."""
    if head is None:
        head = header(record.rel_path, record.size, record.mtime_ns)
    return (len(head) + record.size + padding(record.size)
            + len(index_line(record.rel_path, 0, record.size, _DIGEST_PLACEHOLDER)) + 12)


def shard_overhead() -> int:
    """A shard's fixed bytes: the index's header, its padding and the end of the archive."""
    return 4 * BLOCK


class ShardPlanner:
    """Gathers small files into groups of about ``shard_size`` bytes (the dispatching thread)."""

    def __init__(self, shard_size: int, emit: Callable[[list[FileRecord], list[bytes]], None]) -> None:
        self.shard_size = shard_size
        self._emit = emit
        self._members: list[FileRecord] = []
        self._heads: list[bytes] = []
        self._bytes = shard_overhead()

    def add(self, record: FileRecord) -> None:
        head = header(record.rel_path, record.size, record.mtime_ns)
        cost = member_cost(record, head)
        if self._members and self._bytes + cost > self.shard_size:
            self.flush()
        self._members.append(record)
        self._heads.append(head)
        self._bytes += cost

    def flush(self) -> None:
        members, heads = self._members, self._heads
        self._members, self._heads, self._bytes = [], [], shard_overhead()
        if members:
            self._emit(members, heads)


def layout_of(records: Sequence[FileRecord], heads: Sequence[bytes] | None = None) -> Layout:
    return layout([Member(record.rel_path, record.size, record.mtime_ns) for record in records], heads=heads)


class _Problems(Exception):
    """Members that cannot go into this shard: (state, reason) by path."""

    def __init__(self, problems: dict[str, tuple[FileState, str]]) -> None:
        super().__init__(f"{len(problems)} member(s) cannot be packed")
        self.problems = problems


class _Stopped(Exception):
    """The run stops: the shard is left uploading, as recorded, for the resumer."""


class ShardSender:
    """Plans shards and sends them on the dispatcher's upload streams."""

    def __init__(self, journal: Journal, store: ObjectStore, batch_id: str, tree: SourceTree,
                 dispatcher: Dispatcher, outcomes: Outcomes, *, part_size: int,
                 metadata: Callable[[dict[str, str]], dict[str, str]]) -> None:
        self.journal = journal
        self.store = store
        self.batch_id = batch_id
        self.tree = tree
        self.dispatcher = dispatcher
        self.outcomes = outcomes
        self.part_size = part_size
        self._metadata = metadata
        self._stop = outcomes.stop
        self._in_flight = threading.BoundedSemaphore(max(1, min(dispatcher.parallel, SHARDS_IN_FLIGHT)))

    # -- the dispatching thread -------------------------------------------------

    def plan(self, records: list[FileRecord], heads: list[bytes] | None = None) -> None:
        """Fix a new shard of these files in the journal, then queue it."""
        shape = layout_of(records, heads)
        shard = self.journal.plan_shard(self.batch_id, [(record.rel_path, placed.data_offset)
                                                        for record, placed in zip(records, shape.members)],
                                        shape.size)
        self._queue(shard, records, shape)

    def resend(self, shard_no: int) -> None:
        """Queue a shard an earlier run left uploading, as its plan recorded it."""
        shard = self.journal.get_shard(self.batch_id, shard_no)
        if shard.state is not ShardState.UPLOADING:
            return
        members = self.journal.shard_members(self.batch_id, shard_no)
        shape = layout_of(members)
        if (shape.size != shard.size or len(members) != shard.members
                or any(record.shard_offset != placed.data_offset for record, placed in zip(members, shape.members))):
            # Not the layout it was planned with: plan its members afresh.
            self.journal.drop_shard(self.batch_id, shard_no, "its recorded layout no longer matches; planned again",
                                    {})
            self.plan([self.journal.get_file(self.batch_id, record.rel_path) for record in members])
            return
        self._queue(shard, members, shape)

    def _queue(self, shard: ShardRecord, members: list[FileRecord], shape: Layout) -> None:
        self._in_flight.acquire()
        try:
            for record in members:
                self.outcomes.started(record)
            held = min(shape.size, self.part_size)
            self.dispatcher.submit(self._send, shard, members, shape, reservation=self.dispatcher.reserve(held))
        except BaseException:
            self._in_flight.release()
            raise

    # -- an upload stream -----------------------------------------------------------

    def _send(self, shard: ShardRecord, members: list[FileRecord], shape: Layout) -> None:
        try:
            self._send_shard(shard, members, shape)
        finally:
            self._in_flight.release()

    def _send_shard(self, shard: ShardRecord, members: list[FileRecord], shape: Layout) -> None:
        while True:
            if self._stop.is_set():
                return  # left uploading as planned: the resumer sends it
            try:
                if shape.size <= self.part_size and not shard.upload_id:
                    self._put(shard, members, shape)
                else:
                    self._put_parts(shard, members, shape)
                return
            except _Stopped:
                return
            except _Problems as found:
                replanned = self._drop(shard, members, found.problems)
                if not replanned:
                    return
                shard, members, shape = replanned
            except TransferError as error:
                self._fail(shard, members, str(error))
                return

    def _read(self, record: FileRecord) -> bytes:
        """A member's bytes, read as a single file's are; _Problems names it if it cannot be."""
        try:
            return self.tree.read_whole(self.tree.path(record), record)
        except FileChanged as error:
            raise _Problems({record.rel_path: (FileState.FAILED, f"changed since the scan ({error}); "
                                               "the next run sends it as it is then")}) from None
        except OSError as error:
            reason = permanent_reason(error)
            state = FileState.SKIPPED if reason is not None else FileState.FAILED
            raise _Problems({record.rel_path: (state, reason or describe_read_error(error))}) from None

    def _contents(self, members: list[FileRecord], shape: Layout) -> list[tuple[Placed, bytes]]:
        """Every member read (all problems gathered before the shard is given up)."""
        problems: dict[str, tuple[FileState, str]] = {}
        read: list[tuple[Placed, bytes]] = []
        for record, placed in zip(members, shape.members):
            if self._stop.is_set():
                raise _Stopped()
            try:
                read.append((placed, self._read(record)))
            except _Problems as found:
                problems.update(found.problems)
        if problems:
            raise _Problems(problems)
        return read

    def _put(self, shard: ShardRecord, members: list[FileRecord], shape: Layout) -> None:
        body = bytearray(shape.size)
        digests: list[str] = []
        for placed, data in self._contents(members, shape):
            body[placed.offset:placed.data_offset] = placed.head
            body[placed.data_offset:placed.data_offset + len(data)] = data
            digests.append(hashlib.sha256(data).hexdigest())
        body[shape.index_offset:] = index_member(shape, digests)
        whole = body  # sent as it is: a copy would hold the shard twice
        digest = hashlib.sha256(whole).digest()
        crash_point("before-put-shard")
        etag = self.store.put_object(shard.key, whole, sha256_digest=digest, content_type=SHARD_CONTENT_TYPE,
                                     metadata=self._metadata({SHA256_METADATA: digest.hex(),
                                                              SHARD_METADATA: str(len(members))}),
                                     archive=True)
        crash_point("after-put-shard")
        self.outcomes.sent(len(whole))
        self._complete(shard, members, digest.hex(), etag, digests)

    def _put_parts(self, shard: ShardRecord, members: list[FileRecord], shape: Layout) -> None:
        """A shard larger than a part: a multipart upload, its parts reused where the server
        holds the same bytes already."""
        upload_id, checksum, reusable = self._open_upload(shard, len(members))
        hasher = hashlib.sha256()
        digests: list[str] = []
        part = bytearray()
        part_number = 0

        def emit(chunk: bytes | bytearray | memoryview) -> None:
            nonlocal part, part_number
            view = memoryview(chunk)
            while view:
                room = self.part_size - len(part)
                part += view[:room]
                view = view[room:]
                if len(part) == self.part_size:
                    part_number += 1
                    self._send_part(shard, upload_id, checksum, part_number, part, reusable)
                    part = bytearray()

        try:
            for record, placed in zip(members, shape.members):
                if self._stop.is_set():
                    raise _Stopped()
                data = self._read(record)
                digests.append(hashlib.sha256(data).hexdigest())
                for chunk in (placed.head, data, bytes(padding(len(data)))):
                    hasher.update(chunk)
                    emit(chunk)
            tail = index_member(shape, digests)
            hasher.update(tail)
            emit(tail)
            if part:
                part_number += 1
                self._send_part(shard, upload_id, checksum, part_number, part, reusable)
        except (_Problems, TransferError):
            self._abort(shard.key, upload_id)  # its members go into a new shard, with a new upload
            raise
        parts = self.journal.list_shard_parts(self.batch_id, shard.shard_no)
        if ([p.part_number for p in parts] != list(range(1, part_number + 1))
                or sum(p.size for p in parts) != shape.size):
            raise TransferError(f"shard {shard.key}: the journal's parts do not make up the shard", "Internal")
        etag = self.store.complete_multipart(
            shard.key, upload_id, [UploadedPart(p.part_number, p.etag, p.checksum) for p in parts], checksum,
            full_crc=full_crc(checksum, parts), size=shape.size)
        crash_point("after-complete-shard")
        self._complete(shard, members, hasher.hexdigest(), etag, digests)

    def _open_upload(self, shard: ShardRecord,
                     count: int) -> tuple[str, MultipartChecksum, dict[int, PartRecord]]:
        if shard.upload_id:
            on_server = self.store.list_parts(shard.key, shard.upload_id)
            if on_server is not None and shard.checksum_kind:
                recorded = self.journal.list_shard_parts(self.batch_id, shard.shard_no)
                reusable = {part.part_number: part for part in recorded
                            if on_server.parts.get(part.part_number) == (part.size, part.etag)}
                return shard.upload_id, MultipartChecksum.decode(shard.checksum_kind), reusable
        checksum = self.store.multipart_checksum()
        tagged = self._metadata({SHARD_METADATA: str(count), "archup-part-size": str(self.part_size)})
        try:
            upload_id = self.store.create_multipart(shard.key, checksum, metadata=tagged,
                                                    content_type=SHARD_CONTENT_TYPE)
        except TransferError as error:
            if error.code != CHECKSUM_REFUSED:
                raise
            checksum = self.store.multipart_checksum()
            upload_id = self.store.create_multipart(shard.key, checksum, metadata=tagged,
                                                    content_type=SHARD_CONTENT_TYPE)
        self.journal.record_shard_upload(self.batch_id, shard.shard_no, upload_id, self.part_size, checksum.encode())
        crash_point("after-create-shard-upload")
        return upload_id, checksum, {}

    def _send_part(self, shard: ShardRecord, upload_id: str, checksum: MultipartChecksum, part_number: int,
                   body: bytearray, reusable: dict[int, PartRecord]) -> None:
        if self._stop.is_set():
            raise _Stopped()
        recorded = reusable.get(part_number)
        if recorded is not None and part_matches(body, recorded):
            return  # the server holds these very bytes
        algorithm = checksum.algorithm
        crc = crc_of(algorithm, body) if algorithm in CRC_ALGORITHMS else None
        part = self.store.upload_part(shard.key, upload_id, part_number, body, checksum, crc=crc)
        crash_point("after-upload-shard-part")
        self.journal.record_shard_part(self.batch_id, shard.shard_no,
                                       PartRecord(part_number, len(body), part.etag, part.checksum))
        self.outcomes.sent(len(body))

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.store.abort_multipart(key, upload_id)
        except ArchupError:
            pass  # left under the batch prefix, where finalize's sweep, abort and gc find it

    # -- endings ------------------------------------------------------------------

    def _complete(self, shard: ShardRecord, members: list[FileRecord], sha256: str, etag: str,
                  digests: list[str]) -> None:
        self.journal.complete_shard(self.batch_id, shard.shard_no, sha256=sha256, etag=etag,
                                    digests=[(record.rel_path, digest) for record, digest in zip(members, digests)])
        log.info("uploaded shard %s (%d files, %d bytes)", shard.key, len(members), shard.size)
        self.outcomes.packed(members)

    def _drop(self, shard: ShardRecord, members: list[FileRecord], problems: dict[str, tuple[FileState, str]]
              ) -> tuple[ShardRecord, list[FileRecord], Layout] | None:
        """Give the shard up for the members that cannot go in; plan the others again (None:
        none left)."""
        self.journal.drop_shard(self.batch_id, shard.shard_no, REPLANNED, problems)
        for record in members:
            if record.rel_path in problems:
                state, reason = problems[record.rel_path]
                self.outcomes.noted(record, state, reason)
        rest = [record for record in members if record.rel_path not in problems]
        if not rest:
            return None
        shape = layout_of(rest)
        replanned = self.journal.plan_shard(self.batch_id, [(record.rel_path, placed.data_offset)
                                                            for record, placed in zip(rest, shape.members)],
                                            shape.size)
        log.info("shard %s dropped (%d member(s) left out); its other members are shard %s",
                 shard.key, len(problems), replanned.key)
        return replanned, rest, shape

    def _fail(self, shard: ShardRecord, members: list[FileRecord], reason: str) -> None:
        """The store refused the shard: its members fail by name (a resume plans them again)."""
        text = f"shard {shard.key}: {reason}"
        self.journal.drop_shard(self.batch_id, shard.shard_no, text,
                                {record.rel_path: (FileState.FAILED, text) for record in members})
        for record in members:
            self.outcomes.noted(record, FileState.FAILED, text)
