"""The batch journal: the single authority on what a batch holds.

SQLite in WAL mode with ``synchronous=FULL``. Every state change is one
``BEGIN IMMEDIATE`` transaction through :meth:`Journal.atomic`, so concurrent
workers (threads or processes) add and complete files without a lost update:
the read of the current state and the write of the new one happen under the
same write lock. Each thread gets its own connection; none is shared, and a
forked child opens its own.
"""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .errors import (
    BatchClosed,
    BatchNotFound,
    FileAlreadyUploaded,
    FileNotInBatch,
    IllegalTransition,
    JournalBusy,
    JournalError,
    JournalTooNew,
)
from .states import BatchState, FileState, batch_can_move, file_can_move

SCHEMA_VERSION = 4
DEFAULT_BUSY_TIMEOUT = 30.0
BATCH_TTL = timedelta(hours=24)
# The scan's groups let the WAL grow to 64 MiB between checkpoints (a B-tree page
# changed by several groups is copied back once): 20 % less insert time at 1,000,000
# files. The WAL file keeps that size on disk afterwards; SQLite reuses it.
SCAN_CHECKPOINT_PAGES = 16384

# Each entry upgrades the schema from version i to i + 1; never edit a shipped one.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE batches (
        batch_id      TEXT PRIMARY KEY,
        state         TEXT NOT NULL,
        source_root   TEXT NOT NULL,
        bucket        TEXT NOT NULL,
        prefix        TEXT NOT NULL,
        endpoint_url  TEXT,
        region        TEXT,
        part_size     INTEGER NOT NULL,
        scan_complete INTEGER NOT NULL DEFAULT 0,
        manifest_key  TEXT,
        error         TEXT,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL,
        expires_at    TEXT NOT NULL,
        finalized_at  TEXT
    );
    CREATE TABLE files (
        batch_id   TEXT NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
        rel_path   TEXT NOT NULL,
        key        TEXT NOT NULL,
        size       INTEGER NOT NULL,
        mtime_ns   INTEGER NOT NULL,
        state      TEXT NOT NULL,
        part_size  INTEGER,
        upload_id  TEXT,
        sha256     TEXT,
        etag       TEXT,
        error      TEXT,
        attempts   INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (batch_id, rel_path),
        UNIQUE (batch_id, key)
    ) WITHOUT ROWID;
    CREATE INDEX files_by_state ON files (batch_id, state, size);
    CREATE TABLE parts (
        batch_id    TEXT NOT NULL,
        rel_path    TEXT NOT NULL,
        part_number INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        etag        TEXT NOT NULL,
        checksum    TEXT,
        PRIMARY KEY (batch_id, rel_path, part_number),
        FOREIGN KEY (batch_id, rel_path) REFERENCES files(batch_id, rel_path) ON DELETE CASCADE
    ) WITHOUT ROWID;
    """,
    # 2: --skip-archived looks files up by path across batches.
    """
    CREATE INDEX files_by_path ON files (rel_path, size, mtime_ns);
    """,
    # 3: what the scan saw of a file beyond size and mtime (device, inode, ctime), so a
    # file replaced or rewritten with its mtime put back is caught before upload.
    """
    ALTER TABLE files ADD COLUMN identity TEXT;
    """,
    # 4: what a resumer must keep as the first run chose it: the batch's selection and
    # archive options (JSON), and the checksum kind each multipart upload was created with;
    # and how many files --skip-archived found archived already (counted, not a row each).
    """
    ALTER TABLE batches ADD COLUMN settings TEXT;
    ALTER TABLE files ADD COLUMN checksum_kind TEXT;
    ALTER TABLE batches ADD COLUMN files_archived INTEGER NOT NULL DEFAULT 0;
    """,
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def isoformat(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def default_journal_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$ARCHUP_JOURNAL``, else ``$XDG_STATE_HOME/archup/journal.db`` (``environ``: os.environ)."""
    environ = os.environ if environ is None else environ
    explicit = environ.get("ARCHUP_JOURNAL")
    if explicit:
        return Path(explicit).expanduser()
    state_home = environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state_home) / "archup" / "journal.db"


