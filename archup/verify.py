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
import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

from . import manifest
from .errors import DestinationError, TransferError, UnsupportedManifest, VerificationFailed
from .journal import BatchRecord, Journal
from .scan import FILES_DIR
from .states import BatchState, FileState
from .store import SHA256_METADATA, ObjectInfo, ObjectReader, ObjectStore

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
    # The list of what was not archived (manifest-skipped.jsonl), where the summary seals one
    SKIPPED_MISSING = "skipped_missing"
    SKIPPED_CHECKSUM_MISMATCH = "skipped_checksum_mismatch"
    SKIPPED_SIZE_MISMATCH = "skipped_size_mismatch"
    SKIPPED_COUNT_MISMATCH = "skipped_count_mismatch"
    SKIPPED_ENTRY_INVALID = "skipped_entry_invalid"


Value = Union[str, int, None]


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
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def as_dict(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "source": self.source.value, "checked": self.checked,
                "ok": self.ok, "differences": [d.as_dict() for d in self.differences]}

    def failure(self) -> VerificationFailed:
        return VerificationFailed(
            f"batch {self.batch_id}: the bucket differs from the {self.source.value} in "
            f"{len(self.differences)} place(s), listed above; 'archup status {self.batch_id}' "
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
    def from_entry(cls, entry: dict[str, Any]) -> ExpectedFile:
        etag = entry.get("etag")
        return cls(key=entry["key"], path=entry["path"], size=entry["size"], sha256=entry["sha256"],
                   etag=etag, multipart=entry.get("part_size") is not None or "-" in (etag or ""))


def _bare_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag is not None else None


# A step of the merge: differences known at once, or a check that needs the network.
ObjectCheck = Callable[[], list[Difference]]
Step = Union[list[Difference], ObjectCheck]
Expected = Union[ExpectedFile, Difference]


class _EntriesStream:
    """The lines of manifest.jsonl as they arrive, hashed and counted on the way.

    The main thread reads it between waits on the object checks, which with
    ``deep`` can be long, so the server may drop the idle connection: the
    stream then resumes with a ranged GET from the byte it reached, pinned to
    the same object by its ETag.
    """

    RESUMES = 3

    def __init__(self, store: ObjectStore, key: str, reader: ObjectReader) -> None:
        self.store = store
        self.key = key
        self.reader = reader
        self.etag = reader.etag
        self.hasher = hashlib.sha256()
        self.bytes = 0

    def _chunks(self) -> Iterator[bytes]:
        resumes = 0
        while True:
            with closing(self.reader):
                try:
                    for chunk in self.reader.chunks(CHUNK_SIZE):
                        yield chunk
                    return
                except (TransferError, OSError):
                    resumes += 1
                    if resumes > self.RESUMES:
                        raise
            # 412 (an ETag other than the one first read): the entries changed while we read them.
            reader = self.store.open_object(self.key, start=self.bytes, if_match=self.etag or None)
            if reader is None:
                raise TransferError(f"GetObject {self.key} from byte {self.bytes}: NoSuchKey: the object is gone",
                                    "NoSuchKey")
            self.reader = reader

    def lines(self) -> Iterator[bytes]:
        pending = b""
        for chunk in self._chunks():
            self.hasher.update(chunk)
            self.bytes += len(chunk)
            pending += chunk
            *complete, pending = pending.split(b"\n")
            yield from complete
        if pending:
            yield pending


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(document: Any) -> str | None:
    """Why a parsed line is not a usable entry, or None."""
    if not isinstance(document, dict):
        return "not a JSON object"
    for name in ("path", "key", "sha256"):
        if not isinstance(document.get(name), str):
            return f"{name} is not a string"
    if not _is_count(document.get("size")):
        return "size is not a non-negative integer"
    if document.get("etag") is not None and not isinstance(document["etag"], str):
        return "etag is not a string"
    if document.get("part_size") is not None and not _is_count(document["part_size"]):
        return "part_size is not an integer"
    return None


def _summary_problem(document: Any, batch_id: str) -> tuple[str, Value, Value] | None:
    """(what, expected, actual) for a summary that cannot seal this batch's entries, or None."""
    if not isinstance(document, dict):
        return "summary", "a JSON object", type(document).__name__
    if document.get("format") != manifest.FORMAT:
        return "format", manifest.FORMAT, str(document.get("format"))
    if document.get("batch_id") != batch_id:
        return "batch_id", batch_id, str(document.get("batch_id"))
    entries = document.get("entries")
    if not isinstance(entries, dict):
        return "entries", "an object", str(entries)
    if not isinstance(entries.get("key"), str) or not isinstance(entries.get("sha256"), str):
        return "entries", "key and sha256 strings", json.dumps(entries)
    for name in ("bytes", "count"):
        if not _is_count(entries.get(name)):
            return f"entries.{name}", "a non-negative integer", str(entries.get(name))
    skipped = document.get("skipped")  # absent in manifests written before it was added
    if skipped is not None:
        if not isinstance(skipped, dict) or not isinstance(skipped.get("key"), str) \
                or not isinstance(skipped.get("sha256"), str):
            return "skipped", "key and sha256 strings", json.dumps(skipped)
        for name in ("bytes", "count"):
            if not _is_count(skipped.get(name)):
                return f"skipped.{name}", "a non-negative integer", str(skipped.get(name))
    return None


def _against_seal(seal: dict[str, Any], stream: _EntriesStream, count: int,
                  problems: tuple[Problem, Problem, Problem]) -> list[tuple[Problem, Value, Value]]:
    """(problem, sealed, read) for the SHA-256, the size and the line count of a sealed list."""
    checksum, size, lines = problems
    return [(checksum, seal["sha256"], stream.hasher.hexdigest()), (size, seal["bytes"], stream.bytes),
            (lines, seal["count"], count)]


def _skipped_problem(document: Any) -> str | None:
    if not isinstance(document, dict):
        return "not a JSON object"
    if not isinstance(document.get("path"), str) or not document["path"]:
        return "path is not a non-empty string"
    if not isinstance(document.get("reason"), str):
        return "reason is not a string"
    return None


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
        self.report.differences.append(difference)
        if self.on_difference is not None:
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
            yield ExpectedFile.from_entry(manifest.entry(record))

    def _open_manifest(self) -> Iterator[Expected] | None:
        """The manifest's entries, or None (the problem reported) when it cannot be used."""
        summary_key = self.batch.manifest_key or manifest.summary_key(self.batch)
        if self.store.head(summary_key) is None:
            self.add(Difference(summary_key, None, Problem.MANIFEST_MISSING, "manifest summary", None))
            return None
        try:
            document = json.loads(self.store.get_bytes(summary_key))
        except ValueError as error:
            self.add(Difference(summary_key, None, Problem.MANIFEST_INVALID, "JSON", str(error)))
            return None
        version = document.get("format_version") if isinstance(document, dict) else None
        if isinstance(version, int) and version > manifest.FORMAT_VERSION:
            raise UnsupportedManifest(
                f"{summary_key} has format_version {version}; this archup reads version "
                f"{manifest.FORMAT_VERSION} and older: upgrade archup to verify this batch")
        problem = _summary_problem(document, self.batch.batch_id)
        if problem is not None:
            what, expected, actual = problem
            self.add(Difference(summary_key, None, Problem.MANIFEST_INVALID, f"{what}: {expected}", actual))
            return None
        if document.get("skipped") is not None:
            self.trailing.extend(self._check_skipped(document))
        seal = document["entries"]
        reader = self.store.open_object(seal["key"])
        if reader is None:
            self.add(Difference(seal["key"], None, Problem.ENTRIES_MISSING, seal["sha256"], None))
            return None
        return self._manifest_files(document, _EntriesStream(self.store, seal["key"], reader))

    def _check_skipped(self, summary: dict[str, Any]) -> list[Difference]:
        """The list of files the batch does not hold, against its seal and files_skipped."""
        seal = summary["skipped"]
        reader = self.store.open_object(seal["key"])
        if reader is None:
            return [Difference(seal["key"], None, Problem.SKIPPED_MISSING, seal["sha256"], None)]
        stream = _EntriesStream(self.store, seal["key"], reader)
        found: list[Difference] = []
        count = 0
        for number, line in enumerate(stream.lines(), start=1):
            count += 1
            try:
                reason = _skipped_problem(json.loads(line))
            except ValueError as error:  # UnicodeDecodeError included
                reason = f"JSON: {error}"
            if reason is not None:
                found.append(Difference(seal["key"], None, Problem.SKIPPED_ENTRY_INVALID, f"line {number}", reason))
        checks = _against_seal(seal, stream, count, (Problem.SKIPPED_CHECKSUM_MISMATCH,
                                                     Problem.SKIPPED_SIZE_MISMATCH, Problem.SKIPPED_COUNT_MISMATCH))
        if _is_count(summary.get("files_skipped")):
            checks.append((Problem.SKIPPED_COUNT_MISMATCH, summary["files_skipped"], count))
        found += [Difference(seal["key"], None, problem, expected, actual)
                  for problem, expected, actual in checks if expected != actual]
        return found

    def _manifest_files(self, summary: dict[str, Any], stream: _EntriesStream) -> Iterator[Expected]:
        seal = summary["entries"]
        count = total_bytes = 0
        previous_key: str | None = None
        for number, line in enumerate(stream.lines(), start=1):
            try:
                document = json.loads(line)
            except ValueError as error:  # UnicodeDecodeError included
                yield Difference(seal["key"], None, Problem.ENTRY_INVALID, f"line {number}: JSON", str(error))
                continue
            reason = _entry_problem(document)
            if reason is not None:
                yield Difference(seal["key"], None, Problem.ENTRY_INVALID, f"line {number}: an entry", reason)
                continue
            count += 1
            total_bytes += document["size"]
            if previous_key is not None and document["key"] <= previous_key:
                # The merge-join needs strict key order; an entry out of it cannot be placed.
                yield Difference(document["key"], document["path"], Problem.ENTRY_OUT_OF_ORDER,
                                 f"after {previous_key}", f"line {number}")
                continue
            previous_key = document["key"]
            yield ExpectedFile.from_entry(document)
        # The seal is checked only now, after the last byte: the entries were never held whole.
        checks = _against_seal(seal, stream, count, (Problem.ENTRIES_CHECKSUM_MISMATCH,
                                                     Problem.ENTRIES_SIZE_MISMATCH, Problem.ENTRIES_COUNT_MISMATCH))
        if _is_count(summary.get("total_bytes")):
            checks.append((Problem.TOTAL_BYTES_MISMATCH, summary["total_bytes"], total_bytes))
        for problem, expected, actual in checks:
            if expected != actual:
                self.trailing.append(Difference(seal["key"], None, problem, expected, actual))

    # -- the merge ---------------------------------------------------------

    def steps(self, expected: Iterator[Expected]) -> Iterator[Step]:
        files_prefix = self.batch.batch_prefix + FILES_DIR
        listing = self.store.list_objects(files_prefix)
        current = next(listing, None)
        for item in expected:
            if isinstance(item, Difference):
                yield [item]
                continue
            self.report.checked += 1
            while current is not None and current.key < item.key:
                yield [self._unexpected(current, files_prefix)]
                current = next(listing, None)
            if current is None or current.key != item.key:
                yield [Difference(item.key, item.path, Problem.MISSING, item.size, None)]
                continue
            yield self._object_check(item, current)
            current = next(listing, None)
        while current is not None:
            yield [self._unexpected(current, files_prefix)]
            current = next(listing, None)

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
