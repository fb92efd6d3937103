"""Verify: re-check the bucket against a batch's manifest, or, before finalize, its journal.

The expected files come from ``manifest.jsonl`` for an enqueued batch (after
the summary's seal on it is read; the entries are streamed line by line and
hashed as they stream, never held whole), or from the journal's uploaded files
for a batch not yet finalized. Both come in key order, and so does the
listing of ``<batch prefix>files/`` (UTF-8 byte order; Python's ``str``
order is the same order), so one merge-join finds missing and unexpected
objects with bounded memory.

Per object present: its size and ETag from the listing; then, without
``deep``, its ``archup-sha256`` metadata (HEAD; a multipart object uploaded
without ``--prehash``, the default, has none, so its size and ETag are its check); with ``deep``, the
object's bytes re-hashed with SHA-256 as they stream. The per-object requests
run on a small thread pool behind a bounded window, and their results are
taken back in key order, so the differences come out in key order.

A packed batch (``--pack-under``) has its small files in tar shards under
``<batch prefix>shards/``. Its shard list (``manifest-shards.jsonl``, or the
journal's uploaded shards) is read first and held (one small record per shard:
a shard holds megabytes of files, so a batch has few). A packed entry is not
looked for under ``files/``: it must name a listed shard and lie inside it, and
the number of entries naming a shard must be its member count. After the
files, the shard list is merged with the listing of ``shards/`` like the files'
(missing, size, ETag, unexpected objects, ``archup-sha256`` metadata). With
``deep`` each shard is streamed once, its whole SHA-256 checked, and every
member's bytes re-hashed at its offset against its entry: the packed entries
come in file order, not shard order, so they are spooled to a temporary SQLite
file on disk and read back per shard in offset order (memory stays one chunk
and a cursor). The shard's own index member is compared with the entries where
it is at most ``MAX_INDEX_BYTES`` (larger indexes are not compared).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from enum import Enum
from itertools import chain
from typing import Any, Union

from . import manifest
from .errors import DestinationError, TransferError, VerificationFailed
from .journal import BatchRecord, Journal
from .journal.records import SHARDS_DIR
from .manifest import reader
from .manifest.reader import BadLine, Entry, ManifestDefect, SealedStream, ShardEntry, Summary
from .scan import FILES_DIR, object_key
from .shards import BLOCK, INDEX_NAME, index_line
from .states import BatchState, FileState, ShardState
from .store import SHA256_METADATA, ObjectInfo, ObjectStore

CHUNK_SIZE = 1024 * 1024
DEFAULT_PARALLEL = 8
# A shard's index member is held to be compared with the entries only up to this size (an
# 8 MiB shard's index is at most some 1.5 MiB); a larger one is not compared.
MAX_INDEX_BYTES = 2 * 1024 * 1024


class Source(str, Enum):
    MANIFEST = "manifest"
    JOURNAL = "journal"


class Problem(str, Enum):
    # One file's object
    MISSING = "missing"                                        # expected: size; actual: None
    SIZE_MISMATCH = "size_mismatch"                            # sizes in bytes
    ETAG_MISMATCH = "etag_mismatch"                            # ETags without quotes
    METADATA_CHECKSUM_MISMATCH = "metadata_checksum_mismatch"  # archup-sha256 metadata vs expected
    CHECKSUM_MISMATCH = "checksum_mismatch"                    # SHA-256 of the bytes (deep)
    UNREADABLE = "unreadable"                                  # actual: the error
    UNEXPECTED = "unexpected"                                  # expected: None; actual: size
    # The manifest itself
    MANIFEST_MISSING = "manifest_missing"
    MANIFEST_INVALID = "manifest_invalid"
    ENTRIES_MISSING = "entries_missing"
    ENTRIES_CHECKSUM_MISMATCH = "entries_checksum_mismatch"
    ENTRIES_SIZE_MISMATCH = "entries_size_mismatch"
    ENTRIES_COUNT_MISMATCH = "entries_count_mismatch"
    TOTAL_BYTES_MISMATCH = "total_bytes_mismatch"
    ENTRY_INVALID = "entry_invalid"
    ENTRY_OUT_OF_ORDER = "entry_out_of_order"
    # Against the journal that sealed the batch (while it still knows it)
    MANIFEST_REPLACED = "manifest_replaced"                    # summary SHA-256: recorded at seal vs read
    ENTRY_NOT_IN_JOURNAL = "entry_not_in_journal"              # actual: the entry's sha256
    ENTRY_DIFFERS_FROM_JOURNAL = "entry_differs_from_journal"  # sha256: journal vs entry
    # The list of what was not archived (manifest-skipped.jsonl), where the summary seals one
    SKIPPED_MISSING = "skipped_missing"
    SKIPPED_CHECKSUM_MISMATCH = "skipped_checksum_mismatch"
    SKIPPED_SIZE_MISMATCH = "skipped_size_mismatch"
    SKIPPED_COUNT_MISMATCH = "skipped_count_mismatch"
    SKIPPED_ENTRY_INVALID = "skipped_entry_invalid"
    # A packed batch's shard list (manifest-shards.jsonl) and its shards
    SHARDS_MISSING = "shards_missing"                          # the summary seals a shard list that is not there
    SHARDS_CHECKSUM_MISMATCH = "shards_checksum_mismatch"
    SHARDS_SIZE_MISMATCH = "shards_size_mismatch"
    SHARDS_COUNT_MISMATCH = "shards_count_mismatch"
    SHARD_ENTRY_INVALID = "shard_entry_invalid"                # expected: line N; actual: what is wrong
    FILES_PACKED_MISMATCH = "files_packed_mismatch"            # summary's files_packed / packed entries
    SHARD_UNKNOWN = "shard_unknown"                            # a packed entry names a shard not in the list
    OUTSIDE_SHARD = "outside_shard"                            # expected: shard size; actual: offset + size
    SHARD_MEMBERS_MISMATCH = "shard_members_mismatch"          # members: shard list / entries naming it
    SHARD_INDEX_MISMATCH = "shard_index_mismatch"              # the shard's own index vs the entries (deep)


Value = Union[str, int, None]

# A forged manifest can make millions of differences: the report keeps the first ones and counts the rest.
MAX_DIFFERENCES = 1000

_ENTRIES_SEAL = {"sha256": Problem.ENTRIES_CHECKSUM_MISMATCH, "bytes": Problem.ENTRIES_SIZE_MISMATCH,
                 "count": Problem.ENTRIES_COUNT_MISMATCH}
_SKIPPED_SEAL = {"sha256": Problem.SKIPPED_CHECKSUM_MISMATCH, "bytes": Problem.SKIPPED_SIZE_MISMATCH,
                 "count": Problem.SKIPPED_COUNT_MISMATCH}
_SHARDS_SEAL = {"sha256": Problem.SHARDS_CHECKSUM_MISMATCH, "bytes": Problem.SHARDS_SIZE_MISMATCH,
                "count": Problem.SHARDS_COUNT_MISMATCH}


@dataclass(frozen=True)
class Difference:
    key: str | None
    path: str | None
    problem: Problem
    expected: Value
    actual: Value

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.path, "problem": self.problem.value,
                "expected": self.expected, "actual": self.actual}


@dataclass
class VerifyReport:
    batch_id: str
    source: Source
    deep: bool
    checked: int = 0
    differences: list[Difference] = field(default_factory=list)  # the first MAX_DIFFERENCES
    omitted: int = 0  # differences found past those
    packed: bool = False  # a packed batch: the two counts below are reported
    files_packed: int = 0  # of ``checked``, the files in shards
    shards_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def total_differences(self) -> int:
        return len(self.differences) + self.omitted

    def keep(self, difference: Difference) -> bool:
        """Keep a difference if there is room; count it either way. True when kept."""
        if len(self.differences) < MAX_DIFFERENCES:
            self.differences.append(difference)
            return True
        self.omitted += 1
        return False

    def as_dict(self) -> dict[str, Any]:
        document = {"batch_id": self.batch_id, "source": self.source.value, "checked": self.checked,
                    "ok": self.ok, "differences": [d.as_dict() for d in self.differences]}
        if self.omitted:
            document["differences_omitted"] = self.omitted
        if self.packed:
            document["files_packed"] = self.files_packed
            document["shards_checked"] = self.shards_checked
        return document

    def failure(self) -> VerificationFailed:
        return VerificationFailed(
            f"batch {self.batch_id}: the bucket differs from the {self.source.value} in "
            f"{self.total_differences} place(s), listed above; 'archup status {self.batch_id}' "
            "shows what the journal knows")


@dataclass(frozen=True)
class ExpectedFile:
    """One file the bucket should hold: a manifest entry, or a journal row in the same shape."""

    key: str
    path: str
    size: int
    sha256: str
    etag: str | None
    multipart: bool

    @classmethod
    def from_entry(cls, entry: Entry) -> ExpectedFile:
        return cls(key=entry.key, path=entry.path, size=entry.size, sha256=entry.sha256, etag=entry.etag,
                   multipart=entry.multipart)


def _bare_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag is not None else None


class _MemberSpool:
    """The packed entries of the batch on local disk, to be read back per shard in offset
    order (they arrive in file order). One temporary SQLite file; each worker thread reads
    it through a connection of its own, once the writes are done."""

    _BATCH = 1000

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="archup-verify-")
        self._path = os.path.join(self._directory.name, "members.db")
        self._writer = sqlite3.connect(self._path)
        self._writer.execute("PRAGMA journal_mode = OFF")  # a scratch file: nothing to recover
        self._writer.execute("PRAGMA synchronous = OFF")
        self._writer.execute("CREATE TABLE members (shard TEXT, offset INTEGER, size INTEGER, sha256 TEXT, "
                             "path TEXT)")
        self._pending: list[tuple[str, int, int, str, str]] = []

    def add(self, entry: Entry) -> None:
        assert entry.offset is not None
        self._pending.append((entry.key, entry.offset, entry.size, entry.sha256, entry.path))
        if len(self._pending) >= self._BATCH:
            self._flush()

    def _flush(self) -> None:
        self._writer.executemany("INSERT INTO members VALUES (?, ?, ?, ?, ?)", self._pending)
        self._pending.clear()

    def finish(self) -> None:
        """The writes are done: index them for the per-shard reads."""
        self._flush()
        self._writer.execute("CREATE INDEX members_by_shard ON members (shard, offset, path)")
        self._writer.commit()
        self._writer.close()

    def members(self, shard_key: str) -> Iterator[tuple[str, int, int, str]]:
        """(path, offset, size, sha256) of a shard's entries, in offset order (any thread)."""
        connection = sqlite3.connect(self._path)
        try:
            yield from connection.execute("SELECT path, offset, size, sha256 FROM members WHERE shard = ? "
                                          "ORDER BY offset, path", (shard_key,))
        finally:
            connection.close()

    def close(self) -> None:
        self._writer.close()  # a no-op once finished
        self._directory.cleanup()