def resume_command(batch_id: str, journal_path: Path, profile: str | None = None) -> str:
    """The command that finishes a batch, runnable as printed: the journal records the
    source, the destination and the batch's options; where the journal is, and an AWS
    profile, it cannot."""
    words = ["archup", "resume", batch_id]
    if journal_path != default_journal_path(environ={}):
        words += ["--journal", str(journal_path)]
    if profile:
        words += ["--profile", profile]
    return shlex.join(words)


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

    _FOLLOW_THE_RUN = ("checksum", "full_object_checksum")

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

    @property
    def batch_prefix(self) -> str:
        """Everything of this batch lives under this key prefix."""
        return f"{self.prefix}{self.batch_id}/"


@dataclass(frozen=True)
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
    """A group of new files made ready for one INSERT (see :meth:`Journal.encode_files`)."""

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


_BATCH_COLUMNS = ("batch_id, state, source_root, bucket, prefix, endpoint_url, region, part_size, "
                  "scan_complete, manifest_key, error, created_at, updated_at, expires_at, finalized_at, settings, "
                  "files_archived")
_FILE_COLUMNS = ("batch_id, rel_path, key, size, mtime_ns, state, part_size, upload_id, sha256, etag, "
                 "error, attempts, updated_at, identity, checksum_kind")


_INSERT_FILE = ("INSERT INTO files (batch_id, rel_path, key, size, mtime_ns, state, error, identity, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (batch_id, rel_path) DO NOTHING")
# Rows of Journal.encode_files, in their order. "WHERE true" lets SQLite parse the
# ON CONFLICT clause after a SELECT.
_INSERT_FILES_JSON = (
    "INSERT INTO files (batch_id, rel_path, key, size, mtime_ns, state, error, identity, updated_at) "
    "SELECT ?1, json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), "
    "json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'), "
    "json_extract(value, '$[6]'), ?3 FROM json_each(?2) WHERE true ORDER BY key "
    "ON CONFLICT (batch_id, rel_path) DO NOTHING")


def _first(row: list[Any]) -> Any:
    return row[0]


def _batch_from_row(row: sqlite3.Row) -> BatchRecord:
    values = dict(row)
    values["state"] = BatchState(values["state"])
    values["scan_complete"] = bool(values["scan_complete"])
    values["settings"] = BatchSettings.from_json(values["settings"])
    return BatchRecord(**values)


def _file_from_row(row: sqlite3.Row) -> FileRecord:
    values = dict(row)
    values["state"] = FileState(values["state"])
    return FileRecord(**values)


def _translate(error: sqlite3.Error, path: Path) -> JournalError:
    text = str(error)
    if isinstance(error, sqlite3.OperationalError) and "locked" in text:
        return JournalBusy(f"journal {path} is locked by another writer ({text}); try again when it finishes")
    if "malformed" in text or "not a database" in text:
        return JournalError(f"journal {path} is damaged ({text}); move it aside (with its -wal and -shm files) "
                            "to start a new journal (the objects already in the bucket are not affected)")
    return JournalError(f"journal {path}: {text}")


