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
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

from . import manifest
from .errors import DestinationError, TransferError, VerificationFailed
from .journal import BatchRecord, Journal
from .manifest import reader
from .manifest.reader import BadLine, Entry, ManifestDefect, SealedStream, Summary
from .scan import FILES_DIR
from .states import BatchState, FileState
from .store import SHA256_METADATA, ObjectInfo, ObjectStore

CHUNK_SIZE = 1024 * 1024
DEFAULT_PARALLEL = 8


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


Value = Union[str, int, None]

# A forged manifest can make millions of differences: the report keeps the first ones and counts the rest.
MAX_DIFFERENCES = 1000

_ENTRIES_SEAL = {"sha256": Problem.ENTRIES_CHECKSUM_MISMATCH, "bytes": Problem.ENTRIES_SIZE_MISMATCH,
                 "count": Problem.ENTRIES_COUNT_MISMATCH}
_SKIPPED_SEAL = {"sha256": Problem.SKIPPED_CHECKSUM_MISMATCH, "bytes": Problem.SKIPPED_SIZE_MISMATCH,
                 "count": Problem.SKIPPED_COUNT_MISMATCH}


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
        return self._journal_files()

    def _journal_files(self) -> Iterator[Expected]:
        for record in self.journal.iter_files(self.batch.batch_id, [FileState.UPLOADED]):
            yield ExpectedFile.from_entry(reader.to_entry(manifest.entry(record)))

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

    def _manifest_files(self, summary: Summary, stream: SealedStream) -> Iterator[Expected]:
        seal = summary.entries
        count = total_bytes = 0
        previous_key: str | None = None
        checked = self._journal_check()
        for item in reader.entries(stream.lines()):
            if isinstance(item, BadLine):
                what, _, reason = item.reason.partition(": ")
                yield Difference(seal.key, None, Problem.ENTRY_INVALID, f"line {item.number}: {what}", reason)
                continue
            count += 1
            total_bytes += item.size
            if previous_key is not None and item.key <= previous_key:
                # The merge-join needs strict key order; an entry out of it cannot be placed.
                yield Difference(item.key, item.path, Problem.ENTRY_OUT_OF_ORDER,
                                 f"after {previous_key}", f"line {stream.lines_read}")
                continue
            previous_key = item.key
            yield from checked(item)
            yield ExpectedFile.from_entry(item)
        # The seal is checked only now, after the last byte: the entries were never held whole.
        checks = [(_ENTRIES_SEAL[what], expected, actual) for what, expected, actual in stream.against(seal)
                  if what != "count"]
        if count != seal.count:  # the entries counted are the usable ones
            checks.append((Problem.ENTRIES_COUNT_MISMATCH, seal.count, count))
        total = summary.count("total_bytes")
        if total is not None and total != total_bytes:
            checks.append((Problem.TOTAL_BYTES_MISMATCH, total, total_bytes))
        for problem, expected, actual in checks:
            self.trailing.append(Difference(seal.key, None, problem, expected, actual))

    def _journal_check(self) -> Callable[[Entry], list[Difference]]:
        """While the journal still holds the batch's file rows, each entry is held against its
        row (a summary re-sealed over rewritten entries is caught here too)."""
        if self.batch.forgotten_at is not None:
            return lambda entry: []
        rows = self.journal.iter_files(self.batch.batch_id, [FileState.UPLOADED])
        pending = next(rows, None)

        def check(entry: Entry) -> list[Difference]:
            nonlocal pending
            while pending is not None and pending.key < entry.key:
                pending = next(rows, None)
            if pending is None or pending.key != entry.key:
                return [Difference(entry.key, entry.path, Problem.ENTRY_NOT_IN_JOURNAL, None, entry.sha256)]
            if pending.sha256 != entry.sha256 or pending.size != entry.size:
                return [Difference(entry.key, entry.path, Problem.ENTRY_DIFFERS_FROM_JOURNAL,
                                   pending.sha256, entry.sha256)]
            return []

        return check

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
        expected = self.expected_files()
        if expected is None:
            return self.report
        window: deque[Future[list[Difference]] | list[Difference]] = deque()
        # Bounded: at most this many objects are in flight or waiting to be reported in order.
        limit = self.parallel * 4
        pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="archup-verify")
        try:
            for step in self.steps(expected):
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
