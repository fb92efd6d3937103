"""Reading a sealed manifest back from the bucket: the one reader that verify, finalize and
restore use.

Everything read here is input from outside (a bucket anyone with write access can forge),
so every read is bounded: the summary is at most ``MAX_SUMMARY_BYTES``, a line of the
entries or the skipped list at most ``MAX_LINE_BYTES`` (a longer one is reported and
skipped, never held), lines are split in time linear in the input, and a JSON document
nested too deep is an invalid line, not a crash. The entries are streamed (a million-file
manifest is some 300 MB), hashed as they stream, and checked against the summary's seal
after the last byte; :func:`spool` copies a sealed object to a local file while hashing it,
for a reader (restore) that must know the seal holds before it acts on any line.

``format_version``: a summary newer than :data:`FORMAT_VERSION` is refused whole
(:class:`UnsupportedManifest`), never read as if it were older.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import IO, Any, Generic, TypeVar, Union

from ..errors import TransferError, UnsupportedManifest
from ..store import ObjectInfo, ObjectReader, ObjectStore
from . import FORMAT, FORMAT_VERSION

CHUNK_SIZE = 1024 * 1024
# A summary is about 1 KiB; anything past this is not one of archup's.
MAX_SUMMARY_BYTES = 1024 * 1024
# An entry holds a path and a key (S3 keys are at most 1,024 bytes), a digest, an ETag and
# four numbers: some 2.3 KiB at most, more only with \u escapes. Longer lines are forged.
MAX_LINE_BYTES = 64 * 1024

Value = Union[str, int, None]


class ManifestDefect(Exception):
    """The summary cannot be used: ``kind`` is ``missing`` or ``invalid``; ``what``,
    ``expected`` and ``actual`` say why (for a report, not for control flow)."""

    def __init__(self, kind: str, key: str, what: str, expected: Value, actual: Value) -> None:
        super().__init__(f"{key}: {what}: expected {expected}, found {actual}")
        self.kind = kind
        self.key = key
        self.what = what
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class Seal:
    """What the summary says of one list it seals (manifest.jsonl or manifest-skipped.jsonl)."""

    key: str
    sha256: str
    bytes: int
    count: int


@dataclass(frozen=True)
class Summary:
    """A summary that passed its checks; ``document`` is the parsed JSON, ``sha256`` that of
    its bytes as stored (what the journal records at seal time)."""

    key: str
    document: dict[str, Any]
    sha256: str
    entries: Seal
    skipped: Seal | None  # absent in manifests written before the skipped list
    shards: Seal | None = None  # a packed batch's shard list (format_version 2)

    @property
    def batch_id(self) -> str:
        return str(self.document["batch_id"])

    @property
    def prefix(self) -> str | None:
        destination = self.document.get("destination")
        prefix = destination.get("prefix") if isinstance(destination, dict) else None
        return prefix if isinstance(prefix, str) else None

    def count(self, name: str) -> int | None:
        """A top-level count (``files_uploaded``, ``files_skipped``, ``total_bytes``), if it is one."""
        value = self.document.get(name)
        return value if is_count(value) else None


@dataclass(frozen=True)
class Entry:
    """One line of manifest.jsonl, its types checked (its path is not: see restore). A packed
    file's ``key`` is its shard's, and ``offset`` where its bytes start in it."""

    path: str
    key: str
    size: int
    sha256: str
    etag: str | None
    part_size: int | None
    mtime_ns: int | None
    offset: int | None = None

    @property
    def packed(self) -> bool:
        return self.offset is not None

    @property
    def multipart(self) -> bool:
        return not self.packed and (self.part_size is not None or "-" in (self.etag or ""))


@dataclass(frozen=True)
class ShardEntry:
    """One line of manifest-shards.jsonl, its types checked."""

    key: str
    size: int
    sha256: str
    etag: str | None
    members: int
    part_size: int | None


@dataclass(frozen=True)
class BadLine:
    """A line that is not a usable entry: its number and why."""

    number: int
    reason: str


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# -- lines ------------------------------------------------------------------


class LineTooLong:
    """Stands in the line stream for a line longer than the limit (its bytes were dropped)."""

    def __init__(self, length: int) -> None:
        self.length = length  # bytes seen before giving up on it (at least the limit)


def split_lines(chunks: Iterable[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[bytes | LineTooLong]:
    """Lines (without their ``\\n``) of a byte stream, in time linear in its size and memory
    bounded by one chunk plus ``limit``; a line longer than ``limit`` comes as a
    :class:`LineTooLong` and its bytes are skipped up to the next newline. A last line
    without a newline is a line too."""
    buffer = bytearray()
    skipping = 0  # > 0: inside an over-long line, this many bytes of it seen
    for chunk in chunks:
        if skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                skipping += len(chunk)
                continue
            yield LineTooLong(skipping + newline)
            skipping = 0
            chunk = chunk[newline + 1:]
        buffer += chunk
        start = 0
        while True:
            newline = buffer.find(b"\n", start)
            if newline < 0:
                break
            if newline - start > limit:
                yield LineTooLong(newline - start)
            else:
                yield bytes(buffer[start:newline])
            start = newline + 1
        del buffer[:start]
        if len(buffer) > limit:
            skipping = len(buffer)
            buffer.clear()
    if skipping:
        yield LineTooLong(skipping)
    elif buffer:
        yield bytes(buffer)


def parse_json(line: bytes) -> Any:
    """A line's JSON; ValueError for anything that is not (bad UTF-8, bad JSON, nesting so
    deep that the parser would recurse past its limit)."""
    try:
        return json.loads(line)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


class SealedStream:
    """The bytes of one sealed list as they arrive, hashed and counted on the way.

    A caller that waits between lines (verify's object checks, which with ``--deep`` are
    long) may see the server drop the idle connection: the stream then resumes with a
    ranged GET from the byte it reached, pinned to the same object by its ETag (a 412, an
    object replaced while it was read, ends the stream as a TransferError).
    """

    RESUMES = 3

    def __init__(self, store: ObjectStore, key: str, reader: ObjectReader) -> None:
        self.store = store
        self.key = key
        self.reader = reader
        self.etag = reader.etag
        self.hasher = hashlib.sha256()
        self.bytes = 0
        self.lines_read = 0

    @classmethod
    def open(cls, store: ObjectStore, key: str) -> SealedStream | None:
        reader = store.open_object(key)
        return None if reader is None else cls(store, key, reader)

    def chunks(self) -> Iterator[bytes]:
        resumes = 0
        while True:
            with closing(self.reader):
                try:
                    for chunk in self.reader.chunks(CHUNK_SIZE):
                        self.hasher.update(chunk)
                        self.bytes += len(chunk)
                        yield chunk
                    return
                except (TransferError, OSError):
                    resumes += 1
                    if resumes > self.RESUMES:
                        raise
            reader = self.store.open_object(self.key, start=self.bytes, if_match=self.etag or None)
            if reader is None:
                raise TransferError(f"GetObject {self.key} from byte {self.bytes}: NoSuchKey: the object is gone",
                                    "NoSuchKey")
            self.reader = reader

    def lines(self) -> Iterator[bytes | LineTooLong]:
        for line in split_lines(self.chunks()):
            self.lines_read += 1
            yield line

    def against(self, seal: Seal) -> list[tuple[str, Value, Value]]:
        """(what, sealed, read) for each of SHA-256, size and line count that differs;
        meaningful once the stream was read to its end."""
        read = (("sha256", seal.sha256, self.hasher.hexdigest()), ("bytes", seal.bytes, self.bytes),
                ("count", seal.count, self.lines_read))
        return [item for item in read if item[1] != item[2]]


# -- the summary --------------------------------------------------------------


def _seal(document: dict[str, Any], name: str, key: str) -> Seal:
    value = document.get(name)
    if not isinstance(value, dict) or not isinstance(value.get("key"), str) \
            or not isinstance(value.get("sha256"), str):
        raise ManifestDefect("invalid", key, name, "key and sha256 strings", json.dumps(value)[:200])
    for field_name in ("bytes", "count"):
        if not is_count(value.get(field_name)):
            raise ManifestDefect("invalid", key, f"{name}.{field_name}", "a non-negative integer",
                                 str(value.get(field_name))[:200])
    return Seal(value["key"], value["sha256"], value["bytes"], value["count"])


def _read_bounded(reader: ObjectReader, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit`` (reading stops there)."""
    parts: list[bytes] = []
    size = 0
    with closing(reader):
        for chunk in reader.chunks(64 * 1024):
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
    return b"".join(parts)


