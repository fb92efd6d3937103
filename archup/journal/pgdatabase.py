"""The PostgreSQL journal's connection machinery, apart from what it stores.

Several hosts share one PostgreSQL database as the batch authority. Every state change
is one transaction at READ COMMITTED, made safe by locking the rows it reads before it
writes (``SELECT ... FOR UPDATE`` / ``FOR SHARE``): the read of the current state and
the write of the new one cannot interleave with another writer's, on any host
(docs/design.md, "The shared journal"). Connections come from a pool, one at a time per
transaction; a forked child builds its own pool.

A transaction whose connection broke (the server restarted, the network dropped) before
its COMMIT was sent is rolled back by the server, so :meth:`PgDatabase.write` runs it again
on a fresh connection until ``retry_for`` seconds have passed. One whose COMMIT was sent
and not answered has an unknown outcome: that is an error, never a silent retry.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import JournalAuthenticationFailed, JournalError, JournalTooNew, JournalUnavailable
from ..logs import register_secrets

log = logging.getLogger("archup.journal")

T = TypeVar("T")

PG_SCHEMA_VERSION = 3
SCHEMA = "archup"

# Each entry upgrades the schema from version i to i + 1; never edit a shipped one.
# Text columns that are sorted or compared with S3's key order use the "C" collation
# (byte order, as S3 lists and as SQLite compares), whatever the database's locale.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE batches (
        batch_id      text COLLATE "C" PRIMARY KEY,
        state         text NOT NULL,
        source_root   text NOT NULL,
        bucket        text NOT NULL,
        prefix        text NOT NULL,
        endpoint_url  text,
        region        text,
        part_size     bigint NOT NULL,
        scan_complete boolean NOT NULL DEFAULT false,
        manifest_key  text,
        error         text,
        created_at    text NOT NULL,
        updated_at    text NOT NULL,
        expires_at    text NOT NULL,
        finalized_at  text,
        settings      text,
        files_archived bigint NOT NULL DEFAULT 0,
        forgotten_at  text,
        file_counts   text,
        -- the election of the one host that scans, and of the one that finalizes: the
        -- holder and its lease, in the database's clock (never a host's)
        scanner       text,
        scan_lease_until timestamptz,
        finalizer     text,
        finalize_lease_until timestamptz,
        next_chunk    integer NOT NULL DEFAULT 0
    );
    CREATE TABLE files (
        batch_id   text COLLATE "C" NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
        rel_path   text COLLATE "C" NOT NULL,
        key        text COLLATE "C" NOT NULL,
        size       bigint NOT NULL,
        mtime_ns   bigint NOT NULL,
        state      text NOT NULL,
        part_size  bigint,
        upload_id  text,
        sha256     text,
        etag       text,
        error      text,
        attempts   integer NOT NULL DEFAULT 0,
        updated_at text NOT NULL,
        identity   text,
        checksum_kind text,
        chunk_no   integer NOT NULL DEFAULT 0,
        PRIMARY KEY (batch_id, rel_path),
        UNIQUE (batch_id, key)
    );
    CREATE INDEX files_by_state ON files (batch_id, state, key);
    CREATE INDEX files_by_chunk ON files (batch_id, chunk_no, key);
    CREATE TABLE parts (
        batch_id    text COLLATE "C" NOT NULL,
        rel_path    text COLLATE "C" NOT NULL,
        part_number integer NOT NULL,
        size        bigint NOT NULL,
        etag        text NOT NULL,
        checksum    text,
        PRIMARY KEY (batch_id, rel_path, part_number),
        FOREIGN KEY (batch_id, rel_path) REFERENCES files(batch_id, rel_path) ON DELETE CASCADE
    );
    -- A chunk: a run of files in scan order that one host claims, with a lease, and
    -- whose progress only that host may record (the fence).
    CREATE TABLE chunks (
        batch_id    text COLLATE "C" NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
        chunk_no    integer NOT NULL,
        files       integer NOT NULL,
        owner       text,
        lease_until timestamptz,
        done        boolean NOT NULL DEFAULT false,
        claims      integer NOT NULL DEFAULT 0,
        PRIMARY KEY (batch_id, chunk_no)
    );
    CREATE INDEX chunks_open ON chunks (batch_id, chunk_no) WHERE NOT done;
    CREATE TABLE workers (
        worker_id    text PRIMARY KEY,
        batch_id     text COLLATE "C" NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
        host         text NOT NULL,
        pid          integer NOT NULL,
        started_at   timestamptz NOT NULL,
        heartbeat_at timestamptz NOT NULL,
        lease_until  timestamptz NOT NULL,
        files_done   bigint NOT NULL DEFAULT 0,
        bytes_done   bigint NOT NULL DEFAULT 0,
        ended_at     timestamptz
    );
    CREATE INDEX workers_by_batch ON workers (batch_id);
    CREATE TABLE archive_sources (
        source_id    bigserial PRIMARY KEY,
        source_root  text NOT NULL,
        bucket       text NOT NULL,
        prefix       text NOT NULL,
        endpoint_url text NOT NULL,
        UNIQUE (source_root, bucket, prefix, endpoint_url)
    );
    CREATE TABLE archived (
        source_id bigint NOT NULL REFERENCES archive_sources(source_id),
        rel_path  text COLLATE "C" NOT NULL,
        size      bigint NOT NULL,
        mtime_ns  bigint NOT NULL,
        identity  text,
        batch_id  text COLLATE "C" NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
        seen_by   text COLLATE "C",
        PRIMARY KEY (source_id, rel_path)
    );
    """,
    # 2: the SHA-256 of a batch's sealed manifest.json, written with the seal (see SQLite's 6).
    """
    ALTER TABLE batches ADD COLUMN summary_sha256 text;
    """,
    # 3: packed shards (see SQLite's 7).
    """
    ALTER TABLE files ADD COLUMN shard_no integer;
    ALTER TABLE files ADD COLUMN shard_offset bigint;
    CREATE INDEX files_by_shard ON files (batch_id, shard_no, shard_offset) WHERE shard_no IS NOT NULL;
    CREATE TABLE shards (
        batch_id      text COLLATE "C" NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
        shard_no      integer NOT NULL,
        key           text COLLATE "C" NOT NULL,
        size          bigint NOT NULL,
        members       integer NOT NULL,
        state         text NOT NULL,
        upload_id     text,
        part_size     bigint,
        checksum_kind text,
        sha256        text,
        etag          text,
        error         text,
        updated_at    text NOT NULL,
        PRIMARY KEY (batch_id, shard_no)
    );
    CREATE TABLE shard_parts (
        batch_id    text COLLATE "C" NOT NULL,
        shard_no    integer NOT NULL,
        part_number integer NOT NULL,
        size        bigint NOT NULL,
        etag        text NOT NULL,
        checksum    text,
        PRIMARY KEY (batch_id, shard_no, part_number),
        FOREIGN KEY (batch_id, shard_no) REFERENCES shards(batch_id, shard_no) ON DELETE CASCADE
    );
    """,
)


