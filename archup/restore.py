"""Restore: a sealed batch back into a directory, every byte checked against the manifest.

The bucket and the manifest are input from outside: a forged, even correctly sealed,
manifest can name any path and any digest. So (docs/design.md, "Writes in the target"):

1. The summary is read (bounded) and its seals checked first: manifest.jsonl and
   manifest-skipped.jsonl are copied to local temporary files while they are hashed; a
   broken seal stops the restore before anything is created in the target (exit 3). Where
   the journal knows the batch, the summary must also be the one it recorded at seal time.
2. The entries are then read from the local copy, in key order, merged with one flat
   listing of the batch's ``files/`` (sizes and storage classes, no request per file).
3. Each file is written to a temporary name in its own directory (``.archup-restore-*``),
   its SHA-256 computed over the bytes written, compared with the entry, its mtime set,
   and only then renamed over its name. A file whose bytes differ never gets its name.
4. Paths: an entry whose path is absolute, has empty, ``.`` or ``..`` segments, or whose key
   is not ``<batch prefix>files/<path>`` is refused. Directories are opened one component
   at a time relative to the one above, never following a symlink (``O_NOFOLLOW``), so a
   symlink planted inside the target leads nowhere: nothing is created outside it.

A file already in the target is kept when its size and SHA-256 are the entry's (a re-run
after a crash downloads nothing that is already in place); otherwise it is replaced only
with ``overwrite``. The filesystem is the restore's only state: a re-run redoes what is not
in place, and its temporary names are fixed per file, so it reuses and removes them.

Packed files (a format_version 2 batch, ``upload --pack-under``) live in tar shards under
``<batch prefix>shards/``. The shard list (manifest-shards.jsonl) is spooled and checked
against its seal with the other lists. A packed entry is refused by name when its shard is
not in that list (or the list names it twice, or outside ``shards/``), or when its offset
and size run past the shard's listed size. The packed entries wanted are set aside in a
private temporary SQLite file (disk, not memory: a million of them cost a page cache),
then taken shard by shard in offset order. For each shard, the members that still need
their bytes (no regular file of their size at their name yet) decide how it is read:

* **whole**, one GET of the whole shard, when more than half of its members are needed, or
  when the bytes of the shard beyond the needed members' own are at most ``GET_COST`` (64
  KiB) for each GET this saves (a GET's round trip counted as that much transfer). The
  members are written from the stream as it passes, in offset order; the shard's own
  SHA-256 is taken on the way, and a difference from the shard list is logged: it decides
  nothing, since each member is checked against its own entry anyway;
* **ranged** otherwise: each needed member is a ranged GET of its own bytes only (ranges of
  ``part_size`` if it is larger). Restoring one packed file thus transfers its own bytes,
  or, from a shard of that one file, the shard (its headers and index are a few KiB).

Either way a member goes through the same steps as a file of its own: temporary name,
SHA-256 against its entry, mtime, rename. An archived shard is thawed once, whatever the
number of its members wanted; the run exits LATER as for any archived object.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from .crashpoints import crash_point
from .errors import ExitCode, Interrupted, SealBroken, TransferError, UsageError
from .journal.records import SHARDS_DIR
from .manifest import reader
from .manifest.reader import BadLine, Entry, ShardEntry
from .scan import FILES_DIR, display_path
from .select import Selector
from .store import ARCHIVE_CLASSES, ObjectInfo, ObjectStore, thaw_state

log = logging.getLogger("archup.restore")

DEFAULT_PARALLEL = 8
# Objects larger than this download as ranged GETs of this size, in parallel (s3transfer's
# default part size; one range is what a worker holds in flight, never in memory whole).
DEFAULT_PART_SIZE = 8 * 1024 * 1024
BUFFER_SIZE = 1024 * 1024
# At most this many failures are kept by name; the rest are counted.
MAX_NAMED = 1000
# RestoreObject requests per second, at most (S3's limit per account and region is 1,000).
MAX_THAW_REQUESTS_PER_SECOND = 1000
THAW_TIERS = ("Standard", "Bulk", "Expedited")
# How long a thaw takes, as AWS documents it (GLACIER; DEEP_ARCHIVE), for the report.
THAW_HOURS = {"Expedited": ("1-5 minutes", "not offered"), "Standard": ("3-5 hours", "up to 12 hours"),
              "Bulk": ("5-12 hours", "up to 48 hours")}
TEMP_PREFIX = ".archup-restore-"
# A packed file's shard is read whole when what it brings beyond the wanted members is at
# most this many bytes for each GET it saves (one GET's round trip, counted as transfer).
GET_COST = 64 * 1024
# Packed entries are read back from the plan this many at a time.
MEMBER_PAGE = 512
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class BatchLocation:
    """Where a sealed batch is: from the journal's row, or from --bucket and --prefix."""

    batch_id: str
    summary_key: str
    batch_prefix: str
    recorded_summary_sha256: str | None = None  # the journal's record of the seal, if it has one


@dataclass(frozen=True)
class RestoreOptions:
    parallel: int = DEFAULT_PARALLEL
    part_size: int = DEFAULT_PART_SIZE
    overwrite: bool = False
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    files_from: frozenset[str] | None = None
    restore_tier: str = "Standard"
    restore_days: int = 7
    wait: bool = False
    dry_run: bool = False
    # --wait: HEAD every thawing object this often at first, doubling up to the maximum.
    poll_first: float = 60.0
    poll_max: float = 900.0
    wait_limit: float | None = None  # seconds --wait may last (None: until done)


class RestoreObserver(Protocol):
    def on_totals(self, files: int, size: int) -> None:
        """What the whole restore holds, when it is known before the files are (no selection)."""

    def on_bytes(self, count: int) -> None: ...

    def on_file_started(self, rel_path: str, size: int) -> None: ...

    def on_file_done(self, rel_path: str, ok: bool, size: int, error: str | None) -> None: ...


class _Quiet:
    def on_totals(self, files: int, size: int) -> None:
        pass

    def on_bytes(self, count: int) -> None:
        pass

    def on_file_started(self, rel_path: str, size: int) -> None:
        pass

    def on_file_done(self, rel_path: str, ok: bool, size: int, error: str | None) -> None:
        pass