def read_summary(store: ObjectStore, key: str, batch_id: str) -> Summary:
    """The summary at ``key``, checked: a JSON object of archup's format, for this batch,
    whose seals are well formed. ManifestDefect when it is missing or unusable;
    UnsupportedManifest when it is newer than this reader."""
    reader = store.open_object(key)
    if reader is None:
        raise ManifestDefect("missing", key, "summary", "manifest summary", None)
    body = _read_bounded(reader, MAX_SUMMARY_BYTES)
    if body is None:
        raise ManifestDefect("invalid", key, "size", f"at most {MAX_SUMMARY_BYTES} bytes", "more")
    try:
        document = parse_json(body)
    except ValueError as error:
        raise ManifestDefect("invalid", key, "JSON", "JSON", str(error)) from None
    if not isinstance(document, dict):
        raise ManifestDefect("invalid", key, "summary", "a JSON object", type(document).__name__)
    version = document.get("format_version")
    if is_count(version) and version > FORMAT_VERSION:
        raise UnsupportedManifest(
            f"{key} has format_version {version}; this archup reads version "
            f"{FORMAT_VERSION} and older: upgrade archup to read this batch")
    if document.get("format") != FORMAT:
        raise ManifestDefect("invalid", key, "format", FORMAT, str(document.get("format"))[:200])
    if document.get("batch_id") != batch_id:
        raise ManifestDefect("invalid", key, "batch_id", batch_id, str(document.get("batch_id"))[:200])
    entries = _seal(document, "entries", key)
    skipped = _seal(document, "skipped", key) if document.get("skipped") is not None else None
    shards = _seal(document, "shards", key) if document.get("shards") is not None else None
    return Summary(key, document, hashlib.sha256(body).hexdigest(), entries, skipped, shards)


