"""The journal on SQLite: the batch, file and part operations (the connections and the
schema are :mod:`archup.journal.database`'s)."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from ..clock import isoformat, utcnow
from ..errors import FileNotInBatch, IllegalTransition
from ..lock import BatchLock, source_lock
from ..states import UNFINISHED, BatchState, FileState, ShardState
from .database import DEFAULT_BUSY_TIMEOUT, SQLiteDatabase
from .records import (
    BATCH_TTL,
    ArchivedFile,
    BatchRecord,
    BatchSettings,
    BatchSummary,
    Destination,
    EncodedFiles,
    FileRecord,
    NewFile,
    PartRecord,
    ShardRecord,
    WorkerRecord,
    shard_key,
)
from .rules import (
    BATCH_COLUMNS,
    FILE_COLUMNS,
    SHARD_COLUMNS,
    CommonOperations,
    batch_exists,
    batch_from_row,
    batch_not_found,
    check_accepts_files,
    check_batch_move,
    check_file_move,
    check_rescannable,
    check_uploading,
    file_from_row,
    members_mismatch,
    members_not_plannable,
    shard_from_row,
    shard_not_uploading,
    unfinished_exists,
)

Conn = sqlite3.Connection

# The scan's groups let the WAL grow to 64 MiB between checkpoints (a B-tree page
# changed by several groups is copied back once): 20 % less insert time at 1,000,000
# files. The WAL file keeps that size on disk afterwards; SQLite reuses it.
SCAN_CHECKPOINT_PAGES = 16384

_INSERT_FILE = ("INSERT INTO files (batch_id, rel_path, key, size, mtime_ns, state, error, identity, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (batch_id, rel_path) DO NOTHING")
# Rows of encode_files, in their order. "WHERE true" lets SQLite parse the
# ON CONFLICT clause after a SELECT.
_INSERT_FILES_JSON = (
    "INSERT INTO files (batch_id, rel_path, key, size, mtime_ns, state, error, identity, updated_at) "
    "SELECT ?1, json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), "
    "json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'), "
    "json_extract(value, '$[6]'), ?3 FROM json_each(?2) WHERE true ORDER BY key "
    "ON CONFLICT (batch_id, rel_path) DO NOTHING")

# The archived index's source of a batch (its source root and destination).
_SOURCE_OF_BATCH = ("SELECT s.source_id FROM archive_sources s JOIN batches b ON s.source_root = b.source_root "
                    "AND s.bucket = b.bucket AND s.prefix = b.prefix "
                    "AND s.endpoint_url = coalesce(b.endpoint_url, '') WHERE b.batch_id = ?")
_SOURCE = ("SELECT source_id FROM archive_sources WHERE source_root = ? AND bucket = ? AND prefix = ? "
           "AND endpoint_url = ?")
# Candidates as a JSON array of [rel_path, size, mtime_ns]: one statement for a scan group.
# CROSS JOIN keeps json_each the outer loop: SQLite would otherwise scan the whole source
# and the JSON for each row (5,000 candidates against 100,000 rows: 390 s against 11 ms).
_FIND_ARCHIVED_JSON = (
    "SELECT a.rel_path FROM json_each(?2) j CROSS JOIN archived a ON a.source_id = ?1 "
    "AND a.rel_path = json_extract(j.value, '$[0]') AND a.size = json_extract(j.value, '$[1]') "
    "AND a.mtime_ns = json_extract(j.value, '$[2]')")
_FIND_ARCHIVED = "SELECT rel_path FROM archived WHERE source_id = ? AND rel_path = ? AND size = ? AND mtime_ns = ?"
# A batch's uploaded files become the latest archived version of their paths, unless a
# newer batch already archived one (ULIDs sort by creation time).
_INDEX_UPLOADED = (
    "INSERT INTO archived (source_id, rel_path, size, mtime_ns, identity, batch_id, seen_by) "
    "SELECT ?1, rel_path, size, mtime_ns, identity, batch_id, batch_id FROM files "
    "WHERE batch_id = ?2 AND state = 'uploaded' AND true "
    "ON CONFLICT (source_id, rel_path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
    "identity = excluded.identity, batch_id = excluded.batch_id, seen_by = excluded.seen_by "
    "WHERE excluded.batch_id >= archived.batch_id")
# Paths of the index that a batch's complete walk did not find: neither among its files
# (skipped ones aside: covers() decides those) nor marked seen by it or a newer walk (a
# batch's own uploads are marked seen by it, so a newer batch's are kept too).
_NOT_FOUND = ("FROM archived WHERE source_id = ?1 AND (seen_by IS NULL OR seen_by < ?2) "
              "AND NOT EXISTS (SELECT 1 FROM files f WHERE f.batch_id = ?2 AND f.rel_path = archived.rel_path "
              "AND f.state != 'skipped')")


def _each_member(conn: Conn, update: str, batch_id: str, pairs: Sequence[tuple[str, Any]], shard_no: int,
                 now: str) -> None:
    """One UPDATE a member, ``pairs`` of (rel_path, value): ``update`` names the pair's parts
    {path} and {value}; ?1 is the batch, ?3 the shard, ?4 the time. (executemany: 2 us a member
    by its primary key. One UPDATE ... FROM json_each(...) plans files as the outer loop: 40 s
    for 500 members of a 100,000-file batch.)"""
    conn.executemany(update.format(path="?5", value="?2"),
                     [(batch_id, value, shard_no, now, rel_path) for rel_path, value in pairs])


class SQLiteJournal(CommonOperations):
    """A handle on one journal file; safe to share between threads and to pass to forked children."""

    # A commit is local, but each is a transaction and an fsync: completions that arrive
    # within this long of the first are committed with it (crash: they are sent again).
    commit_linger = 0.02

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                 synchronous: str = "FULL", read_only: bool = False) -> None:
        """``read_only``: opened for reading alone (a dry run): never created, migrated or
        written; a journal of another schema version is a JournalError."""
        self.db = SQLiteDatabase(path, busy_timeout=busy_timeout, synchronous=synchronous, read_only=read_only)
        self.path = self.db.path
        self.location = str(self.path)

    def claims(self) -> None:
        """One process owns a batch at a time (OS locks beside the journal file): no claims."""
        return None

    def batch_lock(self, batch_id: str) -> BatchLock:
        """The batch's owner lock (flock beside the journal; dies with its process)."""
        return BatchLock(self.path, batch_id)

    def source_lock(self, source_root: str, bucket: str, prefix: str, endpoint_url: str | None) -> BatchLock:
        """Held while a plain upload picks or creates its batch (see :func:`archup.lock.source_lock`)."""
        return source_lock(self.path, source_root, bucket, prefix, endpoint_url)

    def close(self) -> None:
        """Close every connection this handle opened (call once worker threads are done)."""
        self.db.close()

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (see :meth:`SQLiteDatabase.atomic`)."""
        with self.db.atomic() as conn:
            yield conn

    def integrity_check(self) -> str:
        return self.db.integrity_check()

    def list_workers(self, batch_id: str) -> list[WorkerRecord]:
        """One owner at a time, under the batch lock: no workers are recorded."""
        return []

    def expire_claims(self, batch_id: str) -> int:
        return 0

    # -- batches -----------------------------------------------------------

    def init_batch(self, batch_id: str, *, source_root: str, bucket: str, prefix: str,
                   part_size: int, endpoint_url: str | None = None, region: str | None = None,
                   ttl: timedelta = BATCH_TTL, settings: BatchSettings | None = None,
                   unless_unfinished: bool = False) -> BatchRecord:
        now = utcnow()

        def body(conn: Conn) -> None:
            if conn.execute("SELECT 1 FROM batches WHERE batch_id = ?", (batch_id,)).fetchone():
                raise batch_exists(batch_id, self.location)
            if unless_unfinished:
                found = conn.execute(
                    f"SELECT batch_id FROM batches WHERE source_root = ? AND bucket = ? AND prefix = ? "
                    f"AND endpoint_url IS ? AND state IN ({','.join('?' * len(UNFINISHED))}) AND expires_at > ? "
                    "ORDER BY batch_id DESC LIMIT 1",
                    (source_root, bucket, prefix, endpoint_url, *(s.value for s in UNFINISHED),
                     isoformat(now))).fetchone()
                if found is not None:
                    raise unfinished_exists(found[0], source_root)
            conn.execute(
                "INSERT INTO batches (batch_id, state, source_root, bucket, prefix, endpoint_url, region, "
                "part_size, created_at, updated_at, expires_at, settings) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (batch_id, BatchState.OPEN.value, source_root, bucket, prefix, endpoint_url, region,
                 part_size, isoformat(now), isoformat(now), isoformat(now + ttl),
                 (settings or BatchSettings()).to_json()))
        self.db.write(body)
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str) -> BatchRecord:
        row = next(iter(self.db.query(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = ?", (batch_id,))), None)
        if row is None:
            raise batch_not_found(batch_id, self.location)
        return batch_from_row(row)

    def set_batch_settings(self, batch_id: str, settings: BatchSettings) -> None:
        """Record the settings of a batch begun before they were recorded, once, from the first
        run that knows them (the options its job passes); never changes recorded ones."""
        def body(conn: Conn) -> None:
            self._batch_state(conn, batch_id)
            conn.execute("UPDATE batches SET settings = ? WHERE batch_id = ? AND settings IS NULL",
                         (settings.to_json(), batch_id))
        self.db.write(body)

    def list_batches(self, state: BatchState | None = None) -> list[BatchRecord]:
        sql = f"SELECT {BATCH_COLUMNS} FROM batches"
        args: tuple[Any, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (state.value,)
        rows = self.db.query(sql + " ORDER BY batch_id", args)
        return [batch_from_row(row) for row in rows]

    def _batch_state(self, conn: Conn, batch_id: str) -> BatchState:
        row = conn.execute("SELECT state FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is None:
            raise batch_not_found(batch_id, self.location, hint=False)
        return BatchState(row[0])

    def set_batch_state(self, batch_id: str, target: BatchState, *, error: str | None = None,
                        manifest_key: str | None = None, finalized_at: str | None = None) -> BatchRecord:
        def body(conn: Conn) -> None:
            check_batch_move(batch_id, self._batch_state(conn, batch_id), target)
            conn.execute(
                "UPDATE batches SET state = ?, error = ?, updated_at = ?, "
                "manifest_key = COALESCE(?, manifest_key), finalized_at = COALESCE(?, finalized_at) "
                "WHERE batch_id = ?",
                (target.value, error, isoformat(utcnow()), manifest_key, finalized_at, batch_id))
        self.db.write(body)
        return self.get_batch(batch_id)

    def mark_scan_complete(self, batch_id: str, files_archived: int = 0) -> None:
        """The whole source is in the journal. ``files_archived``: how many files the complete
        walk found archived unchanged already (--skip-archived); set, not added, so a scan run
        again after a crash counts them once."""
        def body(conn: Conn) -> None:
            self._batch_state(conn, batch_id)
            conn.execute("UPDATE batches SET scan_complete = 1, files_archived = ?, updated_at = ? "
                         "WHERE batch_id = ?", (files_archived, isoformat(utcnow()), batch_id))
        self.db.write(body)

    def delete_batch(self, batch_id: str) -> None:
        def body(conn: Conn) -> None:
            self._batch_state(conn, batch_id)
            conn.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
        self.db.write(body)

    # -- files -------------------------------------------------------------

    def add_files(self, batch_id: str, new_files: Iterable[NewFile] | EncodedFiles, *,
                  durable: bool = True, seen_archived: Sequence[str] = ()) -> int:
        """Add files in one transaction; paths already in the batch are left as they are.

        Returns how many were new. ``durable=False`` (the scan) skips this commit's
        fsync: in WAL mode the next FULL commit (``mark_scan_complete``) syncs it
        along, and a scan that never reached that commit is simply run again.
        ``seen_archived``: paths the walk found archived unchanged (not added): marked
        seen by this batch in the archived index, so its finalize keeps them there.
        """
        encoded = new_files if isinstance(new_files, EncodedFiles) else self.encode_files(new_files)
        now = isoformat(utcnow())

        def body(conn: Conn) -> int:
            check_accepts_files(batch_id, self._batch_state(conn, batch_id))
            if seen_archived:
                self._mark_seen(conn, batch_id, seen_archived)
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

        with self.db.synchronous_for("FULL" if durable else "NORMAL"), \
                self.db.pragma("wal_autocheckpoint", None if durable else SCAN_CHECKPOINT_PAGES):
            return self.db.write(body)

    def count_skipped(self, batch_id: str, reasons: Iterable[str]) -> int:
        """How many of the batch's skipped files were skipped for a reason starting with one of these."""
        prefixes = list(reasons)
        if not prefixes:
            return 0
        match = " OR ".join("substr(error, 1, ?) = ?" for _ in prefixes)
        args: list[Any] = [batch_id, FileState.SKIPPED.value]
        for prefix in prefixes:
            args += [len(prefix), prefix]
        rows = self.db.query(f"SELECT count(*) FROM files WHERE batch_id = ? AND state = ? AND ({match})", tuple(args))
        return int(rows[0][0])

    # -- the archived index -------------------------------------------------

    def _source(self, destination: Destination) -> int | None:
        row = next(iter(self.db.query(_SOURCE, (*destination[:3], destination.endpoint_url or ""))), None)
        return None if row is None else int(row[0])

    def find_archived(self, destination: Destination, candidates: Sequence[tuple[str, int, int]]) -> set[str]:
        """Which of these (rel_path, size, mtime_ns) are archived unchanged already: the latest
        archived version of the path, in the destination's index, has that size and mtime."""
        source = self._source(destination)
        if source is None or not candidates:
            return set()
        text = json.dumps(candidates, ensure_ascii=False)
        if "\\u0000" in text:
            # SQLite's JSON functions end a string at NUL: one lookup a path.
            return {str(row[0]) for rel_path, size, mtime_ns in candidates
                    for row in self.db.query(_FIND_ARCHIVED, (source, rel_path, size, mtime_ns))}
        return {str(row[0]) for row in self.db.query(_FIND_ARCHIVED_JSON, (source, text))}

    @staticmethod
    def _mark_seen(conn: Conn, batch_id: str, rel_paths: Sequence[str]) -> None:
        row = conn.execute(_SOURCE_OF_BATCH, (batch_id,)).fetchone()
        if row is not None:
            conn.executemany("UPDATE archived SET seen_by = ?1 WHERE source_id = ?2 AND rel_path = ?3 "
                             "AND (seen_by IS NULL OR seen_by < ?1)",
                             [(batch_id, row[0], rel_path) for rel_path in rel_paths])

    def iter_archived(self, destination: Destination, page_size: int = 2000) -> Iterator[ArchivedFile]:
        """The destination's archived index in path order, page by page."""
        source = self._source(destination)
        if source is None:
            return
        last = ""
        while True:
            rows = self.db.query("SELECT rel_path, size, mtime_ns, identity, batch_id FROM archived "
                                 "WHERE source_id = ? AND rel_path > ? ORDER BY rel_path LIMIT ?",
                                 (source, last, page_size))
            if not rows:
                return
            for row in rows:
                yield ArchivedFile(**dict(row))
            last = rows[-1]["rel_path"]

    def seal_batch(self, batch_id: str, *, manifest_key: str, finalized_at: str,
                   covers: Callable[[str], bool] | None = None, summary_sha256: str | None = None) -> BatchRecord:
        """-> enqueued, and the archived index updated, in one transaction.

        The batch's uploaded files become the latest archived version of their paths; the
        paths its complete walk did not find are dropped (deleted from the source).
        ``covers``: whether the walk found a path absent: its selection takes it, and it is
        not a file the batch skipped (unreadable, say: still there). None: every path.
        """
        def body(conn: Conn) -> None:
            check_batch_move(batch_id, self._batch_state(conn, batch_id), BatchState.ENQUEUED)
            batch = conn.execute("SELECT source_root, bucket, prefix, coalesce(endpoint_url, '') FROM batches "
                                 "WHERE batch_id = ?", (batch_id,)).fetchone()
            conn.execute("INSERT INTO archive_sources (source_root, bucket, prefix, endpoint_url) VALUES (?,?,?,?) "
                         "ON CONFLICT DO NOTHING", tuple(batch))
            source = conn.execute(_SOURCE, tuple(batch)).fetchone()[0]
            conn.execute(_INDEX_UPLOADED, (source, batch_id))
            if covers is None:
                conn.execute(f"DELETE {_NOT_FOUND}", (source, batch_id))
            else:
                gone = [(source, row[0]) for row in conn.execute(f"SELECT rel_path {_NOT_FOUND}", (source, batch_id))
                        if covers(row[0])]
                conn.executemany("DELETE FROM archived WHERE source_id = ? AND rel_path = ?", gone)
            conn.execute("UPDATE batches SET state = ?, error = NULL, updated_at = ?, manifest_key = ?, "
                         "finalized_at = ?, summary_sha256 = ? WHERE batch_id = ?",
                         (BatchState.ENQUEUED.value, isoformat(utcnow()), manifest_key, finalized_at,
                          summary_sha256, batch_id))
        self.db.write(body)
        return self.get_batch(batch_id)

    # -- forgetting ----------------------------------------------------------

    def forget_batch(self, batch_id: str) -> bool:
        """Forget a terminal batch's file and part rows, keeping its batch row with the
        per-state counts and bytes. False if it is not terminal or forgotten already."""
        def body(conn: Conn) -> bool:
            state = self._batch_state(conn, batch_id)
            forgotten = conn.execute("SELECT forgotten_at FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()[0]
            if not state.terminal or forgotten is not None:
                return False
            counts = {state.value: [0, 0] for state in FileState}
            for file_state, count, total in conn.execute(
                    "SELECT state, count(*), coalesce(sum(size), 0) FROM files WHERE batch_id = ? GROUP BY state",
                    (batch_id,)):
                counts[file_state] = [count, total]
            conn.execute("DELETE FROM parts WHERE batch_id = ?", (batch_id,))
            conn.execute("DELETE FROM shards WHERE batch_id = ?", (batch_id,))
            conn.execute("DELETE FROM files WHERE batch_id = ?", (batch_id,))
            conn.execute("UPDATE batches SET forgotten_at = ?, file_counts = ? WHERE batch_id = ?",
                         (isoformat(utcnow()), json.dumps(counts, sort_keys=True), batch_id))
            return True
        return self.db.write(body)

    def size_on_disk(self) -> int:
        return self.db.size_on_disk()

    def compact(self) -> None:
        """Give the space that forgetting freed back to the filesystem (see SQLiteDatabase.compact)."""
        self.db.compact()

    def get_file(self, batch_id: str, rel_path: str) -> FileRecord:
        row = next(iter(self.db.query(
            f"SELECT {FILE_COLUMNS} FROM files WHERE batch_id = ? AND rel_path = ?",
            (batch_id, rel_path))), None)
        if row is None:
            raise FileNotInBatch(batch_id, rel_path)
        return file_from_row(row)

    def _move_file(self, conn: Conn, batch_id: str, rel_path: str, target: FileState) -> FileState:
        """Check a file transition inside an open write transaction; return the current state."""
        row = conn.execute("SELECT state FROM files WHERE batch_id = ? AND rel_path = ?",
                           (batch_id, rel_path)).fetchone()
        if row is None:
            self._batch_state(conn, batch_id)  # an unknown batch is the clearer error
            raise FileNotInBatch(batch_id, rel_path)
        current = FileState(row[0])
        check_file_move(batch_id, rel_path, current, target, self._batch_state(conn, batch_id))
        return current

    def start_file(self, batch_id: str, rel_path: str) -> None:
        """pending/failed -> uploading; counts the attempt."""
        def body(conn: Conn) -> None:
            self._move_file(conn, batch_id, rel_path, FileState.UPLOADING)
            conn.execute("UPDATE files SET state = ?, attempts = attempts + 1, error = NULL, updated_at = ? "
                         "WHERE batch_id = ? AND rel_path = ?",
                         (FileState.UPLOADING.value, isoformat(utcnow()), batch_id, rel_path))
        self.db.write(body)

    @staticmethod
    def _require_uploading(conn: Conn, batch_id: str, rel_path: str) -> None:
        row = conn.execute("SELECT state FROM files WHERE batch_id = ? AND rel_path = ?",
                           (batch_id, rel_path)).fetchone()
        if row is None:
            raise FileNotInBatch(batch_id, rel_path)
        check_uploading(batch_id, rel_path, FileState(row[0]))

    def record_upload_id(self, batch_id: str, rel_path: str, upload_id: str, part_size: int,
                         sha256: str | None = None, checksum_kind: str | None = None) -> None:
        """Record a multipart upload the moment it exists, so a crash leaves something to finish or abort.

        ``sha256`` is the whole-file digest the upload was created with (its object metadata):
        while the file is uploading it is what the upload pass must read again, not yet proof.
        ``checksum_kind`` is how its parts are checksummed, which a resumer must keep."""
        def body(conn: Conn) -> None:
            self._require_uploading(conn, batch_id, rel_path)
            conn.execute("UPDATE files SET upload_id = ?, part_size = ?, sha256 = ?, checksum_kind = ?, "
                         "updated_at = ? WHERE batch_id = ? AND rel_path = ?",
                         (upload_id, part_size, sha256, checksum_kind, isoformat(utcnow()), batch_id, rel_path))
        self.db.write(body)

    def record_part(self, batch_id: str, rel_path: str, part: PartRecord) -> None:
        def body(conn: Conn) -> None:
            self._require_uploading(conn, batch_id, rel_path)
            conn.execute(
                "INSERT INTO parts (batch_id, rel_path, part_number, size, etag, checksum) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT (batch_id, rel_path, part_number) DO UPDATE SET "
                "size = excluded.size, etag = excluded.etag, checksum = excluded.checksum",
                (batch_id, rel_path, part.part_number, part.size, part.etag, part.checksum))
        self.db.write(body)

    def upload_ids(self, batch_id: str) -> set[str]:
        """The multipart upload ids the journal records for a batch (files and shards still uploading)."""
        rows = self.db.query(
            "SELECT upload_id FROM files WHERE batch_id = ?1 AND upload_id IS NOT NULL UNION ALL "
            "SELECT upload_id FROM shards WHERE batch_id = ?1 AND state = 'uploading' AND upload_id IS NOT NULL",
            (batch_id,))
        return {row[0] for row in rows}

    def list_parts(self, batch_id: str, rel_path: str) -> list[PartRecord]:
        rows = self.db.query(
            "SELECT part_number, size, etag, checksum FROM parts WHERE batch_id = ? AND rel_path = ? "
            "ORDER BY part_number", (batch_id, rel_path))
        return [PartRecord(**dict(row)) for row in rows]

    def complete_file(self, batch_id: str, rel_path: str, *, sha256: str, etag: str) -> None:
        """-> uploaded. Call only after the store confirmed the object; raises if already uploaded."""
        def body(conn: Conn) -> None:
            self._move_file(conn, batch_id, rel_path, FileState.UPLOADED)
            conn.execute("UPDATE files SET state = ?, sha256 = ?, etag = ?, error = NULL, updated_at = ? "
                         "WHERE batch_id = ? AND rel_path = ?",
                         (FileState.UPLOADED.value, sha256, etag, isoformat(utcnow()), batch_id, rel_path))
        self.db.write(body)

    def complete_files(self, batch_id: str,
                       completions: list[tuple[str, str, str]]) -> list[tuple[str, IllegalTransition]]:
        """Many (rel_path, sha256, etag) -> uploaded in one transaction (one fsync for the group).

        Each file's transition is checked as in complete_file; the illegal ones are left
        unchanged and returned with their error, the others committed.
        """
        now = isoformat(utcnow())

        def body(conn: Conn) -> list[tuple[str, IllegalTransition]]:
            refused: list[tuple[str, IllegalTransition]] = []
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
        return self.db.write(body)

    def fail_file(self, batch_id: str, rel_path: str, error: str) -> None:
        def body(conn: Conn) -> None:
            self._move_file(conn, batch_id, rel_path, FileState.FAILED)
            conn.execute("UPDATE files SET state = ?, error = ?, upload_id = NULL, checksum_kind = NULL, "
                         "sha256 = NULL, updated_at = ? WHERE batch_id = ? AND rel_path = ?",
                         (FileState.FAILED.value, error, isoformat(utcnow()), batch_id, rel_path))
            conn.execute("DELETE FROM parts WHERE batch_id = ? AND rel_path = ?", (batch_id, rel_path))
        self.db.write(body)

    def skip_file(self, batch_id: str, rel_path: str, reason: str) -> None:
        with self.db.atomic() as conn:
            self._move_file(conn, batch_id, rel_path, FileState.SKIPPED)
            conn.execute("UPDATE files SET state = ?, error = ?, upload_id = NULL, checksum_kind = NULL, "
                         "sha256 = NULL, etag = NULL, updated_at = ? WHERE batch_id = ? AND rel_path = ?",
                         (FileState.SKIPPED.value, reason, isoformat(utcnow()), batch_id, rel_path))
            conn.execute("DELETE FROM parts WHERE batch_id = ? AND rel_path = ?", (batch_id, rel_path))

    def reset_file(self, batch_id: str, rel_path: str, reason: str) -> None:
        """-> pending, forgetting any upload; for an object found missing or an upload the server lost."""
        def body(conn: Conn) -> None:
            self._move_file(conn, batch_id, rel_path, FileState.PENDING)
            conn.execute("UPDATE files SET state = ?, error = ?, upload_id = NULL, checksum_kind = NULL, "
                         "sha256 = NULL, etag = NULL, updated_at = ? WHERE batch_id = ? AND rel_path = ?",
                         (FileState.PENDING.value, reason, isoformat(utcnow()), batch_id, rel_path))
            conn.execute("DELETE FROM parts WHERE batch_id = ? AND rel_path = ?", (batch_id, rel_path))
        self.db.write(body)

    def refresh_file(self, batch_id: str, rel_path: str, size: int, mtime_ns: int,
                     identity: str | None = None) -> FileRecord:
        """A pending or failed file changed on disk: the batch takes it as it is now."""
        def body(conn: Conn) -> None:
            row = conn.execute("SELECT state, upload_id FROM files WHERE batch_id = ? AND rel_path = ?",
                               (batch_id, rel_path)).fetchone()
            if row is None:
                raise FileNotInBatch(batch_id, rel_path)
            check_rescannable(batch_id, rel_path, FileState(row[0]), row[1])
            conn.execute("UPDATE files SET size = ?, mtime_ns = ?, identity = ?, part_size = NULL, updated_at = ? "
                         "WHERE batch_id = ? AND rel_path = ?",
                         (size, mtime_ns, identity, isoformat(utcnow()), batch_id, rel_path))
        self.db.write(body)
        return self.get_file(batch_id, rel_path)

    def iter_files(self, batch_id: str, states: Iterable[FileState] | None = None,
                   page_size: int = 2000, *, packed: bool | None = None) -> Iterator[FileRecord]:
        """Files of a batch in key order, streamed page by page (no long read transaction)."""
        wanted = tuple(state.value for state in states) if states is not None else None
        if wanted == ():
            return
        filter_sql = f" AND state IN ({','.join('?' * len(wanted))})" if wanted else ""
        if packed is not None:  # only the files in shards, or only those of their own
            filter_sql += " AND shard_no IS NOT NULL" if packed else " AND shard_no IS NULL"
        last_key = ""
        while True:
            rows = self.db.query(
                f"SELECT {FILE_COLUMNS} FROM files WHERE batch_id = ? AND key > ?{filter_sql} "
                "ORDER BY key LIMIT ?", (batch_id, last_key, *(wanted or ()), page_size))
            if not rows:
                return
            for row in rows:
                yield file_from_row(row)
            last_key = rows[-1]["key"]

    def get_state(self, batch_id: str, problem_limit: int = 20) -> BatchSummary:
        """The batch, its counts, and its first ``problem_limit`` failed and first ``problem_limit``
        skipped files in key order (-1: all of them), read in one snapshot."""
        with self.db.snapshot() as conn:
            row = conn.execute(f"SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = ?",
                               (batch_id,)).fetchone()
            if row is None:
                raise batch_not_found(batch_id, self.location)
            counts = {state: 0 for state in FileState}
            sizes = {state: 0 for state in FileState}
            recorded = conn.execute("SELECT file_counts FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()[0]
            # A forgotten batch's counts were kept when its file rows went.
            per_state = (((state, *pair, None) for state, pair in json.loads(recorded).items()) if recorded else
                         conn.execute("SELECT state, count(*), coalesce(sum(size), 0), max(updated_at) FROM files "
                                      "WHERE batch_id = ? GROUP BY state", (batch_id,)))
            last_change: str | None = None
            for state, count, total, changed in per_state:
                counts[FileState(state)] = count
                sizes[FileState(state)] = total
                last_change = max(filter(None, (last_change, changed)), default=None)
            # Each kind apart, so many skipped files cannot hide a failed one; each read the
            # cheaper way for how common that kind is in the batch.
            listed: dict[FileState, list[FileRecord]] = {}
            for state in (FileState.FAILED, FileState.SKIPPED):
                plan = self._problem_plan(counts[state], sum(counts.values()), problem_limit)
                listed[state] = [] if not counts[state] or not problem_limit else [
                    file_from_row(r) for r in conn.execute(
                        f"SELECT {FILE_COLUMNS} FROM files {plan}WHERE batch_id = ? AND state = ? "
                        "ORDER BY key LIMIT ?", (batch_id, state.value, problem_limit))]
            shards = {ShardState(state): (count, total) for state, count, total in conn.execute(
                "SELECT state, count(*), coalesce(sum(size), 0) FROM shards WHERE batch_id = ? GROUP BY state",
                (batch_id,))}
        return BatchSummary(batch_from_row(row), counts, sizes, listed[FileState.FAILED],
                            listed[FileState.SKIPPED], problem_limit, last_file_change=last_change,
                            shards={state: pair[0] for state, pair in shards.items()},
                            shard_bytes={state: pair[1] for state, pair in shards.items()})

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


    # -- packed shards ---------------------------------------------------------

    def plan_shard(self, batch_id: str, members: Sequence[tuple[str, int]], size: int) -> ShardRecord:
        now = isoformat(utcnow())

        def body(conn: Conn) -> int:
            check_accepts_files(batch_id, self._batch_state(conn, batch_id))
            prefix = conn.execute("SELECT prefix FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()[0]
            shard_no = conn.execute("SELECT coalesce(max(shard_no), 0) + 1 FROM shards WHERE batch_id = ?",
                                    (batch_id,)).fetchone()[0]
            conn.execute("INSERT INTO shards (batch_id, shard_no, key, size, members, state, updated_at) "
                         "VALUES (?,?,?,?,?,?,?)", (batch_id, shard_no, shard_key(f"{prefix}{batch_id}/", shard_no),
                                                    size, len(members), ShardState.UPLOADING.value, now))
            before = conn.total_changes
            _each_member(conn, "UPDATE files SET state = 'uploading', shard_no = ?3, shard_offset = {value}, "
                         "attempts = attempts + 1, error = NULL, updated_at = ?4 WHERE batch_id = ?1 "
                         "AND rel_path = {path} AND state IN ('pending', 'failed') AND shard_no IS NULL "
                         "AND upload_id IS NULL", batch_id, members, shard_no, now)
            moved = conn.total_changes - before
            if moved != len(members):
                raise members_not_plannable(batch_id, shard_no, len(members), moved)
            return int(shard_no)

        return self.get_shard(batch_id, self.db.write(body))

    def get_shard(self, batch_id: str, shard_no: int) -> ShardRecord:
        row = next(iter(self.db.query(f"SELECT {SHARD_COLUMNS} FROM shards WHERE batch_id = ? AND shard_no = ?",
                                      (batch_id, shard_no))), None)
        if row is None:
            raise shard_not_uploading(batch_id, shard_no, None)
        return shard_from_row(row)

    def iter_shards(self, batch_id: str, states: Iterable[ShardState] | None = None) -> Iterator[ShardRecord]:
        wanted = None if states is None else {state.value for state in states}
        last = 0
        while True:
            rows = self.db.query(f"SELECT {SHARD_COLUMNS} FROM shards WHERE batch_id = ? AND shard_no > ? "
                                 "ORDER BY shard_no LIMIT 1000", (batch_id, last))
            if not rows:
                return
            for row in rows:
                if wanted is None or row["state"] in wanted:
                    yield shard_from_row(row)
            last = rows[-1]["shard_no"]

    def shard_members(self, batch_id: str, shard_no: int) -> list[FileRecord]:
        return [file_from_row(row) for row in self.db.query(
            f"SELECT {FILE_COLUMNS} FROM files WHERE batch_id = ? AND shard_no = ? ORDER BY shard_offset",
            (batch_id, shard_no))]

    @staticmethod
    def _require_shard_uploading(conn: Conn, batch_id: str, shard_no: int) -> int:
        row = conn.execute("SELECT state, members FROM shards WHERE batch_id = ? AND shard_no = ?",
                           (batch_id, shard_no)).fetchone()
        state = None if row is None else ShardState(row[0])
        if state is not ShardState.UPLOADING:
            raise shard_not_uploading(batch_id, shard_no, state)
        return int(row[1])

    def record_shard_upload(self, batch_id: str, shard_no: int, upload_id: str, part_size: int,
                            checksum_kind: str | None) -> None:
        def body(conn: Conn) -> None:
            self._require_shard_uploading(conn, batch_id, shard_no)
            conn.execute("UPDATE shards SET upload_id = ?, part_size = ?, checksum_kind = ?, updated_at = ? "
                         "WHERE batch_id = ? AND shard_no = ?",
                         (upload_id, part_size, checksum_kind, isoformat(utcnow()), batch_id, shard_no))
            conn.execute("DELETE FROM shard_parts WHERE batch_id = ? AND shard_no = ?", (batch_id, shard_no))
        self.db.write(body)

    def record_shard_part(self, batch_id: str, shard_no: int, part: PartRecord) -> None:
        def body(conn: Conn) -> None:
            self._require_shard_uploading(conn, batch_id, shard_no)
            conn.execute(
                "INSERT INTO shard_parts (batch_id, shard_no, part_number, size, etag, checksum) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT (batch_id, shard_no, part_number) DO UPDATE SET "
                "size = excluded.size, etag = excluded.etag, checksum = excluded.checksum",
                (batch_id, shard_no, part.part_number, part.size, part.etag, part.checksum))
        self.db.write(body)

    def list_shard_parts(self, batch_id: str, shard_no: int) -> list[PartRecord]:
        rows = self.db.query("SELECT part_number, size, etag, checksum FROM shard_parts WHERE batch_id = ? "
                             "AND shard_no = ? ORDER BY part_number", (batch_id, shard_no))
        return [PartRecord(**dict(row)) for row in rows]

    def complete_shard(self, batch_id: str, shard_no: int, *, sha256: str, etag: str,
                       digests: Sequence[tuple[str, str]]) -> None:
        now = isoformat(utcnow())

        def body(conn: Conn) -> None:
            members = self._require_shard_uploading(conn, batch_id, shard_no)
            before = conn.total_changes
            _each_member(conn, "UPDATE files SET state = 'uploaded', sha256 = {value}, etag = NULL, error = NULL, "
                         "updated_at = ?4 WHERE batch_id = ?1 AND rel_path = {path} AND shard_no = ?3 "
                         "AND state = 'uploading'", batch_id, digests, shard_no, now)
            moved = conn.total_changes - before
            if moved != members or len(digests) != members:
                raise members_mismatch(batch_id, shard_no, members, moved)
            conn.execute("UPDATE shards SET state = ?, sha256 = ?, etag = ?, error = NULL, updated_at = ? "
                         "WHERE batch_id = ? AND shard_no = ?",
                         (ShardState.UPLOADED.value, sha256, etag, now, batch_id, shard_no))
            conn.execute("DELETE FROM shard_parts WHERE batch_id = ? AND shard_no = ?", (batch_id, shard_no))
        self.db.write(body)

    def drop_shard(self, batch_id: str, shard_no: int, reason: str,
                   problems: Mapping[str, tuple[FileState, str]]) -> None:
        now = isoformat(utcnow())

        def body(conn: Conn) -> None:
            row = conn.execute("SELECT state FROM shards WHERE batch_id = ? AND shard_no = ?",
                               (batch_id, shard_no)).fetchone()
            if row is None or ShardState(row[0]) is ShardState.DROPPED:
                raise shard_not_uploading(batch_id, shard_no, None if row is None else ShardState(row[0]))
            conn.execute("UPDATE files SET state = 'pending', error = ?, shard_no = NULL, shard_offset = NULL, "
                         "updated_at = ? WHERE batch_id = ? AND shard_no = ?", (reason, now, batch_id, shard_no))
            conn.executemany("UPDATE files SET state = ?, error = ?, updated_at = ? WHERE batch_id = ? "
                             "AND rel_path = ? AND state = 'pending' AND error = ?",
                             [(state.value, why, now, batch_id, rel_path, reason)
                              for rel_path, (state, why) in problems.items()])
            conn.execute("UPDATE shards SET state = ?, error = ?, updated_at = ? WHERE batch_id = ? AND shard_no = ?",
                         (ShardState.DROPPED.value, reason, now, batch_id, shard_no))
            conn.execute("DELETE FROM shard_parts WHERE batch_id = ? AND shard_no = ?", (batch_id, shard_no))
        self.db.write(body)