class Journal:
    """A handle on one journal file; safe to share between threads and to pass to forked children."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                 synchronous: str = "FULL", read_only: bool = False) -> None:
        """``read_only``: opened for reading alone (a dry run): never created, migrated or
        written; a journal of another schema version is a JournalError."""
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.read_only = read_only
        self._local = threading.local()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        if read_only:
            version = int(self._connection().execute("PRAGMA user_version").fetchone()[0])
            if version != SCHEMA_VERSION:
                self.close()
                raise JournalError(f"journal {self.path} has schema {version}, not {SCHEMA_VERSION}; "
                                   "a run that writes it upgrades it")
            return
        self._prepare_file()
        self._migrate()

    # -- connections -------------------------------------------------------

    def _prepare_file(self) -> None:
        try:
            directory = self.path.parent
            if not directory.exists():
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(directory, 0o700)
            if not self.path.exists():
                # Create it private before SQLite does; its -wal and -shm files
                # inherit the database file's permissions.
                fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
        except OSError as error:
            raise JournalError(f"cannot create journal {self.path}: {error.strerror or error}") from None

    def _connection(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            # A forked child must never use its parent's connections.
            self._local = threading.local()
            self._connections = []
            self._lock = threading.Lock()
            self._write_lock = threading.Lock()
            self._pid = os.getpid()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                # isolation_level=None: no implicit transactions; atomic() opens them.
                target = f"{self.path.absolute().as_uri()}?mode=ro" if self.read_only else str(self.path)
                conn = sqlite3.connect(target, timeout=self.busy_timeout, isolation_level=None,
                                       check_same_thread=False, uri=self.read_only)
            except sqlite3.Error as error:
                raise _translate(error, self.path) from None
            try:
                conn.row_factory = sqlite3.Row
                # Refuse a newer journal before touching it: switching to WAL rewrites the header.
                self._refuse_newer(int(conn.execute("PRAGMA user_version").fetchone()[0]))
                if self.read_only:
                    self._local.conn = conn
                    with self._lock:
                        self._connections.append(conn)
                    return conn
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise JournalError(f"journal {self.path}: cannot switch to WAL mode (got {mode})")
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
                conn.execute("PRAGMA foreign_keys=ON")
            except (sqlite3.Error, JournalError) as error:
                conn.close()
                if isinstance(error, sqlite3.Error):
                    raise _translate(error, self.path) from None
                raise
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection this handle opened (call once worker threads are done)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def _begin(self, statement: str) -> sqlite3.Connection:
        conn = self._connection()
        try:
            conn.execute(statement)
        except sqlite3.Error as error:
            raise _translate(error, self.path) from None
        return conn

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: ``BEGIN IMMEDIATE``, commit, or roll back on any exception.

        IMMEDIATE takes the write lock before the first read, so a
        read-check-write sequence inside cannot interleave with another writer's.
        The original exception always propagates; a failing rollback never hides it.
        """
        # Threads of this process queue on a lock instead of in SQLite's busy handler,
        # whose sleep-and-retry is unfair and slow; other processes still meet SQLite's lock.
        with self._write_lock:
            conn = self._begin("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException as error:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the transaction may already be gone; the original error matters
                if isinstance(error, sqlite3.Error):
                    # Disk full, I/O error, constraint: a named error, the original kept as its cause.
                    raise _translate(error, self.path) from error
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as error:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise _translate(error, self.path) from None

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read-only view: several SELECTs that see one consistent state. Never write in it."""
        # Read-only, so a deferred transaction is right here: it takes no
        # write lock and cannot race (it never upgrades to a writer).
        conn = self._begin("BEGIN DEFERRED")
        try:
            yield conn
        except sqlite3.Error as error:
            raise _translate(error, self.path) from error
        finally:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # never hide the body's own error

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise JournalTooNew(f"journal {self.path} has schema version {version}, newer than this archup "
                                f"understands ({SCHEMA_VERSION}); upgrade archup")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """A read outside any transaction; a damaged file is a named error, not a traceback."""
        try:
            return self._connection().execute(sql, args).fetchall()
        except sqlite3.Error as error:
            raise _translate(error, self.path) from error

    def _migrate(self) -> None:
        try:
            with self.atomic() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                self._refuse_newer(version)
                for target in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[target].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                if version != SCHEMA_VERSION:
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            raise JournalError(f"journal {self.path} is not a usable SQLite database ({error}); "
                               "move it aside to start a new one") from None

    # -- batches -----------------------------------------------------------

    def init_batch(self, batch_id: str, *, source_root: str, bucket: str, prefix: str,
                   part_size: int, endpoint_url: str | None = None, region: str | None = None,
                   ttl: timedelta = BATCH_TTL, settings: BatchSettings | None = None) -> BatchRecord:
        now = utcnow()
        with self.atomic() as conn:
            conn.execute(
                "INSERT INTO batches (batch_id, state, source_root, bucket, prefix, endpoint_url, region, "
                "part_size, created_at, updated_at, expires_at, settings) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (batch_id, BatchState.OPEN.value, source_root, bucket, prefix, endpoint_url, region,
                 part_size, isoformat(now), isoformat(now), isoformat(now + ttl),
                 (settings or BatchSettings()).to_json()))
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str) -> BatchRecord:
        row = next(iter(self._query(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE batch_id = ?", (batch_id,))), None)
        if row is None:
            raise BatchNotFound(f"no batch {batch_id} in journal {self.path}; 'archup list' shows the batches")
        return _batch_from_row(row)

    def set_batch_settings(self, batch_id: str, settings: BatchSettings) -> None:
        """Record the settings of a batch begun before they were recorded, once, from the first
        run that knows them (the options its job passes); never changes recorded ones."""
        with self.atomic() as conn:
            self._batch_state(conn, batch_id)
            conn.execute("UPDATE batches SET settings = ? WHERE batch_id = ? AND settings IS NULL",
                         (settings.to_json(), batch_id))

    def find_batch(self, batch_id: str) -> BatchRecord | None:
        try:
            return self.get_batch(batch_id)
        except BatchNotFound:
            return None

    def list_batches(self, state: BatchState | None = None) -> list[BatchRecord]:
        sql = f"SELECT {_BATCH_COLUMNS} FROM batches"
        args: tuple[Any, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (state.value,)
        rows = self._query(sql + " ORDER BY batch_id", args)
        return [_batch_from_row(row) for row in rows]

    def _batch_state(self, conn: sqlite3.Connection, batch_id: str) -> BatchState:
        row = conn.execute("SELECT state FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is None:
            raise BatchNotFound(f"no batch {batch_id} in journal {self.path}")
        return BatchState(row[0])

    def set_batch_state(self, batch_id: str, target: BatchState, *, error: str | None = None,
                        manifest_key: str | None = None, finalized_at: str | None = None) -> BatchRecord:
        with self.atomic() as conn:
            current = self._batch_state(conn, batch_id)
            if not batch_can_move(current, target):
                raise IllegalTransition(f"batch {batch_id} is {current.value}; it cannot become {target.value}")
            conn.execute(
                "UPDATE batches SET state = ?, error = ?, updated_at = ?, "
                "manifest_key = COALESCE(?, manifest_key), finalized_at = COALESCE(?, finalized_at) "
                "WHERE batch_id = ?",
                (target.value, error, isoformat(utcnow()), manifest_key, finalized_at, batch_id))
        return self.get_batch(batch_id)

    def mark_scan_complete(self, batch_id: str, files_archived: int = 0) -> None:
        """The whole source is in the journal. ``files_archived``: how many files the complete
        walk found archived unchanged already (--skip-archived); set, not added, so a scan run
        again after a crash counts them once."""
        with self.atomic() as conn:
            self._batch_state(conn, batch_id)
            conn.execute("UPDATE batches SET scan_complete = 1, files_archived = ?, updated_at = ? "
                         "WHERE batch_id = ?", (files_archived, isoformat(utcnow()), batch_id))

    def delete_batch(self, batch_id: str) -> None:
        with self.atomic() as conn:
            self._batch_state(conn, batch_id)
            conn.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))

    # -- files -------------------------------------------------------------

    def add_file(self, batch_id: str, new_file: NewFile) -> None:
        """Add one file; an existing file of the same path is an error."""
        if self.add_files(batch_id, [new_file]) != 1:
            raise IllegalTransition(f"batch {batch_id} already has file {new_file.rel_path!r}")

    @staticmethod
    def encode_files(new_files: Iterable[NewFile]) -> EncodedFiles:
        """New files as one JSON array for :meth:`add_files`, in path order; needs no connection.

        The scan calls this in its walking thread, so the Python work of a group is done
        while the previous group is being inserted. Path order puts neighbouring rows
        on the same B-tree pages (the walk yields a directory in hash order).
        """
        rows = sorted(([f.rel_path, f.key, f.size, f.mtime_ns, f.state.value, f.error, f.identity]
                       for f in new_files), key=_first)
        return EncodedFiles(len(rows), json.dumps(rows, ensure_ascii=False))

    def add_files(self, batch_id: str, new_files: Iterable[NewFile] | EncodedFiles, *,
                  durable: bool = True) -> int:
        """Add files in one transaction; paths already in the batch are left as they are.

        Returns how many were new. ``durable=False`` (the scan) skips this commit's
        fsync: in WAL mode the next FULL commit (``mark_scan_complete``) syncs it
        along, and a scan that never reached that commit is simply run again.
        """
        encoded = new_files if isinstance(new_files, EncodedFiles) else self.encode_files(new_files)
        now = isoformat(utcnow())
        with self._synchronous("FULL" if durable else "NORMAL"), \
                self._pragma("wal_autocheckpoint", None if durable else SCAN_CHECKPOINT_PAGES), \
                self.atomic() as conn:
            state = self._batch_state(conn, batch_id)
            if not state.accepts_files:
                raise BatchClosed(f"batch {batch_id} is {state.value}; no file can be added to it")
            if not encoded.count:
                return 0
            before = conn.total_changes
            if "\\u0000" in encoded.rows_json:
                # SQLite's JSON functions end a string at NUL; bind such a group row by row.
                conn.executemany(_INSERT_FILE, [(batch_id, *row, now) for row in json.loads(encoded.rows_json)])
            else:
                # One statement for the whole group: sqlite3 releases the GIL for the
                # entire insert, so the scan's walking thread runs meanwhile.
                conn.execute(_INSERT_FILES_JSON, (batch_id, encoded.rows_json, now))
            return conn.total_changes - before

    def count_skipped(self, batch_id: str, reasons: Iterable[str]) -> int:
        """How many of the batch's skipped files were skipped for a reason starting with one of these."""
        prefixes = list(reasons)
        if not prefixes:
            return 0
        match = " OR ".join("substr(error, 1, ?) = ?" for _ in prefixes)
        args: list[Any] = [batch_id, FileState.SKIPPED.value]
        for prefix in prefixes:
            args += [len(prefix), prefix]
        rows = self._query(f"SELECT count(*) FROM files WHERE batch_id = ? AND state = ? AND ({match})", tuple(args))
        return int(rows[0][0])

    def archived_in(self, batch: BatchRecord, rel_path: str, size: int, mtime_ns: int) -> str | None:
        """The newest finalized batch of the same source and destination holding this file
        unchanged (same path, size and mtime), if any."""
        return self.archived_at((batch.source_root, batch.bucket, batch.prefix, batch.endpoint_url),
                                rel_path, size, mtime_ns)

    def archived_at(self, destination: tuple[str, str, str, str | None], rel_path: str, size: int,
                    mtime_ns: int) -> str | None:
        """As archived_in, for (source root, bucket, prefix, endpoint URL): a dry run has no batch."""
        row = next(iter(self._query(
            "SELECT b.batch_id FROM files f JOIN batches b ON b.batch_id = f.batch_id "
            "WHERE f.rel_path = ? AND f.size = ? AND f.mtime_ns = ? AND f.state = ? AND b.state = ? "
            "AND b.source_root = ? AND b.bucket = ? AND b.prefix = ? "
            "AND b.endpoint_url IS ? ORDER BY b.batch_id DESC LIMIT 1",
            (rel_path, size, mtime_ns, FileState.UPLOADED.value, BatchState.ENQUEUED.value,
             *destination))), None)
        return None if row is None else str(row[0])

    @contextmanager
    def _pragma(self, name: str, value: int | None) -> Iterator[None]:
        """A connection's integer setting changed for one block (None: left alone), then put back."""
        if value is None:
            yield
            return
        conn = self._connection()
        previous = int(conn.execute(f"PRAGMA {name}").fetchone()[0])
        conn.execute(f"PRAGMA {name}={int(value)}")
        try:
            yield
        finally:
            conn.execute(f"PRAGMA {name}={previous}")

    @contextmanager
    def _synchronous(self, level: str) -> Iterator[None]:
        if level == self.synchronous:
            yield
            return
        conn = self._connection()
        conn.execute(f"PRAGMA synchronous={level}")
        try:
            yield
        finally:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")

    def get_file(self, batch_id: str, rel_path: str) -> FileRecord:
        row = next(iter(self._query(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE batch_id = ? AND rel_path = ?",
            (batch_id, rel_path))), None)
        if row is None:
            raise FileNotInBatch(batch_id, rel_path)
        return _file_from_row(row)

    def _move_file(self, conn: sqlite3.Connection, batch_id: str, rel_path: str,
                   target: FileState) -> FileState:
        """Check a file transition inside an open write transaction; return the current state."""
        row = conn.execute("SELECT state FROM files WHERE batch_id = ? AND rel_path = ?",
                           (batch_id, rel_path)).fetchone()
        if row is None:
            self._batch_state(conn, batch_id)  # an unknown batch is the clearer error
            raise FileNotInBatch(batch_id, rel_path)
        current = FileState(row[0])
        if current is FileState.UPLOADED and target is FileState.UPLOADED:
            raise FileAlreadyUploaded(batch_id, rel_path)
        if not file_can_move(current, target):
            raise IllegalTransition(
                f"batch {batch_id}: file {rel_path!r} is {current.value}; it cannot become {target.value}")
        batch_state = self._batch_state(conn, batch_id)
        if batch_state.terminal:
            raise BatchClosed(f"batch {batch_id} is {batch_state.value}; its files can no longer change")
        return current

    def start_file(self, batch_id: str, rel_path: str) -> None:
        """pending/failed -> uploading; counts the attempt."""
        with self.atomic() as conn:
            self._move_file(conn, batch_id, rel_path, FileState.UPLOADING)
            conn.execute("UPDATE files SET state = ?, attempts = attempts + 1, error = NULL, updated_at = ? "
                         "WHERE batch_id = ? AND rel_path = ?",
                         (FileState.UPLOADING.value, isoformat(utcnow()), batch_id, rel_path))

    @staticmethod
    def _require_uploading(conn: sqlite3.Connection, batch_id: str, rel_path: str) -> None:
        row = conn.execute("SELECT state FROM files WHERE batch_id = ? AND rel_path = ?",
                           (batch_id, rel_path)).fetchone()
        if row is None:
            raise FileNotInBatch(batch_id, rel_path)
        if FileState(row[0]) is not FileState.UPLOADING:
            raise IllegalTransition(f"batch {batch_id}: file {rel_path!r} is {row[0]}, not uploading")

    def record_upload_id(self, batch_id: str, rel_path: str, upload_id: str, part_size: int,
                         sha256: str | None = None, checksum_kind: str | None = None) -> None:
        """Record a multipart upload the moment it exists, so a crash leaves something to finish or abort.

        ``sha256`` is the whole-file digest the upload was created with (its object metadata):
        while the file is uploading it is what the upload pass must read again, not yet proof.
        ``checksum_kind`` is how its parts are checksummed, which a resumer must keep."""
        with self.atomic() as conn:
            self._require_uploading(conn, batch_id, rel_path)
            conn.execute("UPDATE files SET upload_id = ?, part_size = ?, sha256 = ?, checksum_kind = ?, "
                         "updated_at = ? WHERE batch_id = ? AND rel_path = ?",
                         (upload_id, part_size, sha256, checksum_kind, isoformat(utcnow()), batch_id, rel_path))

    def record_part(self, batch_id: str, rel_path: str, part: PartRecord) -> None:
        with self.atomic() as conn:
            self._require_uploading(conn, batch_id, rel_path)
            conn.execute(
                "INSERT INTO parts (batch_id, rel_path, part_number, size, etag, checksum) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT (batch_id, rel_path, part_number) DO UPDATE SET "
                "size = excluded.size, etag = excluded.etag, checksum = excluded.checksum",
                (batch_id, rel_path, part.part_number, part.size, part.etag, part.checksum))

    def upload_ids(self, batch_id: str) -> set[str]:
        """The multipart upload ids the journal records for a batch (files still uploading)."""
        rows = self._query(
            "SELECT upload_id FROM files WHERE batch_id = ? AND upload_id IS NOT NULL", (batch_id,))
        return {row[0] for row in rows}

    def list_parts(self, batch_id: str, rel_path: str) -> list[PartRecord]:
        rows = self._query(
            "SELECT part_number, size, etag, checksum FROM parts WHERE batch_id = ? AND rel_path = ? "
            "ORDER BY part_number", (batch_id, rel_path))
        return [PartRecord(**dict(row)) for row in rows]

    def complete_file(self, batch_id: str, rel_path: str, *, sha256: str, etag: str) -> None:
        """-> uploaded. Call only after the store confirmed the object; raises if already uploaded."""
        with self.atomic() as conn:
            self._move_file(conn, batch_id, rel_path, FileState.UPLOADED)
            conn.execute("UPDATE files SET state = ?, sha256 = ?, etag = ?, error = NULL, updated_at = ? "
                         "WHERE batch_id = ? AND rel_path = ?",
                         (FileState.UPLOADED.value, sha256, etag, isoformat(utcnow()), batch_id, rel_path))

    def complete_files(self, batch_id: str,
                       completions: list[tuple[str, str, str]]) -> list[tuple[str, IllegalTransition]]:
        """Many (rel_path, sha256, etag) -> uploaded in one transaction (one fsync for the group).

        Each file's transition is checked as in complete_file; the illegal ones are left
        unchanged and returned with their error, the others committed.
        """
        refused: list[tuple[str, IllegalTransition]] = []
        now = isoformat(utcnow())
        with self.atomic() as conn:
            for rel_path, sha256, etag in completions:
                try:
                    self._move_file(conn, batch_id, rel_path, FileState.UPLOADED)
                except IllegalTransition as error:
                    refused.append((rel_path, error))
                    continue
                conn.execute("UPDATE files SET state = ?, sha256 = ?, etag = ?, error = NULL, updated_at = ? "
                             "WHERE batch_id = ? AND rel_path = ?",
                             (FileState.UPLOADED.value, sha256, etag, now, batch_id, rel_path))
        return refused

    def fail_file(self, batch_id: str, rel_path: str, error: str) -> None:
        with self.atomic() as conn:
            self._move_file(conn, batch_id, rel_path, FileState.FAILED)
            conn.execute("UPDATE files SET state = ?, error = ?, upload_id = NULL, checksum_kind = NULL, "
                         "sha256 = NULL, updated_at = ? WHERE batch_id = ? AND rel_path = ?",
                         (FileState.FAILED.value, error, isoformat(utcnow()), batch_id, rel_path))
            conn.execute("DELETE FROM parts WHERE batch_id = ? AND rel_path = ?", (batch_id, rel_path))

    def reset_file(self, batch_id: str, rel_path: str, reason: str) -> None:
        """-> pending, forgetting any upload; for an object found missing or an upload the server lost."""
        with self.atomic() as conn:
            self._move_file(conn, batch_id, rel_path, FileState.PENDING)
            conn.execute("UPDATE files SET state = ?, error = ?, upload_id = NULL, checksum_kind = NULL, "
                         "sha256 = NULL, etag = NULL, updated_at = ? WHERE batch_id = ? AND rel_path = ?",
                         (FileState.PENDING.value, reason, isoformat(utcnow()), batch_id, rel_path))
            conn.execute("DELETE FROM parts WHERE batch_id = ? AND rel_path = ?", (batch_id, rel_path))

    def refresh_file(self, batch_id: str, rel_path: str, size: int, mtime_ns: int,
                     identity: str | None = None) -> FileRecord:
        """A pending or failed file changed on disk: the batch takes it as it is now."""
        with self.atomic() as conn:
            row = conn.execute("SELECT state, upload_id FROM files WHERE batch_id = ? AND rel_path = ?",
                               (batch_id, rel_path)).fetchone()
            if row is None:
                raise FileNotInBatch(batch_id, rel_path)
            if FileState(row[0]) not in (FileState.PENDING, FileState.FAILED) or row[1] is not None:
                raise IllegalTransition(f"batch {batch_id}: file {rel_path!r} is {row[0]}; "
                                        "only a pending or failed file can be re-scanned")
            conn.execute("UPDATE files SET size = ?, mtime_ns = ?, identity = ?, part_size = NULL, updated_at = ? "
                         "WHERE batch_id = ? AND rel_path = ?",
                         (size, mtime_ns, identity, isoformat(utcnow()), batch_id, rel_path))
        return self.get_file(batch_id, rel_path)

    def iter_files(self, batch_id: str, states: Iterable[FileState] | None = None,
                   page_size: int = 2000) -> Iterator[FileRecord]:
        """Files of a batch in key order, streamed page by page (no long read transaction)."""
        wanted = tuple(state.value for state in states) if states is not None else None
        if wanted == ():
            return
        filter_sql = f" AND state IN ({','.join('?' * len(wanted))})" if wanted else ""
        last_key = ""
        while True:
            rows = self._query(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE batch_id = ? AND key > ?{filter_sql} "
                "ORDER BY key LIMIT ?", (batch_id, last_key, *(wanted or ()), page_size))
            if not rows:
                return
            for row in rows:
                yield _file_from_row(row)
            last_key = rows[-1]["key"]

    def get_state(self, batch_id: str, problem_limit: int = 20) -> BatchSummary:
        """The batch, its counts, and its first ``problem_limit`` failed and first ``problem_limit``
        skipped files in key order (-1: all of them), read in one snapshot."""
        with self.snapshot() as conn:
            row = conn.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE batch_id = ?",
                               (batch_id,)).fetchone()
            if row is None:
                raise BatchNotFound(f"no batch {batch_id} in journal {self.path}; "
                                    "'archup list' shows the batches")
            counts = {state: 0 for state in FileState}
            sizes = {state: 0 for state in FileState}
            for state, count, total in conn.execute(
                    "SELECT state, count(*), coalesce(sum(size), 0) FROM files WHERE batch_id = ? "
                    "GROUP BY state", (batch_id,)):
                counts[FileState(state)] = count
                sizes[FileState(state)] = total
            # Each kind apart, so many skipped files cannot hide a failed one; each read the
            # cheaper way for how common that kind is in the batch.
            listed: dict[FileState, list[FileRecord]] = {}
            for state in (FileState.FAILED, FileState.SKIPPED):
                plan = self._problem_plan(counts[state], sum(counts.values()), problem_limit)
                listed[state] = [] if not counts[state] or not problem_limit else [
                    _file_from_row(r) for r in conn.execute(
                        f"SELECT {_FILE_COLUMNS} FROM files {plan}WHERE batch_id = ? AND state = ? "
                        "ORDER BY key LIMIT ?", (batch_id, state.value, problem_limit))]
        return BatchSummary(_batch_from_row(row), counts, sizes, listed[FileState.FAILED],
                            listed[FileState.SKIPPED], problem_limit)

    @staticmethod
    def _problem_plan(problem_count: int, files_total: int, limit: int) -> str:
        """How to find the first failed or skipped files in key order, given how many there are.

        Walking the batch in key order stops after about ``limit * files_total / problem_count``
        rows: quick when problems are common, a scan of the whole batch when they are rare
        (1.4 s for 1,000,000 files). Reading just the problem rows through the state index
        and sorting them costs ``problem_count``. Take whichever is smaller; the answer is the same.
        """
        if limit >= 0 and problem_count * problem_count > limit * files_total:
            return ""
        return "INDEXED BY files_by_state "

    def integrity_check(self) -> str:
        return str(self._query("PRAGMA integrity_check")[0][0])