# -- entries ------------------------------------------------------------------


def entry_problem(document: Any) -> str | None:
    """Why a parsed line is not a usable entry, or None."""
    if not isinstance(document, dict):
        return "not a JSON object"
    if "shard" in document:  # a packed file: its shard's key and the offset of its bytes
        if "key" in document:
            return "both key and shard"
        if not isinstance(document.get("shard"), str):
            return "shard is not a string"
        if not is_count(document.get("offset")):
            return "offset is not a non-negative integer"
        document = {**document, "key": document["shard"]}
    for name in ("path", "key", "sha256"):
        if not isinstance(document.get(name), str):
            return f"{name} is not a string"
    if not is_count(document.get("size")):
        return "size is not a non-negative integer"
    if document.get("etag") is not None and not isinstance(document["etag"], str):
        return "etag is not a string"
    if document.get("part_size") is not None and not is_count(document["part_size"]):
        return "part_size is not an integer"
    if document.get("mtime_ns") is not None and not isinstance(document["mtime_ns"], int):
        return "mtime_ns is not an integer"
    return None


def to_entry(document: dict[str, Any]) -> Entry:
    if "shard" in document:
        return Entry(path=document["path"], key=document["shard"], size=document["size"],
                     sha256=document["sha256"], etag=None, part_size=None, mtime_ns=document.get("mtime_ns"),
                     offset=document["offset"])
    return Entry(path=document["path"], key=document["key"], size=document["size"], sha256=document["sha256"],
                 etag=document.get("etag"), part_size=document.get("part_size"),
                 mtime_ns=document.get("mtime_ns"))


def parse_shard(line: bytes | LineTooLong, number: int) -> ShardEntry | BadLine:
    """A line of manifest-shards.jsonl, or why it is not a usable one."""
    if isinstance(line, LineTooLong):
        return BadLine(number, f"line longer than {MAX_LINE_BYTES} bytes ({line.length})")
    try:
        document = parse_json(line)
    except ValueError as error:
        return BadLine(number, f"JSON: {error}")
    if not isinstance(document, dict) or not isinstance(document.get("key"), str):
        return BadLine(number, "a shard: key is not a string")
    if not is_count(document.get("size")) or not is_count(document.get("members")):
        return BadLine(number, "a shard: size or members is not a non-negative integer")
    if not _is_digest(document.get("sha256")):
        return BadLine(number, "a shard: sha256 is not 64 lowercase hex digits")
    if document.get("etag") is not None and not isinstance(document["etag"], str):
        return BadLine(number, "a shard: etag is not a string")
    if document.get("part_size") is not None and not is_count(document["part_size"]):
        return BadLine(number, "a shard: part_size is not an integer")
    return ShardEntry(document["key"], document["size"], document["sha256"], document.get("etag"),
                      document["members"], document.get("part_size"))


