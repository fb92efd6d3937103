"""The manifest: what a finalized batch holds, written once under its prefix.

Three objects (docs/manifest.md), four for a packed batch:

* ``<batch prefix>manifest.jsonl``: one JSON object per uploaded file, in key
  order, streamed from the journal to a temporary file (never held in memory);
* ``<batch prefix>manifest-skipped.jsonl``: one JSON object per file the scan found
  and did not upload (skipped by policy, or unreadable), with its reason, in key order;
* ``<batch prefix>manifest-shards.jsonl`` (a packed batch only): one JSON object per tar
  shard, in number order: its key, size, SHA-256, ETag and member count;
* ``<batch prefix>manifest.json``: the summary, written last with
  ``If-None-Match: *``. It names the other two with their SHA-256, so it seals
  them: the summary's existence is what "finalized" means in the bucket.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

from ..journal import BatchRecord, FileRecord, ShardRecord, shard_key

FORMAT = "archup-manifest"
# Fields are added within version 1 (readers ignore what they do not know): "skipped", the
# seal on the list of what was not archived, came after the first manifests, which lack it.
# Version 2: a packed batch (--pack-under). Its entries may name a shard and an offset
# instead of an object of their own, which a version-1 reader would take for a whole object:
# it refuses the batch instead (it refuses any newer version). A batch without shards is
# still written as version 1, readable by every archup.
FORMAT_VERSION = 2
UNPACKED_VERSION = 1
SUMMARY_NAME = "manifest.json"
SHARDS_NAME = "manifest-shards.jsonl"
ENTRIES_NAME = "manifest.jsonl"
SKIPPED_NAME = "manifest-skipped.jsonl"


def summary_key(batch: BatchRecord) -> str:
    return f"{batch.batch_prefix}{SUMMARY_NAME}"


def entries_key(batch: BatchRecord) -> str:
    return f"{batch.batch_prefix}{ENTRIES_NAME}"


def skipped_key(batch: BatchRecord) -> str:
    return f"{batch.batch_prefix}{SKIPPED_NAME}"


def shards_key(batch: BatchRecord) -> str:
    return f"{batch.batch_prefix}{SHARDS_NAME}"


def skipped_entry(record: FileRecord) -> dict[str, Any]:
    """A file the batch does not hold, and why (the reason as the scan recorded it)."""
    return {"path": record.rel_path, "reason": record.error or "skipped", "size": record.size,
            "mtime_ns": record.mtime_ns}


def entry_for(batch: BatchRecord) -> Callable[[FileRecord], dict[str, Any]]:
    """Entries of this batch's files: a packed file's names its shard and data offset."""
    prefix = batch.batch_prefix

    def encode(record: FileRecord) -> dict[str, Any]:
        if record.shard_no is None:
            return entry(record)
        return {"path": record.rel_path, "shard": shard_key(prefix, record.shard_no), "offset": record.shard_offset,
                "size": record.size, "sha256": record.sha256, "mtime_ns": record.mtime_ns}
    return encode


def entry_line_for(batch: BatchRecord) -> Callable[[FileRecord], bytes]:
    """The lines of :func:`entry_for`'s entries, byte for byte (tests/test_pack.py holds them
    to each other): a packed file's written directly, its path alone through json.dumps
    (a million of them)."""
    prefix = batch.batch_prefix
    keys: dict[int, bytes] = {}

    def line(record: FileRecord) -> bytes:
        if record.shard_no is None or record.sha256 is None or record.shard_offset is None:
            return compact_line(entry(record))
        key = keys.get(record.shard_no)
        if key is None:
            key = keys[record.shard_no] = json.dumps(shard_key(prefix, record.shard_no),
                                                     ensure_ascii=False).encode("utf-8")
        return b'{"path":%s,"shard":%s,"offset":%d,"size":%d,"sha256":"%s","mtime_ns":%d}\n' % (
            json.dumps(record.rel_path, ensure_ascii=False).encode("utf-8"), key, record.shard_offset, record.size,
            record.sha256.encode("ascii"), record.mtime_ns)
    return line


def shard_entry(shard: ShardRecord) -> dict[str, Any]:
    return {"key": shard.key, "size": shard.size, "sha256": shard.sha256, "etag": shard.etag,
            "members": shard.members, "part_size": shard.part_size}


def entry(record: FileRecord) -> dict[str, Any]:
    return {
        "path": record.rel_path,
        "key": record.key,
        "size": record.size,
        "sha256": record.sha256,
        "etag": record.etag,
        "part_size": record.part_size,
        "mtime_ns": record.mtime_ns,
    }


@dataclass(frozen=True)
class EntriesFile:
    handle: IO[bytes]
    sha256: str
    size: int
    count: int
    total_bytes: int


def compact_line(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def write_entries(records: Iterable[Any], encode: Callable[[Any], dict[str, Any]] = entry, *,
                  line_of: Callable[[Any], bytes] | None = None) -> EntriesFile:
    """Stream entries (``encode``: uploaded files' or skipped files'; or ``line_of``, a whole
    line) to a temporary file, hashing as it goes; the caller closes the handle."""
    handle = tempfile.TemporaryFile()
    hasher = hashlib.sha256()
    count = total_bytes = size = 0
    for record in records:
        line = line_of(record) if line_of is not None else compact_line(encode(record))
        handle.write(line)
        hasher.update(line)
        size += len(line)
        count += 1
        total_bytes += record.size
    handle.seek(0)
    return EntriesFile(handle, hasher.hexdigest(), size, count, total_bytes)


def seal(key: str, sealed: EntriesFile) -> dict[str, Any]:
    return {"key": key, "sha256": sealed.sha256, "bytes": sealed.size, "count": sealed.count}


def summary(batch: BatchRecord, entries: EntriesFile, *, finalized_at: str, skipped: EntriesFile,
            shards: EntriesFile | None = None, files_packed: int = 0) -> dict[str, Any]:
    """``shards``: a packed batch's shard list (None or empty: written as version 1)."""
    packed = shards is not None and shards.count > 0
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if packed else UNPACKED_VERSION,
        "batch_id": batch.batch_id,
        "created_at": batch.created_at,
        "finalized_at": finalized_at,
        "source_root": batch.source_root,
        "destination": {
            "bucket": batch.bucket,
            "endpoint_url": batch.endpoint_url,
            "prefix": batch.batch_prefix,
        },
        "files_uploaded": entries.count,
        "files_skipped": skipped.count,
        "total_bytes": entries.total_bytes,
        "entries": seal(entries_key(batch), entries),
        "skipped": seal(skipped_key(batch), skipped),
    }
    if packed:
        assert shards is not None
        document["shards"] = seal(shards_key(batch), shards)
        document["files_packed"] = files_packed
    return document


def encode_summary(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")
