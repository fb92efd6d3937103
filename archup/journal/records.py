"""What the journal holds, as the rest of archup sees it: plain frozen records, no backend."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import NamedTuple

from ..states import BatchState, FileState, ShardState

BATCH_TTL = timedelta(hours=24)
DEFAULT_LEASE = 60.0  # seconds a host's claims on a shared batch last without a heartbeat (--lease)


@dataclass(frozen=True)
class BatchSettings:
    """What a batch's first run chose and every resume keeps, whatever the flags of the
    rerun: which files it takes, and how their objects are stored."""

    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    files_from: tuple[str, ...] | None = None
    skip_archived: bool = False
    follow_symlinks: bool = False
    storage_class: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    # What the endpoint accepted (--checksum, --full-object-checksum): the default of the
    # commands that send on the batch's behalf without such flags (finalize, resume). A
    # rerun's flags win here (the endpoint changed), so these make no note.
    checksum: str = "sha256"
    full_object_checksum: bool = True
    # --parallel of the run that began it: resume's default (a flag wins, without a note).
    parallel: int | None = None
    # --pack-under: files smaller than this go into tar shards of about shard_size bytes
    # (None: every file is an object of its own).
    pack_under: int | None = None
    shard_size: int | None = None

    _FOLLOW_THE_RUN = ("checksum", "full_object_checksum", "parallel")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> BatchSettings | None:
        """None for a batch begun before schema 4: its settings were never recorded."""
        if not text:
            return None
        values = json.loads(text)
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        for name in ("includes", "excludes"):
            known[name] = tuple(known.get(name, ()))
        if known.get("files_from") is not None:
            known["files_from"] = tuple(known["files_from"])
        for name in ("metadata", "tags"):
            known[name] = tuple((str(k), str(v)) for k, v in known.get(name, ()))
        return cls(**known)

    def differences(self, other: BatchSettings) -> list[str]:
        """The names of the settings that differ, for a one-line note."""
        return [name for name in self.__dataclass_fields__
                if name not in self._FOLLOW_THE_RUN and getattr(self, name) != getattr(other, name)]


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str
    state: BatchState
    source_root: str
    bucket: str
    prefix: str
    endpoint_url: str | None
    region: str | None
    part_size: int
    scan_complete: bool
    manifest_key: str | None
    error: str | None
    created_at: str
    updated_at: str
    expires_at: str
    finalized_at: str | None
    settings: BatchSettings | None = None  # None: begun by an archup that did not record them
    files_archived: int = 0  # --skip-archived: unchanged since an earlier batch, not in this one
    # When gc forgot its file and part rows (a terminal batch): its file list is its manifest's.
    forgotten_at: str | None = None
    # The SHA-256 (hex) of the batch's sealed manifest.json, recorded by the seal: what the
    # bucket's summary must still hash to (None: sealed before it was recorded, or not sealed).
    summary_sha256: str | None = None

    @property
    def batch_prefix(self) -> str:
        """Everything of this batch lives under this key prefix."""
        return f"{self.prefix}{self.batch_id}/"

    @property
    def destination(self) -> Destination:
        return Destination(self.source_root, self.bucket, self.prefix, self.endpoint_url)


class Destination(NamedTuple):
    """A source and where it is archived: the archived index is kept per destination."""

    source_root: str
    bucket: str
    prefix: str
    endpoint_url: str | None


@dataclass(frozen=True)
class ArchivedFile:
    """The latest archived version of one path of a destination, and the finalized batch holding it."""

    rel_path: str
    size: int
    mtime_ns: int
    identity: str | None
    batch_id: str


@dataclass(frozen=True, slots=True)  # slots: a million of them pass through a packed batch's dispatch
class FileRecord:
    batch_id: str
    rel_path: str
    key: str
    size: int
    mtime_ns: int
    state: FileState
    part_size: int | None
    upload_id: str | None
    sha256: str | None
    etag: str | None
    error: str | None
    attempts: int
    updated_at: str
    identity: str | None = None
    checksum_kind: str | None = None  # a multipart upload's, as MultipartChecksum.encode() wrote it
    shard_no: int | None = None       # packed: the shard holding it (None: an object of its own)
    shard_offset: int | None = None   # packed: where its data starts in the shard


SHARDS_DIR = "shards/"


def shard_key(batch_prefix: str, shard_no: int) -> str:
    """Where a batch's shard lives: beside ``files/``, so no source file name can collide."""
    return f"{batch_prefix}{SHARDS_DIR}{shard_no:06d}.tar"