@dataclass
class RestoreReport:
    batch_id: str
    target: str
    dry_run: bool = False
    files_restored: int = 0
    bytes_restored: int = 0
    files_present: int = 0          # already in the target with the entry's size and SHA-256
    files_failed: int = 0           # named in ``failures`` (the first MAX_NAMED)
    objects_thawing: int = 0        # archived: a restore requested (or under way); run again later
    thaw_requests: int = 0          # RestoreObject requests this run sent
    files_selected: int = 0
    bytes_selected: int = 0
    elapsed_s: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    planned: list[tuple[str, str, int]] = field(default_factory=list)  # dry run: (action, path, size)
    thaw_note: str = ""

    @property
    def bytes_per_s(self) -> int:
        return int(self.bytes_restored / self.elapsed_s) if self.elapsed_s > 0 else 0

    @property
    def exit_code(self) -> ExitCode:
        if self.files_failed:
            return ExitCode.PARTIAL
        if self.objects_thawing:
            return ExitCode.LATER
        return ExitCode.OK

    def as_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "batch_id": self.batch_id, "target": self.target, "files_restored": self.files_restored,
            "bytes_restored": self.bytes_restored, "files_present": self.files_present,
            "files_failed": self.files_failed, "objects_thawing": self.objects_thawing,
            "thaw_requests": self.thaw_requests, "files_selected": self.files_selected,
            "bytes_selected": self.bytes_selected, "elapsed_s": round(self.elapsed_s, 3),
            "bytes_per_s": self.bytes_per_s,
            "failures": [{"path": path, "reason": reason} for path, reason in self.failures],
        }
        if self.dry_run:
            document["dry_run"] = True
            document["would_fetch"] = sum(1 for action, _, _ in self.planned if action == "fetch")
            document["would_thaw"] = sum(1 for action, _, _ in self.planned if action == "thaw")
        return document


def path_problem(path: str) -> str | None:
    """Why a manifest path cannot be restored under a directory, or None."""
    if not path:
        return "empty path"
    if "\0" in path:
        return "NUL in path"
    if path.startswith("/"):
        return "absolute path"
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            return f"path segment {segment or '(empty)'!r}"
        if segment.startswith(TEMP_PREFIX):
            return "name reserved for restore's temporary files"
    return None


def _temp_name(name: str) -> str:
    # Fixed per file, so a re-run after kill -9 reuses (and so removes) it; short whatever the name's length.
    return TEMP_PREFIX + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:20]


class UnsafePath(Exception):
    """A directory on the way is not a directory we made or found as one (a symlink, a file)."""


class Target:
    """The target directory, opened once; every path under it resolved one component at a
    time with ``dir_fd`` and ``O_NOFOLLOW``."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def open_parent(self, rel_path: str, *, create: bool) -> int | None:
        """An fd of the directory that holds ``rel_path`` (the caller closes it), creating the
        directories on the way if ``create``; None if one is missing and not created."""
        fd = os.dup(self.fd)
        try:
            for segment in rel_path.split("/")[:-1]:
                try:
                    child = os.open(segment, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    try:
                        os.mkdir(segment, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass  # another worker made it
                    child = os.open(segment, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except (NotADirectoryError, OSError) as error:
                    if isinstance(error, NotADirectoryError) or error.errno in (40, 20):  # ELOOP, ENOTDIR
                        raise UnsafePath(f"{segment!r} on its way is a symlink or not a directory") from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd


def _hash_range(fd: int, hasher: Any, offset: int, length: int, buffer: bytearray) -> None:
    """Feed ``length`` bytes of a file from ``offset`` to ``hasher`` (OSError if it is shorter)."""
    view = memoryview(buffer)
    end = offset + length
    while offset < end:
        count = os.preadv(fd, [view[:min(len(buffer), end - offset)]], offset)
        if count == 0:
            raise OSError(5, "the temporary file is shorter than the bytes written to it")
        hasher.update(view[:count])
        offset += count


def _hash_fd(fd: int, size: int, buffer: bytearray) -> str | None:
    """SHA-256 of a file's first ``size`` bytes read through ``fd``; None if it is shorter."""
    hasher = hashlib.sha256()
    view = memoryview(buffer)
    offset = 0
    while offset < size:
        count = os.preadv(fd, [view[:min(len(buffer), size - offset)]], offset)
        if count == 0:
            return None
        hasher.update(view[:count])
        offset += count
    return hasher.hexdigest()


class _Local(threading.local):
    buffer: bytearray | None = None


@dataclass
class _Large:
    """One large file being fetched as ranged GETs into its temporary file. Its SHA-256 is
    taken in order as the ranges land: whichever worker lands the range at ``hashed_to``
    hashes it (and the landed ranges after it) back from the page cache, so no serial pass
    over the whole file is left for the end."""

    entry: Entry
    parent_fd: int
    fd: int
    temp: str
    name: str
    etag: str | None
    remaining: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: str | None = None
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed_to: int = 0
    landed: dict[int, int] = field(default_factory=dict)  # start -> length, landed and not hashed yet
    hashing: bool = False   # a worker is hashing: the others only record what landed
    finished: bool = False  # sealed or given up (once)


def fetch_whole(members: int, needed: int, needed_bytes: int, shard_size: int) -> bool:
    """Whether a shard is read whole (one GET) rather than one ranged GET per needed member:
    when more than half of its ``members`` are needed, or when what it holds beyond the
    needed bytes is at most GET_COST for each GET saved. One member of several is never
    read whole: its restore transfers its own bytes only."""
    if needed <= 0:
        return False
    if 2 * needed > members:
        return True
    return shard_size - needed_bytes <= (needed - 1) * GET_COST


@dataclass(frozen=True)
class _ShardGroup:
    """One shard of the sealed list, and what this restore wants of it."""

    key: str
    size: int
    sha256: str
    members: int       # as the shard list says
    wanted: int        # entries this restore wants from it
    wanted_bytes: int