def parse_entry(line: bytes | LineTooLong, number: int) -> Entry | BadLine:
    if isinstance(line, LineTooLong):
        return BadLine(number, f"line longer than {MAX_LINE_BYTES} bytes ({line.length})")
    try:
        document = parse_json(line)
    except ValueError as error:  # UnicodeDecodeError included
        return BadLine(number, f"JSON: {error}")
    reason = entry_problem(document)
    if reason is not None:
        return BadLine(number, f"an entry: {reason}")
    if not _is_digest(document["sha256"]):
        return BadLine(number, "an entry: sha256 is not 64 lowercase hex digits")
    return to_entry(document)


def entries(lines: Iterable[bytes | LineTooLong]) -> Iterator[Entry | BadLine]:
    """Entries of manifest.jsonl's lines, in their order, a BadLine for each unusable line."""
    for number, line in enumerate(lines, start=1):
        yield parse_entry(line, number)


def skipped_problem(line: bytes | LineTooLong) -> str | None:
    """Why a line of manifest-skipped.jsonl is not a usable record, or None."""
    if isinstance(line, LineTooLong):
        return f"line longer than {MAX_LINE_BYTES} bytes ({line.length})"
    try:
        document = parse_json(line)
    except ValueError as error:
        return f"JSON: {error}"
    if not isinstance(document, dict):
        return "not a JSON object"
    if not isinstance(document.get("path"), str) or not document["path"]:
        return "path is not a non-empty string"
    if not isinstance(document.get("reason"), str):
        return "reason is not a string"
    return None


def spool(store: ObjectStore, seal: Seal, into: IO[bytes]) -> list[tuple[str, Value, Value]]:
    """Copy a sealed list into a local file (at its start), hashing and counting its lines;
    the seal's differences, or ``[("object", seal.sha256, None)]`` when it is missing. The
    file is positioned at its start afterwards."""
    stream = SealedStream.open(store, seal.key)
    if stream is None:
        return [("object", seal.sha256, None)]
    into.seek(0)
    into.truncate()
    lines = 0
    last = b"\n"
    for chunk in stream.chunks():
        into.write(chunk)
        lines += chunk.count(b"\n")
        last = chunk[-1:] or last
    if last != b"\n":
        lines += 1  # a last line without its newline counts, as split_lines yields it
    stream.lines_read = lines
    into.flush()
    into.seek(0)
    return stream.against(seal)


def local_lines(handle: IO[bytes]) -> Iterator[bytes | LineTooLong]:
    """The lines of a spooled list, bounded as from the bucket."""
    handle.seek(0)
    return split_lines(iter(lambda: handle.read(CHUNK_SIZE), b""))


# -- a listing against expected keys ------------------------------------------


T = TypeVar("T")


@dataclass(frozen=True)
class Paired(Generic[T]):
    """One step of a merge: an expected item and its listed object (None: missing), or an
    object no item expected (``item`` None)."""

    item: T | None
    listed: ObjectInfo | None


def merge_listing(items: Iterable[T], key: Callable[[T], str | None],
                  listing: Iterator[ObjectInfo]) -> Iterator[Paired[T]]:
    """Join items in strictly increasing key order with a listing in key order (both UTF-8 byte
    order, which is ``str`` order), in one pass and bounded memory. An item whose key is None
    takes no part in the join: it comes back at once, as ``Paired(item, None)``."""
    current = next(listing, None)
    for item in items:
        item_key = key(item)
        if item_key is None:
            yield Paired(item, None)
            continue
        while current is not None and current.key < item_key:
            yield Paired(None, current)
            current = next(listing, None)
        if current is not None and current.key == item_key:
            yield Paired(item, current)
            current = next(listing, None)
        else:
            yield Paired(item, None)
    while current is not None:
        yield Paired(None, current)
        current = next(listing, None)