@dataclass(frozen=True)
class ShardRecord:
    """A tar shard of packed files: its members (fixed when it was planned, in offset order)
    live in their file rows (``shard_no``, ``shard_offset``)."""

    batch_id: str
    shard_no: int
    key: str
    size: int
    members: int
    state: ShardState
    upload_id: str | None
    part_size: int | None
    checksum_kind: str | None
    sha256: str | None
    etag: str | None
    error: str | None
    updated_at: str


@dataclass(frozen=True)
class PartRecord:
    part_number: int
    size: int
    etag: str
    checksum: str | None


@dataclass(frozen=True)
class NewFile:
    """A file the scan found, to be added to a batch."""

    rel_path: str
    key: str
    size: int
    mtime_ns: int
    state: FileState = FileState.PENDING
    error: str | None = None
    identity: str | None = None


@dataclass(frozen=True)
class EncodedFiles:
    """A group of new files made ready for one INSERT (see :func:`encode_files`)."""

    count: int
    rows_json: str


@dataclass(frozen=True)
class BatchSummary:
    """What ``archup status`` shows: the batch row, per-state counts, and the first failed
    and the first skipped files in key order, up to ``problem_limit`` of each (``counts``
    says how many there are)."""

    batch: BatchRecord
    counts: dict[FileState, int]
    bytes_by_state: dict[FileState, int]
    failed: list[FileRecord] = field(default_factory=list)
    skipped: list[FileRecord] = field(default_factory=list)
    problem_limit: int = 20
    last_file_change: str | None = None  # the newest change to any of its file rows
    shards: dict[ShardState, int] = field(default_factory=dict)  # packed batches: shards per state
    shard_bytes: dict[ShardState, int] = field(default_factory=dict)

    @property
    def updated_at(self) -> str:
        """When anything of the batch last changed: its row, or one of its files."""
        return max(self.batch.updated_at, self.last_file_change or "")

    @property
    def problems(self) -> list[FileRecord]:
        """The first failed or skipped files mixed in key order, up to ``problem_limit``.

        Exact, not an approximation: the first N of the merged order are among the first N
        of each kind. Kept for callers of the mixed list; it can hide every failed file
        behind skipped ones, so show ``failed`` and ``skipped`` apart.
        """
        merged = sorted(self.failed + self.skipped, key=lambda record: record.key)
        return merged if self.problem_limit < 0 else merged[:self.problem_limit]

    @property
    def files_total(self) -> int:
        return sum(self.counts.values())

    @property
    def bytes_total(self) -> int:
        return sum(self.bytes_by_state.values())

@dataclass(frozen=True)
class Claim:
    """A chunk this worker holds: its number, and how many times it was claimed before
    (more than none: another worker had it, so its files may be half done)."""

    chunk_no: int
    earlier_claims: int


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    host: str
    pid: int
    started_at: str
    heartbeat_at: str
    files_done: int
    bytes_done: int
    lease_expired: bool
    ended: bool

    @property
    def live(self) -> bool:
        return not self.ended and not self.lease_expired


@dataclass(frozen=True)
class WorkLeft:
    """Where a shared batch stands for a host deciding what to do next."""

    scan_complete: bool
    scanner_alive: bool      # a scan is under way on a host whose lease holds
    claimable: bool          # chunks not done whose lease is free or ran out
    open_files: bool         # files pending or uploading (to send, or in flight on some host)
    failed_files: bool       # files failed (this run's hosts will not send them again)
    state: BatchState


def _first(row: list[object]) -> object:
    return row[0]


def encode_files(new_files: Iterable[NewFile]) -> EncodedFiles:
    """New files as one JSON array for ``Journal.add_files``, in path order; needs no connection.

    The scan calls this in its walking thread, so the Python work of a group is done
    while the previous group is being inserted. Path order puts neighbouring rows
    on the same B-tree pages (the walk yields a directory in hash order).
    """
    rows = sorted(([f.rel_path, f.key, f.size, f.mtime_ns, f.state.value, f.error, f.identity]
                   for f in new_files), key=_first)  # type: ignore[arg-type, return-value]
    return EncodedFiles(len(rows), json.dumps(rows, ensure_ascii=False))