class _MemberHashes:
    """Re-hashes a shard's members as its bytes stream past, in one pass: members (in offset
    order) start when the stream reaches them and end at their last byte. Once every member
    has started, the bytes from the end of the last one (the index member, if the entries
    are all of the shard's) are kept, up to ``MAX_INDEX_BYTES`` and a header."""

    def __init__(self, members: Iterator[tuple[str, int, int, str]]) -> None:
        self._members = members
        self._next = next(members, None)
        self._active: list[tuple[str, int, int, str, Any]] = []
        self.mismatches: list[tuple[str, str, str]] = []  # path, expected, actual
        self._end_of_members = 0
        self._tail_from: int | None = None
        self.tail = bytearray()
        self.tail_complete = True  # False: the tail was longer than the limit and cut

    def feed(self, position: int, chunk: bytes) -> None:
        end = position + len(chunk)
        view = memoryview(chunk)
        while self._next is not None and self._next[1] <= end:
            path, offset, size, sha256 = self._next
            self._active.append((path, offset, size, sha256, hashlib.sha256()))
            self._end_of_members = max(self._end_of_members, offset + size + (-size % BLOCK))
            self._next = next(self._members, None)
        still: list[tuple[str, int, int, str, Any]] = []
        for member in self._active:
            path, offset, size, sha256, hasher = member
            start, stop = max(offset, position), min(offset + size, end)
            if stop > start:
                hasher.update(view[start - position:stop - position])
            if offset + size <= end:
                self._done(member)
            else:
                still.append(member)
        self._active = still
        if self._next is None and self._tail_from is None:
            self._tail_from = self._end_of_members
        if self._tail_from is not None and end > self._tail_from:
            room = BLOCK + MAX_INDEX_BYTES - len(self.tail)
            piece = view[max(self._tail_from - position, 0):]
            if len(piece) > room:
                self.tail_complete = False
            self.tail += piece[:max(room, 0)]

    def _done(self, member: tuple[str, int, int, str, Any]) -> None:
        path, _, _, sha256, hasher = member
        actual = hasher.hexdigest()
        if actual != sha256:
            self.mismatches.append((path, sha256, actual))

    def finish(self) -> None:
        """The object ended: members it ended inside of are hashed as far as they went."""
        for member in self._active:
            self._done(member)
        self._active = []

    @property
    def index_offset(self) -> int:
        return self._end_of_members