def redact(url: str) -> str:
    """The journal's URL as archup prints and logs it: no password, in the userinfo or
    the query (``password=``); libpq finds it again in PGPASSWORD or ~/.pgpass."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    query = "&".join(item for item in parts.query.split("&")
                     if item and not item.lower().startswith("password="))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def password_of(url: str) -> str | None:
    """The password a URL carries (for scrubbing it from any message), if any."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return urllib.parse.unquote(parts.password)
    for item in parts.query.split("&"):
        if item.lower().startswith("password="):
            return urllib.parse.unquote(item.split("=", 1)[1])
    return None


# libpq's words for a login the server refused (its connection errors carry no SQLSTATE):
# waiting will not change them, so they are not retried.
_AUTHENTICATION_FAILED = re.compile(r"authentication failed|no password supplied|password is required|"
                                    r"no pg_hba\.conf entry", re.IGNORECASE)


class PgDatabase:
    """A pool of connections to one PostgreSQL journal; transactions, retries, migrations."""

    def __init__(self, url: str, *, max_connections: int = 24, retry_for: float = 60.0,
                 idle_in_transaction: float = 10.0, connect_timeout: int = 10,
                 tcp_user_timeout: float = 15.0) -> None:
        self.url = url
        self.location = redact(url)
        self._password = password_of(url)
        # Every log line is scrubbed of it, psycopg_pool's own warnings included.
        register_secrets(self._password)
        self.retry_for = retry_for
        self.max_connections = max_connections
        # Settings of every connection, unless the URL (or libpq's environment) says otherwise:
        # a cut-off host must learn it quickly (keepalives, tcp_user_timeout), and a
        # transaction left open by a host that vanished must not hold its row locks for ever.
        given = psycopg.conninfo.conninfo_to_dict(url)
        defaults: dict[str, Any] = {
            "application_name": "archup", "connect_timeout": connect_timeout, "keepalives": 1,
            "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
            "tcp_user_timeout": int(tcp_user_timeout * 1000),
        }
        self._kwargs = {name: value for name, value in defaults.items() if name not in given}
        options = f"-c idle_in_transaction_session_timeout={int(idle_in_transaction * 1000)}"
        self._kwargs["options"] = f"{given.get('options', '')} {options}".strip()
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._pid = os.getpid()
        self._check_login()
        self._migrate()

    # -- errors --------------------------------------------------------------

    def scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def translate(self, error: BaseException) -> JournalError:
        text = self.scrub(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        if isinstance(error, (psycopg.OperationalError, PoolTimeout)):
            return JournalUnavailable(f"journal {self.location} is unreachable ({text}); archup retried for "
                                      f"{self.retry_for:.0f} s; run the same command again when the database is back")
        return JournalError(f"journal {self.location}: {text}")

    # -- connections ---------------------------------------------------------

    def _check_login(self) -> None:
        """One connection before the pool's: a refused login is said at once (exit 5), not
        retried for ``retry_for`` seconds and then called unreachable. Any other failure is
        left to the pool's retries."""
        try:
            psycopg.connect(self.url, **self._kwargs).close()
        except psycopg.OperationalError as error:
            text = self.scrub(str(error).strip())
            if _AUTHENTICATION_FAILED.search(text):
                reason = text.split("FATAL:", 1)[-1].strip().splitlines()[0]
                raise JournalAuthenticationFailed(
                    f"journal {self.location}: authentication failed ({reason}); check the user and its "
                    "password (PGPASSWORD, ~/.pgpass or PGSERVICE)") from None

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"SET search_path TO {SCHEMA}")

    def pool(self) -> ConnectionPool:
        with self._lock:
            if os.getpid() != self._pid:
                # A forked child must never touch its parent's connections (their sockets are
                # shared): drop them unclosed and build its own pool.
                self._pool = None
                self._pid = os.getpid()
            if self._pool is None:
                pool = ConnectionPool(self.url, min_size=1, max_size=self.max_connections, open=False,
                                      kwargs={**self._kwargs, "autocommit": True, "row_factory": dict_row},
                                      configure=self._configure, timeout=self.retry_for, name="archup-journal")
                pool.open(wait=False)
                self._pool = pool
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.close()

    @staticmethod
    def _retryable(error: BaseException, conn: psycopg.Connection[Any] | None) -> bool:
        if isinstance(error, PoolTimeout):
            return True
        if isinstance(error, (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected,
                              psycopg.errors.AdminShutdown, psycopg.errors.CannotConnectNow,
                              psycopg.errors.CrashShutdown)):
            return True
        if isinstance(error, psycopg.OperationalError):
            return conn is None or conn.broken or conn.closed
        return False

    def run(self, body: Callable[[psycopg.Connection[Any]], T], *, write: bool) -> T:
        """Run ``body`` in one transaction (``write``) or on one autocommit connection, again on
        a fresh connection while the failure is one that rolled it back; the original error
        otherwise, as a named JournalError (archup's own errors pass through unchanged)."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            conn: psycopg.Connection[Any] | None = None
            committing = False
            try:
                with self.pool().connection() as conn:
                    if not write:
                        return body(conn)
                    with conn.transaction():
                        result = body(conn)
                        committing = True
                    return result
            except psycopg.Error as error:
                if committing and isinstance(error, psycopg.OperationalError):
                    raise JournalUnavailable(
                        f"journal {self.location}: the connection broke while committing ({self.scrub(str(error))}); "
                        "the change may or may not be recorded; run the same command again") from None
                if not self._retryable(error, conn) or time.monotonic() + delay > deadline:
                    raise self.translate(error) from None
                log.warning("journal %s: %s; retrying", self.location, self.scrub(str(error).strip()))
            time.sleep(delay)  # backing off before reconnecting to a database that is away
            delay = min(delay * 2, 2.0)

    def write(self, body: Callable[[psycopg.Connection[Any]], T]) -> T:
        return self.run(body, write=True)

    def query(self, sql: str, args: Any = ()) -> list[dict[str, Any]]:
        return self.run(lambda conn: conn.execute(sql, args).fetchall(), write=False)

    @contextmanager
    def snapshot(self) -> Iterator[psycopg.Connection[Any]]:
        """Several SELECTs that see one consistent state (REPEATABLE READ, read only)."""
        try:
            with self.pool().connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield conn
        except psycopg.Error as error:
            raise self.translate(error) from error

    # -- schema ----------------------------------------------------------------

    def _migrate(self) -> None:
        def body(conn: psycopg.Connection[Any]) -> None:
            # Hosts starting together: one migrates, the others wait here, then find it done.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('archup-journal-schema'))")
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version integer NOT NULL)")
            row = conn.execute(f"SELECT version FROM {SCHEMA}.schema_version").fetchone()
            version = 0 if row is None else int(row["version"])
            if version > PG_SCHEMA_VERSION:
                raise JournalTooNew(f"journal {self.location} has schema version {version}, newer than this "
                                    f"archup understands ({PG_SCHEMA_VERSION}); upgrade archup")
            conn.execute(f"SET LOCAL search_path TO {SCHEMA}")
            for target in range(version, PG_SCHEMA_VERSION):
                conn.execute(_MIGRATIONS[target])
            if row is None:
                conn.execute(f"INSERT INTO {SCHEMA}.schema_version VALUES (%s)", (PG_SCHEMA_VERSION,))
            elif version != PG_SCHEMA_VERSION:
                conn.execute(f"UPDATE {SCHEMA}.schema_version SET version = %s", (PG_SCHEMA_VERSION,))

        try:
            self.write(body)
        except BaseException:
            self.close()
            raise

    def size_on_disk(self) -> int:
        rows = self.query("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) AS total FROM pg_class c "
                          "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                          (SCHEMA,))
        return int(rows[0]["total"])

    def compact(self) -> None:
        """VACUUM the journal's tables (outside a transaction, as VACUUM must be)."""
        def body(conn: psycopg.Connection[Any]) -> None:
            for table in ("parts", "files", "chunks", "workers", "batches", "archived"):
                conn.execute(f"VACUUM {SCHEMA}.{table}")
        self.run(body, write=False)
