"""The SQLite journal's connection machinery, apart from what it stores.

WAL mode with ``synchronous=FULL``. Every state change is one ``BEGIN IMMEDIATE``
transaction through :meth:`SQLiteDatabase.atomic`, so concurrent workers (threads
or processes) never lose an update: the read of the current state and the write
of the new one happen under the same write lock. Each thread gets its own
connection; none is shared, and a forked child opens its own.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..errors import JournalBusy, JournalError, JournalTooNew

T = TypeVar("T")

SCHEMA_VERSION = 7
DEFAULT_BUSY_TIMEOUT = 30.0

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
    # 5: the journal stays bounded by the tree, not by the number of runs. The archived
    # index holds the latest archived version of each path per source and destination
    # (--skip-archived reads it, finalize writes it), so a terminal batch's file and part
    # rows can be forgotten; its batch row keeps the per-state counts (file_counts, JSON).
    # seen_by: the newest batch whose complete walk found the path archived unchanged.
    # Filled from the finalized batches already in the journal.
    """
    ALTER TABLE batches ADD COLUMN forgotten_at TEXT;
    ALTER TABLE batches ADD COLUMN file_counts TEXT;
    CREATE TABLE archive_sources (
        source_id    INTEGER PRIMARY KEY,
        source_root  TEXT NOT NULL,
        bucket       TEXT NOT NULL,
        prefix       TEXT NOT NULL,
        endpoint_url TEXT NOT NULL,
        UNIQUE (source_root, bucket, prefix, endpoint_url)
    );
    CREATE TABLE archived (
        source_id INTEGER NOT NULL REFERENCES archive_sources(source_id),
        rel_path  TEXT NOT NULL,
        size      INTEGER NOT NULL,
        mtime_ns  INTEGER NOT NULL,
        identity  TEXT,
        batch_id  TEXT NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
        seen_by   TEXT,
        PRIMARY KEY (source_id, rel_path)
    ) WITHOUT ROWID;
    INSERT INTO archive_sources (source_root, bucket, prefix, endpoint_url)
        SELECT DISTINCT source_root, bucket, prefix, coalesce(endpoint_url, '') FROM batches
        WHERE state = 'enqueued';
    INSERT INTO archived (source_id, rel_path, size, mtime_ns, identity, batch_id, seen_by)
        SELECT s.source_id, f.rel_path, f.size, f.mtime_ns, f.identity, f.batch_id, f.batch_id
        FROM files f JOIN batches b ON b.batch_id = f.batch_id
        JOIN archive_sources s ON s.source_root = b.source_root AND s.bucket = b.bucket
            AND s.prefix = b.prefix AND s.endpoint_url = coalesce(b.endpoint_url, '')
        WHERE b.state = 'enqueued' AND f.state = 'uploaded' AND true
        ON CONFLICT (source_id, rel_path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,
            identity = excluded.identity, batch_id = excluded.batch_id, seen_by = excluded.seen_by
        WHERE excluded.batch_id > archived.batch_id;
    DROP INDEX files_by_path;
    """,
    # 6: the SHA-256 of a batch's sealed manifest.json, written with the seal: verify and
    # restore check the summary in the bucket against it (a batch sealed before stays NULL).
    """
    ALTER TABLE batches ADD COLUMN summary_sha256 TEXT;
    """,
    # 7: packed shards (--pack-under): a tar of small files is one object; its members'
    # rows say which shard holds them and where their data starts.
    """
    ALTER TABLE files ADD COLUMN shard_no INTEGER;
    ALTER TABLE files ADD COLUMN shard_offset INTEGER;
    CREATE INDEX files_by_shard ON files (batch_id, shard_no, shard_offset) WHERE shard_no IS NOT NULL;
    CREATE TABLE shards (
        batch_id      TEXT NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
        shard_no      INTEGER NOT NULL,
        key           TEXT NOT NULL,
        size          INTEGER NOT NULL,
        members       INTEGER NOT NULL,
        state         TEXT NOT NULL,
        upload_id     TEXT,
        part_size     INTEGER,
        checksum_kind TEXT,
        sha256        TEXT,
        etag          TEXT,
        error         TEXT,
        updated_at    TEXT NOT NULL,
        PRIMARY KEY (batch_id, shard_no)
    ) WITHOUT ROWID;
    CREATE TABLE shard_parts (
        batch_id    TEXT NOT NULL,
        shard_no    INTEGER NOT NULL,
        part_number INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        etag        TEXT NOT NULL,
        checksum    TEXT,
        PRIMARY KEY (batch_id, shard_no, part_number),
        FOREIGN KEY (batch_id, shard_no) REFERENCES shards(batch_id, shard_no) ON DELETE CASCADE
    ) WITHOUT ROWID;
    """,
)

def translate(error: sqlite3.Error, path: Path) -> JournalError:
    """An SQLite error as the named error archup reports: busy, damaged, or what it says."""
    text = str(error)
    if isinstance(error, sqlite3.OperationalError) and "locked" in text:
        return JournalBusy(f"journal {path} is locked by another writer ({text}); try again when it finishes")
    if "malformed" in text or "not a database" in text:
        return JournalError(f"journal {path} is damaged ({text}); move it aside (with its -wal and -shm files) "
                            "to start a new journal (the objects already in the bucket are not affected)")
    return JournalError(f"journal {path}: {text}")


class SQLiteDatabase:
    """Connections to one journal file: one per thread, opened with the journal's pragmas,
    reopened in a forked child; transactions; schema migrations."""

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
            version = int(self.connection().execute("PRAGMA user_version").fetchone()[0])
            if version != SCHEMA_VERSION:
                self.close()
                raise JournalError(f"journal {self.path} has schema {version}, not {SCHEMA_VERSION}; "
                                   "a run that writes it upgrades it")
            return
        self._prepare_file()
        self._migrate()

    def _prepare_file(self) -> None:
        try:
            directory = self.path.parent
            if not directory.exists():
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(directory, 0o700)
            if not self.path.exists():
                # Create it private before SQLite does; its -wal and -shm files
                # inherit the database file's permissions.
                # O_EXCL | O_NOFOLLOW: a (dangling) symlink planted at the path is refused, never
                # followed to create its target.
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY, 0o600)
                except FileExistsError:
                    # Another process creating it at the same moment made it first: as good. A
                    # symlink is not.
                    if self.path.is_symlink():
                        raise
                else:
                    os.close(fd)
        except OSError as error:
            raise JournalError(f"cannot create journal {self.path}: {error.strerror or error}") from None

    def connection(self) -> sqlite3.Connection:
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
                raise translate(error, self.path) from None
            try:
                conn.row_factory = sqlite3.Row
                # Refuse a newer journal before touching it: switching to WAL rewrites the header.
                self._refuse_newer(int(conn.execute("PRAGMA user_version").fetchone()[0]))
                if self.read_only:
                    self._local.conn = conn
                    with self._lock:
                        self._connections.append(conn)
                    return conn
                if not int(conn.execute("PRAGMA page_count").fetchone()[0]):
                    # A new file: pages freed by forgetting batches can be given back
                    # (compact()); only settable before the first table (or by a VACUUM).
                    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise JournalError(f"journal {self.path}: cannot switch to WAL mode (got {mode})")
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
                conn.execute("PRAGMA foreign_keys=ON")
            except (sqlite3.Error, JournalError) as error:
                conn.close()
                if isinstance(error, sqlite3.Error):
                    raise translate(error, self.path) from None
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
        conn = self.connection()
        try:
            conn.execute(statement)
        except sqlite3.Error as error:
            raise translate(error, self.path) from None
        return conn

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: ``BEGIN IMMEDIATE``, commit, or roll back on any exception.

        IMMEDIATE takes the write lock before the first read, so a
        read-check-write sequence inside cannot interleave with another writer's.
        The original exception always propagates; a failing rollback never hides it.
        """
        if getattr(self._local, "writing", False):
            # The write lock below is this thread's already: waiting for it would never end.
            raise JournalError(f"journal {self.path}: atomic() called inside atomic() in one thread; "
                               "a write transaction cannot nest (do the inner work in the outer one)")
        # Threads of this process queue on a lock instead of in SQLite's busy handler,
        # whose sleep-and-retry is unfair and slow; other processes still meet SQLite's lock.
        with self._write_lock:
            conn = self._begin("BEGIN IMMEDIATE")
            self._local.writing = True
            try:
                yield conn
            except BaseException as error:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the transaction may already be gone; the original error matters
                if isinstance(error, sqlite3.Error):
                    # Disk full, I/O error, constraint: a named error, the original kept as its cause.
                    raise translate(error, self.path) from error
                raise
            finally:
                self._local.writing = False
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as error:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise translate(error, self.path) from None

    def write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one write transaction (:meth:`atomic`) and return what it returns: the
        shape of :meth:`archup.journal.pgdatabase.PgDatabase.write`, so a journal operation reads
        the same on either backend."""
        with self.atomic() as conn:
            return body(conn)

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read-only view: several SELECTs that see one consistent state. Never write in it."""
        # Read-only, so a deferred transaction is right here: it takes no
        # write lock and cannot race (it never upgrades to a writer).
        conn = self._begin("BEGIN DEFERRED")
        try:
            yield conn
        except sqlite3.Error as error:
            raise translate(error, self.path) from error
        finally:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # never hide the body's own error

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise JournalTooNew(f"journal {self.path} has schema version {version}, newer than this archup "
                                f"understands ({SCHEMA_VERSION}); upgrade archup")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """A read outside any transaction; a damaged file is a named error, not a traceback."""
        try:
            return self.connection().execute(sql, args).fetchall()
        except sqlite3.Error as error:
            raise translate(error, self.path) from error

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

    @contextmanager
    def pragma(self, name: str, value: int | None) -> Iterator[None]:
        """A connection's integer setting changed for one block (None: left alone), then put back."""
        if value is None:
            yield
            return
        conn = self.connection()
        previous = int(conn.execute(f"PRAGMA {name}").fetchone()[0])
        conn.execute(f"PRAGMA {name}={int(value)}")
        try:
            yield
        finally:
            conn.execute(f"PRAGMA {name}={previous}")

    @contextmanager
    def synchronous_for(self, level: str) -> Iterator[None]:
        if level == self.synchronous:
            yield
            return
        conn = self.connection()
        conn.execute(f"PRAGMA synchronous={level}")
        try:
            yield
        finally:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")

    def size_on_disk(self) -> int:
        """The bytes of the database file and its write-ahead log."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def compact(self) -> None:
        """Give the free pages back to the filesystem, under the write lock.

        A journal created with incremental auto-vacuum frees them all at once; an older one
        is rebuilt by VACUUM (and made incremental from then on) only when more than half
        of its pages are free, since a VACUUM rewrites the whole file. The log is then
        checkpointed and truncated.
        """
        conn = self.connection()
        with self._write_lock:
            try:
                incremental = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
                free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
                pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
                if incremental and free:
                    # executescript steps the pragma to its end (execute() would free one page).
                    conn.executescript("BEGIN IMMEDIATE; PRAGMA incremental_vacuum; COMMIT;")
                elif not incremental and free * 2 > pages:
                    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                    conn.execute("VACUUM")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as error:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise translate(error, self.path) from error

    def integrity_check(self) -> str:
        return str(self.query("PRAGMA integrity_check")[0][0])