def _index_of(tail: bytes) -> bytes | str:
    """The index member's JSON lines at the start of ``tail``, or why there is none."""
    if len(tail) < BLOCK:
        return "no tar header where the members end"
    try:
        info = tarfile.TarInfo.frombuf(tail[:BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError as error:
        return f"no tar header where the members end ({error})"
    if info.name != INDEX_NAME:
        return f"{info.name!r} where the members end, not {INDEX_NAME}"
    if BLOCK + info.size > len(tail):
        return "the index runs past the end of the shard"
    return bytes(tail[BLOCK:BLOCK + info.size])


@dataclass
class _Shards:
    """A packed batch's shards as its list (or journal) names them, and how many of the
    entries name each."""

    listed: dict[str, ShardEntry] = field(default_factory=dict)
    named: dict[str, int] = field(default_factory=dict)
    spool: _MemberSpool | None = None  # deep: the packed entries, to re-hash per shard


# A step of the merge: differences known at once, or a check that needs the network.
ObjectCheck = Callable[[], list[Difference]]
Step = Union[list[Difference], ObjectCheck]
Expected = Union[ExpectedFile, Difference]


class _Verification:
    def __init__(self, journal: Journal, store: ObjectStore, batch: BatchRecord, *, deep: bool, parallel: int,
                 on_difference: Callable[[Difference], None] | None) -> None:
        self.journal = journal
        self.store = store
        self.batch = batch
        self.deep = deep
        self.parallel = max(1, parallel)
        self.on_difference = on_difference
        self.report = VerifyReport(batch.batch_id, Source.MANIFEST, deep)
        # Differences about the manifest as a whole, known only once its entries were read.
        self.trailing: list[Difference] = []
        self.shards: _Shards | None = None  # a packed batch's shards (None: no shard list to check)

    def add(self, difference: Difference) -> None:
        if self.report.keep(difference) and self.on_difference is not None:
            self.on_difference(difference)

    # -- where the expected files come from --------------------------------

    def expected_files(self) -> Iterator[Expected] | None:
        """The files to check, or None: nothing to check them against (the problem reported)."""
        if self.batch.state is BatchState.ENQUEUED:
            entries = self._open_manifest()
            if entries is not None:
                return entries
            if self.batch.forgotten_at is not None:
                return None  # the journal forgot the file list: the manifest was the only one left
        self.report.source = Source.JOURNAL
        self.shards = self._journal_shards()
        return self._journal_files()

    def _new_shards(self) -> _Shards:
        self.report.packed = True
        return _Shards(spool=_MemberSpool() if self.deep else None)

    def _journal_shards(self) -> _Shards | None:
        """The batch's uploaded shards as its journal records them (None: it has none)."""
        shards: _Shards | None = None
        for record in self.journal.iter_shards(self.batch.batch_id, [ShardState.UPLOADED]):
            shards = shards or self._new_shards()
            shards.listed[record.key] = ShardEntry(record.key, record.size, record.sha256 or "", record.etag,
                                                   record.members, record.part_size)
        return shards

    def _journal_files(self) -> Iterator[Expected]:
        encode = manifest.entry_for(self.batch)
        for record in self.journal.iter_files(self.batch.batch_id, [FileState.UPLOADED]):
            entry = reader.to_entry(encode(record))
            if entry.packed:
                yield from self._packed(entry)
            else:
                yield ExpectedFile.from_entry(entry)

    def _open_manifest(self) -> Iterator[Expected] | None:
        """The manifest's entries, or None (the problem reported) when it cannot be used."""
        summary_key = self.batch.manifest_key or manifest.summary_key(self.batch)
        try:
            summary = reader.read_summary(self.store, summary_key, self.batch.batch_id)
        except ManifestDefect as defect:
            problem = Problem.MANIFEST_MISSING if defect.kind == "missing" else Problem.MANIFEST_INVALID
            expected = defect.expected if defect.kind == "missing" else f"{defect.what}: {defect.expected}"
            if defect.what == "JSON":
                expected = "JSON"
            self.add(Difference(summary_key, None, problem, expected, defect.actual))
            return None
        recorded = self.batch.summary_sha256
        if recorded is not None and summary.sha256 != recorded:
            # The journal recorded the summary it wrote: one sealed since is a forgery.
            self.add(Difference(summary_key, None, Problem.MANIFEST_REPLACED, recorded,
                                summary.sha256))
            return None
        if summary.skipped is not None:
            self.trailing.extend(self._check_skipped(summary, summary.skipped))
        if summary.shards is not None:
            self._read_shards(summary.shards)
        stream = SealedStream.open(self.store, summary.entries.key)
        if stream is None:
            self.add(Difference(summary.entries.key, None, Problem.ENTRIES_MISSING, summary.entries.sha256, None))
            return None
        return self._manifest_files(summary, stream)

    def _check_skipped(self, summary: Summary, seal: reader.Seal) -> list[Difference]:
        """The list of files the batch does not hold, against its seal and files_skipped."""
        stream = SealedStream.open(self.store, seal.key)
        if stream is None:
            return [Difference(seal.key, None, Problem.SKIPPED_MISSING, seal.sha256, None)]
        found: list[Difference] = []
        for number, line in enumerate(stream.lines(), start=1):
            reason = reader.skipped_problem(line)
            if reason is not None:
                found.append(Difference(seal.key, None, Problem.SKIPPED_ENTRY_INVALID, f"line {number}", reason))
        checks = [(_SKIPPED_SEAL[what], expected, actual) for what, expected, actual in stream.against(seal)]
        files_skipped = summary.count("files_skipped")
        if files_skipped is not None and files_skipped != stream.lines_read:
            checks.append((Problem.SKIPPED_COUNT_MISMATCH, files_skipped, stream.lines_read))
        found += [Difference(seal.key, None, problem, expected, actual) for problem, expected, actual in checks]
        return found

    def _read_shards(self, seal: reader.Seal) -> None:
        """The shard list, against its seal, held for the entries and the listing to be checked
        against (left None when it is missing: its shards cannot be checked)."""
        stream = SealedStream.open(self.store, seal.key)
        if stream is None:
            self.report.packed = True
            self.trailing.append(Difference(seal.key, None, Problem.SHARDS_MISSING, seal.sha256, None))
            return
        shards = self._new_shards()
        shards_prefix = self.batch.batch_prefix + SHARDS_DIR
        for number, line in enumerate(stream.lines(), start=1):
            item = reader.parse_shard(line, number)
            reason = (item.reason if isinstance(item, BadLine)
                      else f"{item.key} is not under {shards_prefix}" if not item.key.startswith(shards_prefix)
                      else f"{item.key} is listed twice" if item.key in shards.listed else None)
            if reason is not None:
                self.trailing.append(Difference(seal.key, None, Problem.SHARD_ENTRY_INVALID, f"line {number}",
                                                reason))
            elif isinstance(item, ShardEntry):
                shards.listed[item.key] = item
        self.trailing.extend(Difference(seal.key, None, _SHARDS_SEAL[what], expected, actual)
                             for what, expected, actual in stream.against(seal))
        self.shards = shards

    def _packed(self, entry: Entry) -> list[Difference]:
        """A packed entry against the shard list: a listed shard, and inside it."""
        self.report.checked += 1
        self.report.files_packed += 1
        shards = self.shards
        if shards is None:
            if self.report.source is Source.MANIFEST and self.report.packed:
                return []  # the shard list is missing (reported once): nothing to hold it against
            return [Difference(entry.key, entry.path, Problem.SHARD_UNKNOWN, "a shard of the list", entry.key)]
        shard = shards.listed.get(entry.key)
        if shard is None:
            return [Difference(entry.key, entry.path, Problem.SHARD_UNKNOWN, "a shard of the list", entry.key)]
        shards.named[entry.key] = shards.named.get(entry.key, 0) + 1
        assert entry.offset is not None
        if entry.offset + entry.size > shard.size:
            return [Difference(entry.key, entry.path, Problem.OUTSIDE_SHARD, shard.size, entry.offset + entry.size)]
        if shards.spool is not None:
            shards.spool.add(entry)
        return []

    def _manifest_files(self, summary: Summary, stream: SealedStream) -> Iterator[Expected]:
        seal = summary.entries
        count = total_bytes = packed = 0
        previous_key: str | None = None
        checked = self._journal_check()
        for item in reader.entries(stream.lines()):
            if isinstance(item, BadLine):
                what, _, reason = item.reason.partition(": ")
                yield Difference(seal.key, None, Problem.ENTRY_INVALID, f"line {item.number}: {what}", reason)
                continue
            count += 1
            total_bytes += item.size
            # Entries are in file-key order; a packed entry's file key is the one it would have had.
            file_key = self._file_key(item)
            if previous_key is not None and file_key <= previous_key:
                # The merge-join needs strict key order; an entry out of it cannot be placed.
                yield Difference(file_key, item.path, Problem.ENTRY_OUT_OF_ORDER,
                                 f"after {previous_key}", f"line {stream.lines_read}")
                continue
            previous_key = file_key
            yield from checked(item)
            if item.packed:
                packed += 1
                yield from self._packed(item)
            else:
                yield ExpectedFile.from_entry(item)
        # The seal is checked only now, after the last byte: the entries were never held whole.
        checks = [(_ENTRIES_SEAL[what], expected, actual) for what, expected, actual in stream.against(seal)
                  if what != "count"]
        if count != seal.count:  # the entries counted are the usable ones
            checks.append((Problem.ENTRIES_COUNT_MISMATCH, seal.count, count))
        total = summary.count("total_bytes")
        if total is not None and total != total_bytes:
            checks.append((Problem.TOTAL_BYTES_MISMATCH, total, total_bytes))
        files_packed = summary.count("files_packed")
        if (files_packed or 0) != packed:
            checks.append((Problem.FILES_PACKED_MISMATCH, files_packed or 0, packed))
        for problem, expected, actual in checks:
            self.trailing.append(Difference(seal.key, None, problem, expected, actual))

    def _journal_check(self) -> Callable[[Entry], list[Difference]]:
        """While the journal still holds the batch's file rows, each entry is held against its
        row (a summary re-sealed over rewritten entries is caught here too)."""
        if self.batch.forgotten_at is not None:
            return lambda entry: []
        rows = self.journal.iter_files(self.batch.batch_id, [FileState.UPLOADED])
        pending = next(rows, None)

        encode = manifest.entry_for(self.batch)

        def check(entry: Entry) -> list[Difference]:
            nonlocal pending
            file_key = self._file_key(entry)
            while pending is not None and pending.key < file_key:
                pending = next(rows, None)
            if pending is None or pending.key != file_key:
                return [Difference(entry.key, entry.path, Problem.ENTRY_NOT_IN_JOURNAL, None, entry.sha256)]
            if pending.sha256 != entry.sha256 or pending.size != entry.size:
                return [Difference(entry.key, entry.path, Problem.ENTRY_DIFFERS_FROM_JOURNAL,
                                   pending.sha256, entry.sha256)]
            recorded = reader.to_entry(encode(pending))
            if (recorded.key, recorded.offset) != (entry.key, entry.offset):
                # Same bytes, another place: where the journal put it is where they are.
                return [Difference(entry.key, entry.path, Problem.ENTRY_DIFFERS_FROM_JOURNAL,
                                   _place(recorded), _place(entry))]
            return []

        return check

    def _file_key(self, entry: Entry) -> str:
        return object_key(self.batch.batch_prefix, entry.path) if entry.packed else entry.key

    # -- the merge ---------------------------------------------------------

    def steps(self, expected: Iterator[Expected]) -> Iterator[Step]:
        files_prefix = self.batch.batch_prefix + FILES_DIR

        def key(item: Expected) -> str | None:
            return None if isinstance(item, Difference) else item.key

        for paired in reader.merge_listing(expected, key, self.store.list_objects(files_prefix)):
            item, listed = paired.item, paired.listed
            if isinstance(item, Difference):
                yield [item]
            elif item is None:
                assert listed is not None
                yield [self._unexpected(listed, files_prefix)]
            else:
                self.report.checked += 1
                if listed is None:
                    yield [Difference(item.key, item.path, Problem.MISSING, item.size, None)]
                else:
                    yield self._object_check(item, listed)

    def shard_steps(self) -> Iterator[Step]:
        """The shard list merged with the listing of ``shards/`` (after the files: every entry
        naming a shard has been counted, and spooled for ``deep``)."""
        shards = self.shards
        if shards is None:
            return
        if shards.spool is not None:
            shards.spool.finish()
        shards_prefix = self.batch.batch_prefix + SHARDS_DIR
        ordered = sorted(shards.listed.values(), key=lambda shard: shard.key)
        for paired in reader.merge_listing(ordered, lambda shard: shard.key, self.store.list_objects(shards_prefix)):
            shard, listed = paired.item, paired.listed
            if shard is None:
                assert listed is not None
                yield [Difference(listed.key, None, Problem.UNEXPECTED, None, listed.size)]
                continue
            self.report.shards_checked += 1
            found: list[Difference] = []
            named = shards.named.get(shard.key, 0)
            if named != shard.members:
                found.append(Difference(shard.key, None, Problem.SHARD_MEMBERS_MISMATCH, shard.members, named))
            if listed is None:
                yield found + [Difference(shard.key, None, Problem.MISSING, shard.size, None)]
            elif listed.size != shard.size:
                yield found + [Difference(shard.key, None, Problem.SIZE_MISMATCH, shard.size, listed.size)]
            else:
                expected_etag, actual_etag = _bare_etag(shard.etag), _bare_etag(listed.etag)
                if expected_etag is not None and actual_etag and expected_etag != actual_etag:
                    found.append(Difference(shard.key, None, Problem.ETAG_MISMATCH, expected_etag, actual_etag))
                yield self._shard_check(shard, found)

    def _shard_check(self, shard: ShardEntry, found: list[Difference]) -> ObjectCheck:
        def check() -> list[Difference]:
            return found + (self._hash_shard(shard) if self.deep else self._check_shard_metadata(shard))

        return check

    @staticmethod
    def _unexpected(listed: ObjectInfo, files_prefix: str) -> Difference:
        path = listed.key[len(files_prefix):] if listed.key.startswith(files_prefix) else None
        return Difference(listed.key, path, Problem.UNEXPECTED, None, listed.size)

    def _object_check(self, item: ExpectedFile, listed: ObjectInfo) -> Step:
        if listed.size != item.size:
            # The bytes are different; no request can say more.
            return [Difference(item.key, item.path, Problem.SIZE_MISMATCH, item.size, listed.size)]
        found: list[Difference] = []
        expected_etag, actual_etag = _bare_etag(item.etag), _bare_etag(listed.etag)
        if expected_etag is not None and actual_etag and expected_etag != actual_etag:
            found.append(Difference(item.key, item.path, Problem.ETAG_MISMATCH, expected_etag, actual_etag))
        def check() -> list[Difference]:
            return found + (self._hash_object(item) if self.deep else self._check_metadata(item))

        return check

    # -- per-object requests (worker threads) -------------------------------

    def _check_metadata(self, item: ExpectedFile) -> list[Difference]:
        info = self.store.head(item.key)
        if info is None:  # deleted between the listing and now
            return [Difference(item.key, item.path, Problem.MISSING, item.size, None)]
        return self._metadata_differences(item, info.metadata)

    @staticmethod
    def _metadata_differences(item: ExpectedFile, metadata: dict[str, str]) -> list[Difference]:
        recorded = metadata.get(SHA256_METADATA)
        if recorded is not None and recorded != item.sha256:
            return [Difference(item.key, item.path, Problem.METADATA_CHECKSUM_MISMATCH, item.sha256, recorded)]
        return []

    def _check_shard_metadata(self, shard: ShardEntry) -> list[Difference]:
        info = self.store.head(shard.key)
        if info is None:
            return [Difference(shard.key, None, Problem.MISSING, shard.size, None)]
        recorded = info.metadata.get(SHA256_METADATA)
        if recorded is not None and recorded != shard.sha256:
            return [Difference(shard.key, None, Problem.METADATA_CHECKSUM_MISMATCH, shard.sha256, recorded)]
        return []

    def _hash_shard(self, shard: ShardEntry) -> list[Difference]:
        """One pass over the shard: its whole SHA-256, every member's at its offset, and its index."""
        assert self.shards is not None and self.shards.spool is not None
        spool = self.shards.spool
        members = spool.members(shard.key)
        hashes = _MemberHashes(members)
        whole = hashlib.sha256()
        position = 0
        try:
            reader = self.store.open_object(shard.key)
            if reader is None:
                return [Difference(shard.key, None, Problem.MISSING, shard.size, None)]
            with closing(reader):
                for chunk in reader.chunks(CHUNK_SIZE):
                    whole.update(chunk)
                    hashes.feed(position, chunk)
                    position += len(chunk)
        except DestinationError:
            raise
        except TransferError as error:
            return [Difference(shard.key, None, Problem.UNREADABLE, shard.sha256, str(error))]
        finally:
            members.close()  # type: ignore[attr-defined]  # a generator: its connection closes
        hashes.finish()
        found: list[Difference] = []
        recorded = reader.metadata.get(SHA256_METADATA)
        if recorded is not None and recorded != shard.sha256:
            found.append(Difference(shard.key, None, Problem.METADATA_CHECKSUM_MISMATCH, shard.sha256, recorded))
        actual = whole.hexdigest()
        if actual != shard.sha256:
            found.append(Difference(shard.key, None, Problem.CHECKSUM_MISMATCH, shard.sha256, actual))
        found += [Difference(shard.key, path, Problem.CHECKSUM_MISMATCH, expected, digest)
                  for path, expected, digest in hashes.mismatches]
        if hashes.tail_complete:
            found += self._index_differences(shard, spool.members(shard.key), hashes)
        return found

    @staticmethod
    def _index_differences(shard: ShardEntry, members: Iterable[tuple[str, int, int, str]],
                           hashes: _MemberHashes) -> list[Difference]:
        """The shard's own index member against the entries naming it, by path: an entry the
        index describes otherwise or not at all, and an index line no entry matches."""
        index = _index_of(bytes(hashes.tail))
        if isinstance(index, str):
            return [Difference(shard.key, None, Problem.SHARD_INDEX_MISMATCH,
                               f"{INDEX_NAME} at byte {hashes.index_offset}", index)]
        described: dict[str, bytes] = {}  # bounded: the index is at most MAX_INDEX_BYTES
        unreadable = 0
        for line in reader.split_lines([index]):
            try:
                path = reader.parse_json(line).get("path") if isinstance(line, bytes) else None
            except (ValueError, AttributeError):
                path = None
            if isinstance(path, str) and isinstance(line, bytes) and path not in described:
                described[path] = line
            else:
                unreadable += 1
        found: list[Difference] = []
        for path, offset, size, sha256 in members:
            expected = index_line(path, offset, size, sha256).rstrip(b"\n")
            actual = described.pop(path, None)
            if actual != expected:
                found.append(Difference(shard.key, path, Problem.SHARD_INDEX_MISMATCH, _text(expected),
                                        _text(actual)))
        found += [Difference(shard.key, path, Problem.SHARD_INDEX_MISMATCH, None, _text(line))
                  for path, line in described.items()]
        if unreadable:
            found.append(Difference(shard.key, None, Problem.SHARD_INDEX_MISMATCH, "a member per line",
                                    f"{unreadable} line(s) without a path of their own"))
        return found

    def _hash_object(self, item: ExpectedFile) -> list[Difference]:
        try:
            reader = self.store.open_object(item.key)
            if reader is None:
                return [Difference(item.key, item.path, Problem.MISSING, item.size, None)]
            hasher = hashlib.sha256()
            with closing(reader):
                for chunk in reader.chunks(CHUNK_SIZE):
                    hasher.update(chunk)
        except DestinationError:
            raise
        except TransferError as error:
            return [Difference(item.key, item.path, Problem.UNREADABLE, item.sha256, str(error))]
        found = self._metadata_differences(item, reader.metadata)
        actual = hasher.hexdigest()
        if actual != item.sha256:
            found.append(Difference(item.key, item.path, Problem.CHECKSUM_MISMATCH, item.sha256, actual))
        return found

    # -- the run -----------------------------------------------------------

    def run(self) -> VerifyReport:
        try:
            return self._run()
        finally:
            if self.shards is not None and self.shards.spool is not None:
                self.shards.spool.close()

    def _run(self) -> VerifyReport:
        expected = self.expected_files()
        if expected is None:
            return self.report
        window: deque[Future[list[Difference]] | list[Difference]] = deque()
        # Bounded: at most this many objects are in flight or waiting to be reported in order.
        limit = self.parallel * 4
        pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="archup-verify")
        try:
            # chain: the shards' steps begin only once the files' merge has read every entry.
            for step in chain(self.steps(expected), self.shard_steps()):
                window.append(pool.submit(step) if callable(step) else step)
                while len(window) > limit:
                    self._report(window.popleft())
            while window:
                self._report(window.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for difference in self.trailing:
            self.add(difference)
        return self.report

    def _report(self, done: Future[list[Difference]] | list[Difference]) -> None:
        for difference in done.result() if isinstance(done, Future) else done:
            self.add(difference)


def _text(line: bytes | None) -> str | None:
    return None if line is None else line.decode("utf-8", "backslashreplace")


def _place(entry: Entry) -> str:
    return entry.key if entry.offset is None else f"{entry.key} at byte {entry.offset}"


def verify_batch(journal: Journal, store: ObjectStore, batch_id: str, *, deep: bool = False,
                 parallel: int = DEFAULT_PARALLEL,
                 on_difference: Callable[[Difference], None] | None = None) -> VerifyReport:
    """Compare the bucket with the batch's manifest (enqueued) or its journal (not finalized yet).

    Differences are also passed to ``on_difference`` as they are found, in key
    order. Raises only when verification itself cannot proceed (the bucket
    unreachable, a manifest too new); differences are in the report.
    """
    batch = journal.get_batch(batch_id)
    return _Verification(journal, store, batch, deep=deep, parallel=parallel, on_difference=on_difference).run()