class _PackedPlan:
    """The sealed shard list and the packed entries this restore wants, in a private
    temporary SQLite file (deleted when closed; its page cache bounded), so a million
    packed entries cost disk, not memory. Each entry is checked against its shard's row as
    it is added; they are read back a shard at a time, in offset order, a page at a time.
    One connection, used by the workers too, under one lock."""

    def __init__(self, shards_prefix: str) -> None:
        self.shards_prefix = shards_prefix
        self.lock = threading.Lock()
        self.db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", "cache_size=-4096"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript("""
            CREATE TABLE shard (shard_key TEXT PRIMARY KEY, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
                                members INTEGER NOT NULL, problem TEXT);
            CREATE TABLE member (path TEXT NOT NULL UNIQUE, shard_key TEXT NOT NULL, data_start INTEGER NOT NULL,
                                 size INTEGER NOT NULL, sha256 TEXT NOT NULL, mtime_ns INTEGER);
            CREATE INDEX member_place ON member (shard_key, data_start);
            BEGIN;
        """)
        self._last: tuple[str, tuple[int, str | None] | None] | None = None

    def close(self) -> None:
        self.db.close()

    def add_shard(self, shard: ShardEntry) -> None:
        """A line of the sealed shard list. A key outside the batch's ``shards/``, or listed
        twice, leaves the shard unusable: its members are refused."""
        problem = None if shard.key.startswith(self.shards_prefix) else f"is outside {self.shards_prefix}"
        try:
            added = self.db.execute("INSERT OR IGNORE INTO shard VALUES (?, ?, ?, ?, ?)",
                                    (shard.key, shard.size, shard.sha256, shard.members, problem)).rowcount
        except UnicodeEncodeError:
            return  # a key no S3 object can have: its members find no shard
        if not added:
            self.db.execute("UPDATE shard SET problem = 'is listed twice in the shard list' WHERE shard_key = ?",
                            (shard.key,))

    def _shard(self, key: str) -> tuple[int, str | None] | None:
        if self._last is None or self._last[0] != key:
            row = self.db.execute("SELECT size, problem FROM shard WHERE shard_key = ?", (key,)).fetchone()
            self._last = (key, None if row is None else (row[0], row[1]))
        return self._last[1]

    def add(self, entry: Entry) -> str | None:
        """Set a wanted packed entry aside; why it is refused, or None."""
        assert entry.offset is not None
        try:
            shard = self._shard(entry.key)
        except UnicodeEncodeError:
            shard = None
        if shard is None:
            return f"its shard {entry.key!r} is not in the sealed shard list"
        size, problem = shard
        if problem is not None:
            return f"its shard {entry.key} {problem}"
        if entry.offset + entry.size > size:
            return (f"its bytes ({entry.size} from offset {entry.offset}) run past the end of its shard "
                    f"{entry.key} ({size} bytes)")
        try:
            self.db.execute("INSERT INTO member VALUES (?, ?, ?, ?, ?, ?)", (
                entry.path, entry.key, entry.offset, entry.size, entry.sha256, entry.mtime_ns))
        except sqlite3.IntegrityError:
            return "listed twice in the manifest"
        except UnicodeEncodeError:
            return "its path is not valid UTF-8"
        return None

    def loaded(self) -> None:
        self.db.execute("COMMIT")

    def any(self) -> bool:
        with self.lock:
            return self.db.execute("SELECT 1 FROM member LIMIT 1").fetchone() is not None

    def groups(self) -> Iterator[_ShardGroup]:
        """The shards with wanted members, in key order (SQLite compares text as UTF-8
        bytes: the listing's order)."""
        after = ""
        while True:
            with self.lock:
                rows = self.db.execute(
                    "SELECT m.shard_key, s.size, s.sha256, s.members, count(*), sum(m.size) FROM member m "
                    "JOIN shard s ON s.shard_key = m.shard_key WHERE m.shard_key > ? "
                    "GROUP BY m.shard_key ORDER BY m.shard_key LIMIT ?", (after, MEMBER_PAGE)).fetchall()
            for row in rows:
                yield _ShardGroup(*row)
            if len(rows) < MEMBER_PAGE:
                return
            after = rows[-1][0]

    def members(self, shard_key: str) -> Iterator[Entry]:
        """A shard's wanted members, in offset order."""
        start, rowid = -1, -1
        while True:
            with self.lock:
                rows = self.db.execute(
                    "SELECT data_start, rowid, path, size, sha256, mtime_ns FROM member WHERE shard_key = ? "
                    "AND (data_start > ? OR (data_start = ? AND rowid > ?)) ORDER BY data_start, rowid LIMIT ?",
                    (shard_key, start, start, rowid, MEMBER_PAGE)).fetchall()
            for offset, _, path, size, sha256, mtime_ns in rows:
                yield Entry(path=path, key=shard_key, size=size, sha256=sha256, etag=None, part_size=None,
                            mtime_ns=mtime_ns, offset=offset)
            if len(rows) < MEMBER_PAGE:
                return
            start, rowid = rows[-1][0], rows[-1][1]


class _ShardStream:
    """One GET of a whole shard, read once from its first byte to its last and hashed on the
    way. A read that breaks resumes from where it was, with a ranged GET pinned to the same
    ETag (a replaced shard is a 412), up to RESUMES times; past that, or when the GET itself
    is refused, the stream stays broken: every later read raises the same error, and no
    further request is sent."""

    RESUMES = 3

    def __init__(self, store: ObjectStore, key: str, etag: str | None) -> None:
        self.store = store
        self.key = key
        self.etag = etag
        self.body: Any = None
        self.position = 0
        self.hasher = hashlib.sha256()
        self.ended = False
        self.resumes = 0
        self.broken: TransferError | OSError | None = None

    def readinto(self, view: memoryview) -> int:
        """Bytes from the current position into ``view``; 0 at the shard's end."""
        while not self.ended:
            if self.broken is not None:
                raise self.broken
            if self.body is None:
                try:
                    # A refused GET (412, 403, an archived shard) was retried by the store already.
                    self.body = self.store.open_object(self.key, start=self.position, if_match=self.etag)
                except (TransferError, OSError) as error:
                    self.broken = error
                    continue
                if self.body is None:
                    self.broken = TransferError(f"GetObject {self.key}: the shard is gone", "NoSuchKey")
                    continue
            try:
                count = self.body.readinto(view)
            except (TransferError, OSError) as error:
                self.close()
                self.resumes += 1
                if self.resumes > self.RESUMES:
                    self.broken = error
                continue
            if count == 0:
                self.ended = True
                break
            self.hasher.update(view[:count])
            self.position += count
            return count
        return 0

    def skip_to(self, offset: int, buffer: bytearray) -> None:
        """Read (and hash) up to ``offset``, or to the end if the shard is shorter."""
        view = memoryview(buffer)
        while self.position < offset:
            if self.readinto(view[:min(len(view), offset - self.position)]) == 0:
                return

    def close(self) -> None:
        if self.body is not None:
            body, self.body = self.body, None
            body.close()


class _Restore:
    def __init__(self, store: ObjectStore, location: BatchLocation, target: Path, options: RestoreOptions,
                 observer: RestoreObserver, stop: threading.Event, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.sleep = sleep or stop.wait  # a signal ends any wait at once
        self.location = location
        self.target_path = target
        self.options = options
        self.observer = observer
        self.stop = stop
        self.report = RestoreReport(location.batch_id, str(target), dry_run=options.dry_run)
        self.lock = threading.Lock()
        self.local = _Local()
        self.select = Selector(options.includes, options.excludes)
        self.files_prefix = location.batch_prefix + FILES_DIR
        self.thaw_times: list[float] = []
        self.waiting: list[tuple[Entry | _ShardGroup, ObjectInfo]] = []
        self.target: Target | None = None
        self.packed = _PackedPlan(location.batch_prefix + SHARDS_DIR)
        # Restored files get the mode a new file gets here (0666 less the umask), as cp gives them.
        umask = os.umask(0o022)
        os.umask(umask)
        self.file_mode = 0o666 & ~umask

    # -- bookkeeping ----------------------------------------------------------

    def _buffer(self) -> bytearray:
        if self.local.buffer is None:
            self.local.buffer = bytearray(BUFFER_SIZE)
        return self.local.buffer

    def fail(self, path: str, reason: str) -> None:
        with self.lock:
            self.report.files_failed += 1
            if len(self.report.failures) < MAX_NAMED:
                self.report.failures.append((path, reason))
        log.warning("restore: %s: %s", display_path(path), display_path(reason))

    def _done(self, entry: Entry, ok: bool, error: str | None = None, *, present: bool = False) -> None:
        if ok:
            with self.lock:
                if present:
                    self.report.files_present += 1
                else:
                    self.report.files_restored += 1
                    self.report.bytes_restored += entry.size
        else:
            self.fail(entry.path, error or "failed")
        self.observer.on_file_done(entry.path, ok, entry.size, error)

    # -- the seal ---------------------------------------------------------------

    def read_seal(self, spool: IO[bytes]) -> reader.Summary:
        location = self.location
        try:
            summary = reader.read_summary(self.store, location.summary_key, location.batch_id)
        except reader.ManifestDefect as defect:
            if defect.kind == "missing":
                raise SealBroken(f"batch {location.batch_id}: no manifest at {location.summary_key}: the batch "
                                 "is not sealed there (check --bucket, --prefix and --endpoint-url)") from None
            raise SealBroken(f"batch {location.batch_id}: the manifest summary cannot be used: {defect}; "
                             "nothing was restored") from None
        if location.recorded_summary_sha256 is not None and summary.sha256 != location.recorded_summary_sha256:
            raise SealBroken(f"batch {location.batch_id}: {location.summary_key} is not the summary the journal "
                             f"recorded at seal time (SHA-256 {summary.sha256}, recorded "
                             f"{location.recorded_summary_sha256}); nothing was restored")
        for seal in (summary.entries, summary.skipped, summary.shards):
            if seal is None:
                continue
            if not seal.key.startswith(location.batch_prefix):
                raise SealBroken(f"batch {location.batch_id}: the summary seals {seal.key}, outside the batch "
                                 f"prefix {location.batch_prefix}; nothing was restored")
            if seal is summary.entries:
                broken = reader.spool(self.store, seal, spool)
            else:
                with tempfile.TemporaryFile() as scratch:
                    broken = reader.spool(self.store, seal, scratch)
                    if not broken and seal is summary.shards:
                        self._load_shards(scratch)
            if broken:
                what = "; ".join(f"{name}: sealed {expected}, read {actual}" for name, expected, actual in broken)
                raise SealBroken(f"batch {location.batch_id}: {seal.key} does not match its seal ({what}); "
                                 "nothing was restored")
        return summary

    def _load_shards(self, spooled: IO[bytes]) -> None:
        """The sealed shard list into the plan; an unusable line is reported (its shard's
        members then find no shard and are refused by name)."""
        for number, line in enumerate(reader.local_lines(spooled), start=1):
            shard = reader.parse_shard(line, number)
            if isinstance(shard, BadLine):
                self.fail(f"(shard list line {shard.number})", f"unusable shard: {shard.reason}")
            else:
                self.packed.add_shard(shard)

    # -- planning ---------------------------------------------------------------

    def wanted(self, entries: Iterator[Entry | BadLine]) -> Iterator[Entry]:
        """The selected entries that may be restored; the others reported."""
        for item in entries:
            if isinstance(item, BadLine):
                self.fail(f"(manifest line {item.number})", f"unusable entry: {item.reason}")
                continue
            problem = path_problem(item.path)
            if problem is None and not item.packed and item.key != self.files_prefix + item.path:
                problem = f"key {item.key!r} is not the path's key"
            if problem is not None:
                self.fail(item.path, f"refused: {problem}")
                continue
            if self.options.files_from is not None and item.path not in self.options.files_from:
                continue
            if not self.select(item.path):
                continue
            with self.lock:
                self.report.files_selected += 1
                self.report.bytes_selected += item.size
            yield item

    # -- one file -----------------------------------------------------------------

    def _existing(self, entry: Entry, parent_fd: int, name: str) -> str | None:
        """'same' (kept), 'differs', or None (nothing there). A symlink, a directory or any
        other non-file in the way differs."""
        try:
            info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_size != entry.size:
            return "differs"
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            digest = _hash_fd(fd, entry.size, self._buffer())
        finally:
            os.close(fd)
        return "same" if digest == entry.sha256 else "differs"

    def _prepare(self, entry: Entry) -> tuple[int, str] | None:
        """The open parent directory and the name, or None when the file needs nothing (kept,
        or failed and reported)."""
        assert self.target is not None
        name = entry.path.rsplit("/", 1)[-1]
        try:
            parent_fd = self.target.open_parent(entry.path, create=True)
        except UnsafePath as error:
            self._done(entry, False, f"refused: {error}")
            return None
        except OSError as error:
            self._done(entry, False, f"cannot create its directory: {error.strerror}")
            return None
        assert parent_fd is not None
        try:
            existing = self._existing(entry, parent_fd, name)
        except OSError as error:
            os.close(parent_fd)
            self._done(entry, False, f"cannot read the file in place: {error.strerror}")
            return None
        if existing == "same":
            _unlink_quietly(_temp_name(name), parent_fd)
            os.close(parent_fd)
            self._done(entry, True, present=True)
            return None
        if existing == "differs" and not self.options.overwrite:
            os.close(parent_fd)
            self._done(entry, False, "exists and differs from the archive (--overwrite replaces it)")
            return None
        return parent_fd, name

    def _open_temp(self, parent_fd: int, name: str) -> tuple[int, str]:
        temp = _temp_name(name)
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=parent_fd)
        return fd, temp

    def _seal_file(self, entry: Entry, parent_fd: int, fd: int, temp: str, name: str, digest: str | None) -> str | None:
        """Check, date and rename the finished temporary file; the reason it failed, or None."""
        if digest != entry.sha256:
            _unlink_quietly(temp, parent_fd)
            return f"SHA-256 of the bytes read is {digest or '(short read)'}, the manifest says {entry.sha256}"
        os.fchmod(fd, self.file_mode)
        if entry.mtime_ns is not None:
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        crash_point("restore-before-rename")
        try:
            os.rename(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except OSError as error:  # a directory in the way, say
            _unlink_quietly(temp, parent_fd)
            return f"cannot put it in place: {error.strerror}"
        crash_point("restore-after-rename")
        return None

    def fetch_small(self, entry: Entry, listed: ObjectInfo) -> None:
        self.observer.on_file_started(entry.path, entry.size)
        prepared = self._prepare(entry)
        if prepared is None:
            return
        parent_fd, name = prepared
        fd = -1
        temp = ""
        error: str | None = None
        try:
            fd, temp = self._open_temp(parent_fd, name)
            digest = self._download_or_empty(entry, listed, fd)
            error = self._seal_file(entry, parent_fd, fd, temp, name, digest)
        except (TransferError, OSError, _Stopped) as failure:
            if temp:
                _unlink_quietly(temp, parent_fd)
            error = _reason(failure)
        finally:
            if fd >= 0:
                os.close(fd)
            os.close(parent_fd)
        if isinstance(error, str) and error == _STOPPED:
            return
        self._done(entry, error is None, error)

    def _download(self, entry: Entry, listed: ObjectInfo, fd: int) -> str | None:
        """GET the whole object into ``fd``, hashing as it streams; its SHA-256, or None if it
        ended short."""
        # A range of exactly the entry's size: a bound the store can hold whole (the CRT's GET);
        # for a packed file, its own bytes in its shard and nothing else.
        body = self.store.open_object(entry.key, start=entry.offset or 0, length=entry.size,
                                      if_match=listed.etag or None)
        if body is None:
            raise TransferError(f"GetObject {entry.key}: the object is gone", "NoSuchKey")
        hasher = hashlib.sha256()
        buffer = self._buffer()
        view = memoryview(buffer)
        written = 0
        with closing(body):
            while written <= entry.size:
                if self.stop.is_set():
                    raise _Stopped()
                count = body.readinto(view)
                if count == 0:
                    break
                hasher.update(view[:count])
                os.write(fd, view[:count])
                written += count
                self.observer.on_bytes(count)
        return hasher.hexdigest() if written == entry.size else None

    # -- large files: ranges ------------------------------------------------------

    def ranges(self, entry: Entry, listed: ObjectInfo) -> list[Callable[[], None]]:
        """The ranged GETs of one large file, as tasks; the last one to finish seals the file."""
        self.observer.on_file_started(entry.path, entry.size)
        prepared = self._prepare(entry)
        if prepared is None:
            return []
        parent_fd, name = prepared
        try:
            fd, temp = self._open_temp(parent_fd, name)
            os.ftruncate(fd, entry.size)
        except OSError as error:
            os.close(parent_fd)
            self._done(entry, False, f"cannot write: {error.strerror}")
            return []
        part = self.options.part_size
        starts = list(range(0, entry.size, part))
        large = _Large(entry, parent_fd, fd, temp, name, listed.etag or None, len(starts))
        return [lambda start=start: self._range(large, start, min(part, entry.size - start)) for start in starts]

    def _range(self, large: _Large, start: int, length: int) -> None:
        error: str | None = None
        if large.error is None:
            try:
                self._fetch_range(large, start, length)
            except (TransferError, OSError, _Stopped) as failure:
                error = _reason(failure)
        with large.lock:
            large.remaining -= 1
            if error is not None and large.error is None:
                large.error = error
            if error is None:
                large.landed[start] = length
            if large.hashing:
                return  # the worker hashing now takes this range when it gets to it
            large.hashing = True
        self._hash_landed(large)

    def _hash_landed(self, large: _Large) -> None:
        """Hash the landed ranges at the cursor, in order; seal or give up the file when it is
        the last thing to do for it. Only one worker at a time is here for one file."""
        buffer = self._buffer()
        while True:
            with large.lock:
                length = large.landed.pop(large.hashed_to, None) if large.error is None else None
                if length is None:
                    large.hashing = False
                    done = large.hashed_to == large.entry.size or (large.error is not None and large.remaining == 0)
                    if not done or large.finished:
                        return
                    large.finished = True
                    break
            try:
                _hash_range(large.fd, large.hasher, large.hashed_to, length, buffer)
            except OSError as failure:
                with large.lock:
                    large.error = large.error or _reason(failure)
                continue
            large.hashed_to += length  # only the hashing worker moves the cursor
        self._finish_large(large)

    def _fetch_range(self, large: _Large, start: int, length: int) -> None:
        body = self.store.open_object(large.entry.key, start=(large.entry.offset or 0) + start, length=length,
                                      if_match=large.etag)
        if body is None:
            raise TransferError(f"GetObject {large.entry.key}: the object is gone", "NoSuchKey")
        view = memoryview(self._buffer())
        offset = start
        end = start + length
        with closing(body):
            while offset < end:
                if self.stop.is_set() or large.error is not None:
                    raise _Stopped()
                count = body.readinto(view[:min(len(view), end - offset)])
                if count == 0:
                    raise TransferError(f"GetObject {large.entry.key}: the range from byte {start} ended at "
                                        f"byte {offset}, short of {end}", "IncompleteBody")
                os.pwrite(large.fd, view[:count], offset)
                offset += count
                self.observer.on_bytes(count)
        crash_point("restore-range-written")

    def _finish_large(self, large: _Large) -> None:
        entry = large.entry
        error = large.error
        try:
            if error is None:
                digest = large.hasher.hexdigest()
                error = self._seal_file(entry, large.parent_fd, large.fd, large.temp, large.name, digest)
            else:
                _unlink_quietly(large.temp, large.parent_fd)
        except OSError as failure:
            _unlink_quietly(large.temp, large.parent_fd)
            error = _reason(failure)
        finally:
            os.close(large.fd)
            os.close(large.parent_fd)
        if error == _STOPPED:
            return
        self._done(entry, error is None, error)

    # -- archived objects ---------------------------------------------------------

    def _thaw_state(self, key: str, listed: ObjectInfo) -> tuple[str, ObjectInfo]:
        """readable / archived / thawing, with HEAD's answer for an object of an archive class."""
        storage_class = (listed.storage_class or "").upper()
        if storage_class not in ARCHIVE_CLASSES and storage_class != "INTELLIGENT_TIERING":
            return "readable", listed
        info = self.store.head(key)
        if info is None:
            raise TransferError(f"HeadObject {key}: the object is gone", "NoSuchKey")
        return thaw_state(info), info

    def _request_thaw(self, key: str, info: ObjectInfo) -> None:
        # At most MAX_THAW_REQUESTS_PER_SECOND, whatever the parallelism: S3's own limit.
        now = self.clock()
        with self.lock:
            while self.thaw_times and now - self.thaw_times[0] >= 1.0:
                self.thaw_times.pop(0)
            if len(self.thaw_times) >= MAX_THAW_REQUESTS_PER_SECOND:
                delay = 1.0 - (now - self.thaw_times[0])
            else:
                delay = 0.0
            self.thaw_times.append(now + delay)
        if delay > 0:
            self.sleep(delay)
        self.store.restore_object(key, days=self.options.restore_days, tier=self.options.restore_tier,
                                  storage_class=info.storage_class)
        with self.lock:
            self.report.thaw_requests += 1

    def _dry_action(self, entry: Entry) -> str:
        """What a real run would do with a readable object: fetch it, or keep the file in place."""
        if self.target is None:
            return "fetch"
        try:
            parent_fd = self.target.open_parent(entry.path, create=False)
        except (UnsafePath, OSError):
            return "refuse"
        if parent_fd is None:
            return "fetch"
        try:
            existing = self._existing(entry, parent_fd, entry.path.rsplit("/", 1)[-1])
        except OSError:
            existing = "differs"
        finally:
            os.close(parent_fd)
        if existing == "same":
            return "keep"
        return "fetch" if existing is None or self.options.overwrite else "refuse"

    # -- the run --------------------------------------------------------------------

    def plan_item(self, entry: Entry, listed: ObjectInfo | None) -> list[Callable[[], None]]:
        """What one entry needs: nothing (reported), or the tasks that fetch it."""
        if listed is None:
            self._done(entry, False, "missing from the bucket")
            return []
        if listed.size != entry.size:
            self._done(entry, False, f"the object has {listed.size} bytes, the manifest says {entry.size}")
            return []
        try:
            state, info = self._thaw_state(entry.key, listed)
            if state != "readable":
                if self.options.dry_run:
                    self.report.planned.append(("thaw", entry.path, entry.size))
                    return []
                if state == "archived":
                    self._request_thaw(entry.key, info)
                if self.options.wait:
                    self.waiting.append((entry, listed))
                else:
                    with self.lock:
                        self.report.objects_thawing += 1
                return []
        except TransferError as error:
            self._done(entry, False, str(error))
            return []
        if self.options.dry_run:
            self.report.planned.append((self._dry_action(entry), entry.path, entry.size))
            return []
        if entry.size > self.options.part_size:
            return self.ranges(entry, listed)
        return [lambda: self.fetch_small(entry, listed)]

    def _download_or_empty(self, entry: Entry, listed: ObjectInfo, fd: int) -> str | None:
        """An empty object's bytes are known without a GET (the listing said it is there and
        empty, or it is a packed file of no bytes); its digest is still the one checked
        against the entry."""
        if entry.size == 0 and (entry.packed or listed.size == 0):
            return _EMPTY_SHA256
        return self._download(entry, listed, fd)

    def run(self) -> RestoreReport:
        try:
            return self._run()
        finally:
            self.packed.close()

    def _run(self) -> RestoreReport:
        started = time.monotonic()
        with tempfile.TemporaryFile() as spool:
            summary = self.read_seal(spool)
            files, size = summary.count("files_uploaded"), summary.count("total_bytes")
            options = self.options
            if files is not None and size is not None and not (options.includes or options.excludes
                                                               or options.files_from is not None):
                self.observer.on_totals(files, size)
            if not self.options.dry_run:
                self.target = Target(self.target_path)
            elif self.target_path.is_dir():
                self.target = Target(self.target_path)
            try:
                self._send(reader.entries(reader.local_lines(spool)))
                if self.waiting:
                    self._wait_and_fetch()
            finally:
                if self.target is not None:
                    self.target.close()
        self.report.elapsed_s = time.monotonic() - started
        if self.report.objects_thawing:
            glacier, deep = THAW_HOURS[self.options.restore_tier]
            self.report.thaw_note = (f"{self.report.objects_thawing} object(s) are thawing ({self.options.restore_tier} "
                                     f"tier: {glacier} for GLACIER, {deep} for DEEP_ARCHIVE); run the same "
                                     "command again then, or add --wait")
        if self.stop.is_set():
            raise Interrupted(f"restore of batch {self.location.batch_id} interrupted; run the same command "
                              "again to finish it (files in place are kept)")
        return self.report

    def _send(self, entries: Iterator[Entry | BadLine]) -> None:
        listing = self.store.list_objects(self.files_prefix)
        with _Window(self.options.parallel) as window:
            for paired in reader.merge_listing(self._set_packed_aside(self.wanted(entries)), lambda entry: entry.key,
                                               listing):
                if paired.item is None:
                    continue  # an object the manifest does not name: not part of the batch
                if self.stop.is_set():
                    break
                for task in self.plan_item(paired.item, paired.listed):
                    window.submit(task)
        self.packed.loaded()
        if self.stop.is_set() or not self.packed.any():
            return
        # The packed files only once every file of its own is done: a forged manifest may give
        # one path both ways, and two workers must never write one temporary file.
        shards = self.store.list_objects(self.location.batch_prefix + SHARDS_DIR)
        with _Window(self.options.parallel) as window:
            for paired in reader.merge_listing(self.packed.groups(), lambda group: group.key, shards):
                if paired.item is None:
                    continue
                if self.stop.is_set():
                    break
                for task in self.plan_shard(paired.item, paired.listed):
                    window.submit(task)

    def _set_packed_aside(self, entries: Iterator[Entry]) -> Iterator[Entry]:
        """The entries of files of their own; packed ones go into the plan (or are refused)."""
        for entry in entries:
            if not entry.packed:
                yield entry
                continue
            problem = self.packed.add(entry)
            if problem is not None:
                self._done(entry, False, f"refused: {problem}")

    # -- packed files: their shards --------------------------------------------------

    def _fail_members(self, group: _ShardGroup, reason: str) -> None:
        for member in self.packed.members(group.key):
            self._done(member, False, reason)

    def plan_shard(self, group: _ShardGroup, listed: ObjectInfo | None) -> Iterator[Callable[[], None]]:
        """What one shard's wanted members need: nothing (reported), a thaw, one GET of the
        whole shard, or a ranged GET of each (see the module's docstring for which)."""
        if listed is None:
            self._fail_members(group, f"its shard {group.key} is missing from the bucket")
            return
        try:
            state, info = self._thaw_state(group.key, listed)
        except TransferError as error:
            self._fail_members(group, str(error))
            return
        if state != "readable":
            if self.options.dry_run:
                for member in self.packed.members(group.key):
                    self.report.planned.append(("thaw", member.path, member.size))
                return
            if state == "archived":
                self._request_thaw(group.key, info)  # once for the shard, whatever its members wanted
            if self.options.wait:
                self.waiting.append((group, listed))
            else:
                with self.lock:
                    self.report.objects_thawing += 1
            return
        yield from self._shard_tasks(group, listed)

    def _shard_tasks(self, group: _ShardGroup, listed: ObjectInfo) -> Iterator[Callable[[], None]]:
        if self.options.dry_run:
            for member in self.packed.members(group.key):
                self.report.planned.append((self._dry_action(member), member.path, member.size))
            return
        needed = needed_bytes = 0
        for member in self.packed.members(group.key):
            if self._likely_needed(member):
                needed += 1
                needed_bytes += member.size
        if fetch_whole(group.members, needed, needed_bytes, group.size):
            yield lambda: self.fetch_shard(group, listed)
            return
        for member in self.packed.members(group.key):
            if member.size > self.options.part_size:
                yield from self.ranges(member, listed)
            else:
                yield lambda member=member: self.fetch_small(member, listed)

    def _likely_needed(self, entry: Entry) -> bool:
        """Whether a member will need its bytes, at a glance (a regular file of its size at its
        name counts as in place; its fetch, or its skip, checks the SHA-256): what decides how
        its shard is read, so a re-run does not read a shard again for files already there."""
        assert self.target is not None
        try:
            parent_fd = self.target.open_parent(entry.path, create=False)
        except (UnsafePath, OSError):
            return False  # refused when its turn comes
        if parent_fd is None:
            return True
        try:
            info = os.stat(entry.path.rsplit("/", 1)[-1], dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        finally:
            os.close(parent_fd)
        if stat.S_ISREG(info.st_mode) and info.st_size == entry.size:
            return False
        return self.options.overwrite

    def fetch_shard(self, group: _ShardGroup, listed: ObjectInfo) -> None:
        """One GET of the whole shard: each wanted member is written from the stream as it
        passes, in offset order, and checked against its own entry; the shard's SHA-256 is
        taken on the way, for the log. A member whose bytes start before the stream's place
        (entries that overlap: a forged manifest) gets a ranged GET of its own."""
        stream = _ShardStream(self.store, group.key, listed.etag or None)
        try:
            for member in self.packed.members(group.key):
                if self.stop.is_set():
                    return
                if member.offset is not None and member.offset < stream.position:
                    self.fetch_small(member, listed)
                    continue
                self.observer.on_file_started(member.path, member.size)
                prepared = self._prepare(member)
                if prepared is not None:
                    self._member_from_stream(member, stream, *prepared)
            if self.stop.is_set():
                return
            if stream.position or stream.body is not None:
                # To its sealed end (never further: a replaced shard may be any size), for its SHA-256.
                stream.skip_to(group.size, self._buffer())
                digest = stream.hasher.hexdigest()
                if digest != group.sha256 or listed.size != group.size:
                    log.warning("restore: shard %s: %d bytes with SHA-256 %s (the first %d), the shard list says %d "
                                "bytes with %s; each of its members was checked against its own entry", group.key,
                                listed.size, digest, stream.position, group.size, group.sha256)
        except (TransferError, OSError) as failure:
            # The stream broke past its resumes: the members it did not reach fail by name.
            log.warning("restore: shard %s: %s", group.key, _reason(failure))
        finally:
            stream.close()

    def _member_from_stream(self, entry: Entry, stream: _ShardStream, parent_fd: int, name: str) -> None:
        """One member's bytes from the whole shard's stream into its temporary file, hashed,
        checked and renamed as a file of its own is."""
        assert entry.offset is not None
        fd = -1
        temp = ""
        error: str | None = None
        end = entry.offset + entry.size
        try:
            fd, temp = self._open_temp(parent_fd, name)
            buffer = self._buffer()
            stream.skip_to(entry.offset, buffer)
            view = memoryview(buffer)
            hasher = hashlib.sha256()
            while stream.position < end:
                if self.stop.is_set():
                    raise _Stopped()
                count = stream.readinto(view[:min(len(view), end - stream.position)])
                if count == 0:
                    break
                hasher.update(view[:count])
                os.write(fd, view[:count])
                self.observer.on_bytes(count)
            digest = hasher.hexdigest() if stream.position == end else None
            error = self._seal_file(entry, parent_fd, fd, temp, name, digest)
        except (TransferError, OSError, _Stopped) as failure:
            if temp:
                _unlink_quietly(temp, parent_fd)
            error = _reason(failure)
        finally:
            if fd >= 0:
                os.close(fd)
            os.close(parent_fd)
        if error == _STOPPED:
            return
        self._done(entry, error is None, error)

    def _wait_and_fetch(self) -> None:
        """--wait: poll the thawing objects with backoff; fetch each once it is readable."""
        delay = self.options.poll_first
        deadline = None if self.options.wait_limit is None else self.clock() + self.options.wait_limit
        waiting = self.waiting
        while waiting and not self.stop.is_set():
            still: list[tuple[Entry | _ShardGroup, ObjectInfo]] = []
            ready: list[tuple[Entry | _ShardGroup, ObjectInfo]] = []
            for entry, listed in waiting:
                info = self.store.head(entry.key)
                if info is None:
                    if isinstance(entry, _ShardGroup):
                        self._fail_members(entry, f"its shard {entry.key} is missing from the bucket")
                    else:
                        self._done(entry, False, "missing from the bucket")
                elif thaw_state(info) == "readable":
                    ready.append((entry, listed))
                else:
                    still.append((entry, listed))
            if ready:
                self.waiting = []
                self._send_ready(ready)
            waiting = still
            if not waiting:
                break
            if deadline is not None and self.clock() + delay > deadline:
                with self.lock:
                    self.report.objects_thawing += len(waiting)
                return
            log.info("restore: %d object(s) still thawing; next look in %.0f s", len(waiting), delay)
            self.sleep(delay)
            delay = min(delay * 2, self.options.poll_max)

    def _send_ready(self, ready: list[tuple[Entry | _ShardGroup, ObjectInfo]]) -> None:
        # Files of their own first, then shards, as in _send: never one path in both at once.
        with _Window(self.options.parallel) as window:
            for entry, listed in ready:
                if isinstance(entry, _ShardGroup):
                    continue
                tasks = self.ranges(entry, listed) if entry.size > self.options.part_size else \
                    [lambda entry=entry, listed=listed: self.fetch_small(entry, listed)]
                for task in tasks:
                    window.submit(task)
        with _Window(self.options.parallel) as window:
            for group, listed in ready:
                if isinstance(group, _ShardGroup):
                    for task in self._shard_tasks(group, listed):
                        window.submit(task)


class _Window:
    """Bounded submission to a pool of ``parallel`` workers: at most 2 x ``parallel`` tasks
    queued or running, a slot taken before each submit and given back as its task ends (one
    semaphore, no per-completion wake-up of the submitter). A task's unexpected error (a bug,
    an unusable destination) is raised in the submitting thread at its next submit or at the
    end; a file's own failures never get here (they are reported as the file's)."""

    def __init__(self, parallel: int) -> None:
        self.limit = parallel * 2
        self.slots = threading.BoundedSemaphore(self.limit)
        self.errors: list[BaseException] = []
        self.pool = ThreadPoolExecutor(parallel, thread_name_prefix="archup-restore")

    def submit(self, task: Callable[[], None]) -> None:
        self.slots.acquire()
        if self.errors:
            self.slots.release()
            raise self.errors[0]

        def run() -> None:
            try:
                task()
            except BaseException as error:  # handed to the submitting thread
                self.errors.append(error)
            finally:
                self.slots.release()

        self.pool.submit(run)

    def __enter__(self) -> _Window:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)
        if self.errors and exc[0] is None:
            raise self.errors[0]


class _Stopped(Exception):
    """A stop was asked for (a signal): the file is left for the next run."""


_STOPPED = "stopped"


def _reason(failure: BaseException) -> str:
    if isinstance(failure, _Stopped):
        return _STOPPED
    if isinstance(failure, OSError):
        return f"cannot write: {failure.strerror or failure}"
    return str(failure)


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def restore_batch(store: ObjectStore, location: BatchLocation, target: Path, options: RestoreOptions, *,
                  observer: RestoreObserver | None = None, stop: threading.Event | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], object] | None = None) -> RestoreReport:
    """Restore a sealed batch under ``target``; see the module's docstring for the order of
    writes. Raises SealBroken before writing anything when the manifest's seal does not hold,
    DestinationError when the bucket is unusable, Interrupted when ``stop`` was set; every
    other problem is one file's, named in the report."""
    if options.restore_tier not in THAW_TIERS:
        raise UsageError(f"--restore-tier {options.restore_tier}: use one of {', '.join(THAW_TIERS)}")
    return _Restore(store, location, target, options, observer or _Quiet(), stop or threading.Event(),
                    clock=clock, sleep=sleep).run()
