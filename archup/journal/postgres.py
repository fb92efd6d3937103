"""The journal on PostgreSQL: the authority that several hosts share (the connections and the
schema are :mod:`archup.journal.pgdatabase`'s).

The same records, states and transitions as :class:`archup.journal.SQLiteJournal`, plus
what hosts need to share one batch (docs/design.md, "Several hosts, one batch"):

- **chunks**: the scan writes files in chunks of consecutive keys; a host claims chunks
  with ``FOR UPDATE SKIP LOCKED`` and a lease in the database's clock, renewed by its
  heartbeat. A chunk whose lease ran out is claimed again by whichever host asks next.
- **the fence**: a handle bound to a worker (:meth:`PostgresJournal.bind_worker`) records
  progress on a file (start, upload id, part, completion, failure) only while that worker
  owns the file's chunk, checked in the same transaction, which holds the chunk row
  (``FOR KEY SHARE``) until it commits, so a takeover waits for it or finds it refused.
- **elections**: of the one host that scans and of the one that finalizes, each a lease.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any

import psycopg

from ..clock import isoformat, utcnow
from ..errors import FileNotInBatch, IllegalTransition, JournalError, LeaseLost
from ..states import UNFINISHED, BatchState, FileState, ShardState
from .pgdatabase import PgDatabase
from .records import (
    BATCH_TTL,
    ArchivedFile,
    BatchRecord,
    BatchSettings,
    BatchSummary,
    Claim,
    Destination,
    EncodedFiles,
    FileRecord,
    NewFile,
    PartRecord,
    ShardRecord,
    WorkerRecord,
    WorkLeft,
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
    check_files_open,
    check_rescannable,
    check_uploading,
    file_from_row,
    members_mismatch,
    members_not_plannable,
    shard_from_row,
    shard_not_uploading,
    unfinished_exists,
)

Conn = psycopg.Connection[Any]

# Files a claim hands out at once: up to 1,000, so claims stay a small share of the round trips;
# a small scan group is cut in eight, at least 16 files each, so a small batch is still shared.
CHUNK_FILES = 1000
MIN_CHUNK_FILES = 16

# A packed batch's chunk holds about one shard of small files (packed_chunks); this many files
# at most, so a claim stays one query however small its files are (8 MiB of empty files with
# short names are about 13,000).
MAX_PACKED_CHUNK_FILES = 16 * CHUNK_FILES

# A chunk nobody holds: never claimed, given back, or its holder's lease ran out (a chunk done
# keeps its last owner, with no lease, and is free once reopened).
_FREE = "(owner IS NULL OR coalesce(lease_until, '-infinity') < now())"
# Whether a batch (b) has files in these states: an index probe a state (files_by_state).
_HAS_FILES = "EXISTS (SELECT 1 FROM files f WHERE f.batch_id = b.batch_id AND f.state IN ({states}))"
_HAS_OPEN = _HAS_FILES.format(states="'pending', 'uploading'")
_HAS_FAILED = _HAS_FILES.format(states="'failed'")
_OPEN_FILE_STATES = (FileState.PENDING.value, FileState.UPLOADING.value, FileState.FAILED.value)


def packed_chunks(rows: Sequence[Sequence[Any]], pack_under: int, shard_size: int | None, per: int) -> list[int]:
    """The chunk (from 0) of each of a packed batch's new rows (``encode_files``'s, in their
    order): a chunk ends where its small files would fill more than a shard, cut by the rule the
    uploader's ShardPlanner cuts shards by, so on a fresh scan a chunk of small files is one shard
    and a shard is one host's claim; its other files (large, or skipped) end it at ``per``."""
    from ..packing import DEFAULT_SHARD_SIZE, member_cost, shard_overhead  # the planner's rule (not at import: a cycle)

    shard_size = shard_size or DEFAULT_SHARD_SIZE

    chunk_of: list[int] = []
    chunk = files = others = packed = 0
    packed_bytes = empty = shard_overhead()
    for rel_path, key, size, mtime_ns, state, *_ in rows:
        small = size < pack_under and state == FileState.PENDING.value
        cost = member_cost(FileRecord("", rel_path, key, size, mtime_ns, FileState.PENDING, None, None, None, None,
                                      None, 0, "")) if small else 0
        if files and ((small and packed and packed_bytes + cost > shard_size) or (not small and others >= per)
                      or files >= MAX_PACKED_CHUNK_FILES):
            chunk, files, others, packed, packed_bytes = chunk + 1, 0, 0, 0, empty
        chunk_of.append(chunk)
        files += 1
        if small:
            packed, packed_bytes = packed + 1, packed_bytes + cost
        else:
            others += 1
    return chunk_of


class PostgresJournal(CommonOperations):
    """A handle on a journal in a PostgreSQL database; safe to share between threads."""

    # Each commit is a round trip however small the group: the completion writer waits this
    # long for more completions after the first (0.33 round trips per small file, from 3.6).
    commit_linger = 0.02

    def __init__(self, url: str, *, max_connections: int = 24, retry_for: float = 60.0,
                 idle_in_transaction: float = 10.0) -> None:
        self.db = PgDatabase(url, max_connections=max_connections, retry_for=retry_for,
                             idle_in_transaction=idle_in_transaction)
        self.location = self.db.location
        self.worker_id: str | None = None

    def claims(self) -> PostgresJournal:
        """Several processes and hosts work on one batch: leases, not OS locks."""
        return self

    def close(self) -> None:
        self.db.close()

    def integrity_check(self) -> str:
        """PostgreSQL keeps its own pages consistent; what archup can check is that its schema is there."""
        self.db.query("SELECT count(*) FROM batches")
        return "ok"

    def batch_lock(self, batch_id: str) -> AbstractContextManager[object]:
        """Leases replace the OS lock: any number of processes may work on one batch."""
        return nullcontext()

    def source_lock(self, source_root: str, bucket: str, prefix: str,
                    endpoint_url: str | None) -> AbstractContextManager[object]:
        return nullcontext()

    # -- batches -----------------------------------------------------------

    def init_batch(self, batch_id: str, *, source_root: str, bucket: str, prefix: str,
                   part_size: int, endpoint_url: str | None = None, region: str | None = None,
                   ttl: timedelta = BATCH_TTL, settings: BatchSettings | None = None,
                   unless_unfinished: bool = False) -> BatchRecord:
        """Raises BatchExists if a batch of that id exists already, or (``unless_unfinished``) an
        unfinished one of this source and destination: hosts starting a plain upload together
        create one batch, not one each (the check and the insert under one advisory lock)."""
        now = utcnow()

        def body(conn: Conn) -> int:
            if unless_unfinished:
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                             (json.dumps([source_root, bucket, prefix, endpoint_url]),))
                found = conn.execute(
                    "SELECT batch_id FROM batches WHERE source_root = %s AND bucket = %s AND prefix = %s "
                    "AND endpoint_url IS NOT DISTINCT FROM %s AND state = ANY(%s) AND expires_at > %s "
                    "ORDER BY batch_id DESC LIMIT 1",
                    (source_root, bucket, prefix, endpoint_url, [s.value for s in UNFINISHED],
                     isoformat(now))).fetchone()
                if found is not None:
                    raise unfinished_exists(found["batch_id"], source_root)
            return conn.execute(
                "INSERT INTO batches (batch_id, state, source_root, bucket, prefix, endpoint_url, region, "
                "part_size, created_at, updated_at, expires_at, settings) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
                "ON CONFLICT (batch_id) DO NOTHING",
                (batch_id, BatchState.OPEN.value, source_root, bucket, prefix, endpoint_url, region,
                 part_size, isoformat(now), isoformat(now), isoformat(now + ttl),
                 (settings or BatchSettings()).to_json())).rowcount

        if not self.db.write(body):
            raise batch_exists(batch_id, self.location)
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str) -> BatchRecord:
        rows = self.db.query(f"SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = %s", (batch_id,))
        if not rows:
            raise batch_not_found(batch_id, self.location)
        return batch_from_row(rows[0])

    def list_batches(self, state: BatchState | None = None) -> list[BatchRecord]:
        if state is None:
            rows = self.db.query(f"SELECT {BATCH_COLUMNS} FROM batches ORDER BY batch_id")
        else:
            rows = self.db.query(f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = %s ORDER BY batch_id",
                                 (state.value,))
        return [batch_from_row(row) for row in rows]

    def _batch_state(self, conn: Conn, batch_id: str, lock: str = "FOR SHARE") -> BatchState:
        """The batch's state, its row locked so no state change commits before this transaction does."""
        row = conn.execute(f"SELECT state FROM batches WHERE batch_id = %s {lock}", (batch_id,)).fetchone()
        if row is None:
            raise batch_not_found(batch_id, self.location, hint=False)
        return BatchState(row["state"])

    def set_batch_settings(self, batch_id: str, settings: BatchSettings) -> None:
        def body(conn: Conn) -> None:
            self._batch_state(conn, batch_id, "FOR UPDATE")
            conn.execute("UPDATE batches SET settings = %s WHERE batch_id = %s AND settings IS NULL",
                         (settings.to_json(), batch_id))
        self.db.write(body)

    def set_batch_state(self, batch_id: str, target: BatchState, *, error: str | None = None,
                        manifest_key: str | None = None, finalized_at: str | None = None) -> BatchRecord:
        def body(conn: Conn) -> None:
            check_batch_move(batch_id, self._batch_state(conn, batch_id, "FOR UPDATE"), target)
            conn.execute(
                "UPDATE batches SET state = %s, error = %s, updated_at = %s, "
                "manifest_key = COALESCE(%s, manifest_key), finalized_at = COALESCE(%s, finalized_at) "
                "WHERE batch_id = %s",
                (target.value, error, isoformat(utcnow()), manifest_key, finalized_at, batch_id))
        self.db.write(body)
        return self.get_batch(batch_id)

    def mark_scan_complete(self, batch_id: str, files_archived: int = 0) -> None:
        def body(conn: Conn) -> None:
            self._batch_state(conn, batch_id, "FOR UPDATE")
            conn.execute("UPDATE batches SET scan_complete = true, files_archived = %s, updated_at = %s, "
                         "scanner = NULL, scan_lease_until = NULL WHERE batch_id = %s",
                         (files_archived, isoformat(utcnow()), batch_id))
        self.db.write(body)

    def delete_batch(self, batch_id: str) -> None:
        def body(conn: Conn) -> None:
            self._batch_state(conn, batch_id, "FOR UPDATE")
            conn.execute("DELETE FROM batches WHERE batch_id = %s", (batch_id,))
        self.db.write(body)

    # -- files -------------------------------------------------------------

    def add_files(self, batch_id: str, new_files: Iterable[NewFile] | EncodedFiles, *,
                  durable: bool = True, seen_archived: Sequence[str] = ()) -> int:
        """Add files in one transaction, in chunks of consecutive keys (see CHUNK_FILES) that hosts
        claim; paths already in the batch are left as they are (and in their chunk).
        ``durable`` is SQLite's concern: every PostgreSQL commit is durable."""
        encoded = new_files if isinstance(new_files, EncodedFiles) else self.encode_files(new_files)
        now = isoformat(utcnow())

        def body(conn: Conn) -> int:
            # FOR UPDATE: the chunk numbering is the batch row's, one scan group at a time.
            row = conn.execute("SELECT state, next_chunk, settings FROM batches WHERE batch_id = %s FOR UPDATE",
                               (batch_id,)).fetchone()
            if row is None:
                raise batch_not_found(batch_id, self.location, hint=False)
            check_accepts_files(batch_id, BatchState(row["state"]))
            if seen_archived:
                self._mark_seen(conn, batch_id, seen_archived)
            if not encoded.count:
                return 0
            first = int(row["next_chunk"])
            per = max(MIN_CHUNK_FILES, min(CHUNK_FILES, -(-encoded.count // 8)))
            settings = BatchSettings.from_json(row["settings"])
            if settings is not None and settings.pack_under:
                chunk_of = packed_chunks(json.loads(encoded.rows_json), settings.pack_under,
                                         settings.shard_size, per)
                chunks, chunk_sql = chunk_of[-1] + 1, "%(first)s + (%(chunk_of)s::int[])[ord]"
            else:
                chunk_of, chunks = [], -(-encoded.count // per)
                chunk_sql = "%(first)s + (ord - 1) / %(per)s"
            added = conn.execute(
                "WITH input AS (SELECT r, ord FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS t(r, ord)), "
                "added AS (INSERT INTO files (batch_id, rel_path, key, size, mtime_ns, state, error, identity, "
                "updated_at, chunk_no) SELECT %(b)s, r->>0, r->>1, (r->>2)::bigint, (r->>3)::bigint, r->>4, r->>5, "
                f"r->>6, %(now)s, {chunk_sql} FROM input ORDER BY r->>1 "
                "ON CONFLICT (batch_id, rel_path) DO NOTHING RETURNING chunk_no) "
                "INSERT INTO chunks (batch_id, chunk_no, files) SELECT %(b)s, chunk_no, count(*) FROM added "
                "GROUP BY chunk_no RETURNING files",
                {"rows": encoded.rows_json, "b": batch_id, "now": now, "first": first, "per": per,
                 "chunk_of": chunk_of}).fetchall()
            count = sum(int(r["files"]) for r in added)
            conn.execute("UPDATE batches SET next_chunk = %s WHERE batch_id = %s", (first + chunks, batch_id))
            return count

        if "\\u0000" in encoded.rows_json:
            raise JournalError(f"batch {batch_id}: a path holds a NUL character, which PostgreSQL cannot store")
        return self.db.write(body)

    def count_skipped(self, batch_id: str, reasons: Iterable[str]) -> int:
        prefixes = list(reasons)
        if not prefixes:
            return 0
        match = " OR ".join("substr(error, 1, %s) = %s" for _ in prefixes)
        args: list[Any] = [batch_id, FileState.SKIPPED.value]
        for prefix in prefixes:
            args += [len(prefix), prefix]
        rows = self.db.query(f"SELECT count(*) AS n FROM files WHERE batch_id = %s AND state = %s AND ({match})",
                             tuple(args))
        return int(rows[0]["n"])

    # -- the archived index -------------------------------------------------

    def _source(self, destination: Destination) -> int | None:
        rows = self.db.query("SELECT source_id FROM archive_sources WHERE source_root = %s AND bucket = %s "
                             "AND prefix = %s AND endpoint_url = %s",
                             (*destination[:3], destination.endpoint_url or ""))
        return None if not rows else int(rows[0]["source_id"])

    def find_archived(self, destination: Destination, candidates: Sequence[tuple[str, int, int]]) -> set[str]:
        source = self._source(destination)
        # No stored path holds a NUL (PostgreSQL text cannot): such a candidate matches nothing.
        wanted = [c for c in candidates if "\x00" not in c[0]]
        if source is None or not wanted:
            return set()
        rows = self.db.query(
            "SELECT a.rel_path FROM jsonb_array_elements(%s::jsonb) j JOIN archived a ON a.source_id = %s "
            "AND a.rel_path = j->>0 AND a.size = (j->>1)::bigint AND a.mtime_ns = (j->>2)::bigint",
            (json.dumps(wanted, ensure_ascii=False), source))
        return {str(row["rel_path"]) for row in rows}

    @staticmethod
    def _mark_seen(conn: Conn, batch_id: str, rel_paths: Sequence[str]) -> None:
        conn.execute(
            "UPDATE archived SET seen_by = %(b)s FROM archive_sources s JOIN batches b ON s.source_root = b.source_root "
            "AND s.bucket = b.bucket AND s.prefix = b.prefix AND s.endpoint_url = coalesce(b.endpoint_url, '') "
            "WHERE b.batch_id = %(b)s AND archived.source_id = s.source_id AND archived.rel_path = ANY(%(paths)s) "
            "AND (archived.seen_by IS NULL OR archived.seen_by < %(b)s)",
            {"b": batch_id, "paths": list(rel_paths)})

    def iter_archived(self, destination: Destination, page_size: int = 2000) -> Iterator[ArchivedFile]:
        source = self._source(destination)
        if source is None:
            return
        last = ""
        while True:
            rows = self.db.query("SELECT rel_path, size, mtime_ns, identity, batch_id FROM archived "
                                 "WHERE source_id = %s AND rel_path > %s ORDER BY rel_path LIMIT %s",
                                 (source, last, page_size))
            if not rows:
                return
            for row in rows:
                yield ArchivedFile(**row)
            last = rows[-1]["rel_path"]

    def seal_batch(self, batch_id: str, *, manifest_key: str, finalized_at: str,
                   covers: Callable[[str], bool] | None = None, summary_sha256: str | None = None) -> BatchRecord:
        """-> enqueued, and the archived index updated, in one transaction (see SQLiteJournal.seal_batch)."""
        def body(conn: Conn) -> None:
            check_batch_move(batch_id, self._batch_state(conn, batch_id, "FOR UPDATE"), BatchState.ENQUEUED)
            # Two finalizing batches of one destination would otherwise race to create its source row.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('archup-archive-sources'))")
            dest = conn.execute("SELECT source_root, bucket, prefix, coalesce(endpoint_url, '') AS endpoint_url "
                                "FROM batches WHERE batch_id = %s", (batch_id,)).fetchone()
            assert dest is not None
            values = (dest["source_root"], dest["bucket"], dest["prefix"], dest["endpoint_url"])
            conn.execute("INSERT INTO archive_sources (source_root, bucket, prefix, endpoint_url) "
                         "VALUES (%s,%s,%s,%s) ON CONFLICT DO NOTHING", values)
            source = conn.execute("SELECT source_id FROM archive_sources WHERE source_root = %s AND bucket = %s "
                                  "AND prefix = %s AND endpoint_url = %s", values).fetchone()
            assert source is not None
            source_id = source["source_id"]
            conn.execute(
                "INSERT INTO archived (source_id, rel_path, size, mtime_ns, identity, batch_id, seen_by) "
                "SELECT %(s)s, rel_path, size, mtime_ns, identity, batch_id, batch_id FROM files "
                "WHERE batch_id = %(b)s AND state = 'uploaded' "
                "ON CONFLICT (source_id, rel_path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "identity = excluded.identity, batch_id = excluded.batch_id, seen_by = excluded.seen_by "
                "WHERE excluded.batch_id >= archived.batch_id", {"s": source_id, "b": batch_id})
            not_found = ("FROM archived WHERE source_id = %(s)s AND (seen_by IS NULL OR seen_by < %(b)s) "
                         "AND NOT EXISTS (SELECT 1 FROM files f WHERE f.batch_id = %(b)s "
                         "AND f.rel_path = archived.rel_path AND f.state != 'skipped')")
            args = {"s": source_id, "b": batch_id}
            if covers is None:
                conn.execute(f"DELETE {not_found}", args)
            else:
                gone = [row["rel_path"] for row in conn.execute(f"SELECT rel_path {not_found}", args)
                        if covers(row["rel_path"])]
                if gone:
                    conn.execute("DELETE FROM archived WHERE source_id = %s AND rel_path = ANY(%s)",
                                 (source_id, gone))
            conn.execute("UPDATE batches SET state = %s, error = NULL, updated_at = %s, manifest_key = %s, "
                         "finalized_at = %s, summary_sha256 = %s, finalizer = NULL, finalize_lease_until = NULL "
                         "WHERE batch_id = %s",
                         (BatchState.ENQUEUED.value, isoformat(utcnow()), manifest_key, finalized_at, summary_sha256,
                          batch_id))
        self.db.write(body)
        return self.get_batch(batch_id)

    # -- forgetting ----------------------------------------------------------

    def forget_batch(self, batch_id: str) -> bool:
        def body(conn: Conn) -> bool:
            row = conn.execute("SELECT state, forgotten_at FROM batches WHERE batch_id = %s FOR UPDATE",
                               (batch_id,)).fetchone()
            if row is None:
                raise batch_not_found(batch_id, self.location, hint=False)
            if not BatchState(row["state"]).terminal or row["forgotten_at"] is not None:
                return False
            counts = {state.value: [0, 0] for state in FileState}
            for r in conn.execute("SELECT state, count(*) AS n, coalesce(sum(size), 0) AS total FROM files "
                                  "WHERE batch_id = %s GROUP BY state", (batch_id,)):
                counts[r["state"]] = [int(r["n"]), int(r["total"])]
            conn.execute("DELETE FROM parts WHERE batch_id = %s", (batch_id,))
            conn.execute("DELETE FROM shards WHERE batch_id = %s", (batch_id,))  # their parts cascade
            conn.execute("DELETE FROM files WHERE batch_id = %s", (batch_id,))
            conn.execute("DELETE FROM chunks WHERE batch_id = %s", (batch_id,))
            conn.execute("UPDATE batches SET forgotten_at = %s, file_counts = %s WHERE batch_id = %s",
                         (isoformat(utcnow()), json.dumps(counts, sort_keys=True), batch_id))
            return True
        return self.db.write(body)

    def size_on_disk(self) -> int:
        return self.db.size_on_disk()

    def compact(self) -> None:
        self.db.compact()

    def get_file(self, batch_id: str, rel_path: str) -> FileRecord:
        rows = self.db.query(f"SELECT {FILE_COLUMNS} FROM files WHERE batch_id = %s AND rel_path = %s",
                             (batch_id, rel_path))
        if not rows:
            raise FileNotInBatch(batch_id, rel_path)
        return file_from_row(rows[0])

    # -- progress on one file, fenced ------------------------------------------

    def bind_worker(self, worker_id: str | None) -> None:
        """From now on this handle records progress only on files of chunks ``worker_id`` holds."""
        self.worker_id = worker_id

    def _fence(self, conn: Conn, batch_id: str, rel_path: str, chunk_no: int) -> None:
        """Refuse the write unless this handle's worker owns the file's chunk. KEY SHARE holds
        the chunk row to the commit: a takeover (FOR UPDATE) waits for it, or skips the chunk."""
        if self.worker_id is None:
            return
        row = conn.execute("SELECT owner FROM chunks WHERE batch_id = %s AND chunk_no = %s FOR KEY SHARE",
                           (batch_id, chunk_no)).fetchone()
        if row is None or row["owner"] != self.worker_id:
            raise LeaseLost(f"batch {batch_id}: file {rel_path!r} is no longer this host's to record (its claim "
                            f"ran out and {'another host took it' if row and row['owner'] else 'it was released'}); "
                            "this host stops sending")

    def _file_row(self, conn: Conn, batch_id: str, rel_path: str) -> dict[str, Any]:
        row = conn.execute("SELECT state, chunk_no, upload_id FROM files WHERE batch_id = %s AND rel_path = %s "
                           "FOR UPDATE", (batch_id, rel_path)).fetchone()
        if row is None:
            self._batch_state(conn, batch_id)  # an unknown batch is the clearer error
            raise FileNotInBatch(batch_id, rel_path)
        return row

    def _move_file(self, conn: Conn, batch_id: str, rel_path: str, target: FileState, *,
                   fenced: bool = True) -> FileState:
        row = self._file_row(conn, batch_id, rel_path)
        current = FileState(row["state"])
        check_file_move(batch_id, rel_path, current, target, self._batch_state(conn, batch_id))
        if fenced:
            self._fence(conn, batch_id, rel_path, row["chunk_no"])
        return current

    def _require_uploading(self, conn: Conn, batch_id: str, rel_path: str) -> None:
        row = self._file_row(conn, batch_id, rel_path)
        check_uploading(batch_id, rel_path, FileState(row["state"]))
        self._fence(conn, batch_id, rel_path, row["chunk_no"])

    def start_file(self, batch_id: str, rel_path: str) -> None:
        def body(conn: Conn) -> None:
            self._move_file(conn, batch_id, rel_path, FileState.UPLOADING)
            conn.execute("UPDATE files SET state = %s, attempts = attempts + 1, error = NULL, updated_at = %s "
                         "WHERE batch_id = %s AND rel_path = %s",
                         (FileState.UPLOADING.value, isoformat(utcnow()), batch_id, rel_path))
        self.db.write(body)

    def record_upload_id(self, batch_id: str, rel_path: str, upload_id: str, part_size: int,
                         sha256: str | None = None, checksum_kind: str | None = None) -> None:
        def body(conn: Conn) -> None:
            self._require_uploading(conn, batch_id, rel_path)
            conn.execute("UPDATE files SET upload_id = %s, part_size = %s, sha256 = %s, checksum_kind = %s, "
                         "updated_at = %s WHERE batch_id = %s AND rel_path = %s",
                         (upload_id, part_size, sha256, checksum_kind, isoformat(utcnow()), batch_id, rel_path))
        self.db.write(body)

    def record_part(self, batch_id: str, rel_path: str, part: PartRecord) -> None:
        def body(conn: Conn) -> None:
            self._require_uploading(conn, batch_id, rel_path)
            conn.execute(
                "INSERT INTO parts (batch_id, rel_path, part_number, size, etag, checksum) "
                "VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (batch_id, rel_path, part_number) DO UPDATE SET "
                "size = excluded.size, etag = excluded.etag, checksum = excluded.checksum",
                (batch_id, rel_path, part.part_number, part.size, part.etag, part.checksum))
        self.db.write(body)

    def upload_ids(self, batch_id: str) -> set[str]:
        rows = self.db.query("SELECT upload_id FROM files WHERE batch_id = %(b)s AND upload_id IS NOT NULL "
                             "UNION ALL SELECT upload_id FROM shards WHERE batch_id = %(b)s AND state = 'uploading' "
                             "AND upload_id IS NOT NULL", {"b": batch_id})
        return {row["upload_id"] for row in rows}

    def list_parts(self, batch_id: str, rel_path: str) -> list[PartRecord]:
        rows = self.db.query("SELECT part_number, size, etag, checksum FROM parts WHERE batch_id = %s "
                             "AND rel_path = %s ORDER BY part_number", (batch_id, rel_path))
        return [PartRecord(**row) for row in rows]

    def complete_file(self, batch_id: str, rel_path: str, *, sha256: str, etag: str) -> None:
        def body(conn: Conn) -> None:
            self._move_file(conn, batch_id, rel_path, FileState.UPLOADED)
            conn.execute("UPDATE files SET state = %s, sha256 = %s, etag = %s, error = NULL, updated_at = %s "
                         "WHERE batch_id = %s AND rel_path = %s",
                         (FileState.UPLOADED.value, sha256, etag, isoformat(utcnow()), batch_id, rel_path))
        self.db.write(body)

    def _completion_statement(self, batch_id: str, completions: list[tuple[str, str, str]],
                              now: str) -> tuple[str, dict[str, Any]]:
        """complete_files' one statement and its arguments. One statement (round trips are what a
        remote database costs): the batch row locked FOR SHARE and its state checked, as
        _move_file does; bound to a worker, the chunks of these files that it holds, locked to
        the commit (see _fence)."""
        args: dict[str, Any] = {"b": batch_id, "rows": json.dumps(completions, ensure_ascii=False),
                                "now": now, "open": list(_OPEN_FILE_STATES),
                                "live": [state.value for state in BatchState if not state.terminal]}
        mine = fence = ""
        if self.worker_id is not None:
            # The group's chunk numbers are computed once (ARRAY(...): an InitPlan), then looked up
            # by key. Written as a semi-join (chunk_no IN (SELECT ...)), the planner may drive it
            # from the worker's chunks, done ones included (a done chunk keeps its owner), and
            # probe the whole group once per chunk: with the statistics the fill left (every
            # owner NULL: one row expected) it did, and a worker's completions cost grew with the
            # chunks it had finished, until an autovacuum's ANALYZE of chunks, or never.
            mine = (", mine AS (SELECT c.chunk_no FROM chunks c WHERE c.batch_id = %(b)s "
                    "AND c.chunk_no = ANY(ARRAY(SELECT DISTINCT g.chunk_no FROM jsonb_array_elements(%(rows)s::jsonb) "
                    "AS j(r) JOIN files g ON g.batch_id = %(b)s AND g.rel_path = j.r->>0)) "
                    "AND c.owner = %(w)s FOR KEY SHARE OF c)")
            fence = "AND f.chunk_no IN (SELECT chunk_no FROM mine)"
            args["w"] = self.worker_id
        return (f"WITH b AS (SELECT state FROM batches WHERE batch_id = %(b)s FOR SHARE){mine}, "
                "moved AS (UPDATE files f SET state = 'uploaded', sha256 = i.r->>1, etag = i.r->>2, error = NULL, "
                "updated_at = %(now)s FROM jsonb_array_elements(%(rows)s::jsonb) AS i(r) "
                f"WHERE f.batch_id = %(b)s AND f.rel_path = i.r->>0 AND f.state = ANY(%(open)s) {fence} "
                "AND (SELECT state FROM b) = ANY(%(live)s) RETURNING f.rel_path) "
                "SELECT (SELECT state FROM b) AS batch_state, ARRAY(SELECT rel_path FROM moved) AS moved", args)

    def complete_files(self, batch_id: str,
                       completions: list[tuple[str, str, str]]) -> list[tuple[str, IllegalTransition]]:
        """Many (rel_path, sha256, etag) -> uploaded in one transaction: one statement moves every
        file that may move (and, bound to a worker, lies in a chunk it holds); the rest are
        looked at one by one for the reason they were refused, which is rare."""
        if not completions:
            return []
        sql, args = self._completion_statement(batch_id, completions, isoformat(utcnow()))

        def body(conn: Conn) -> list[tuple[str, IllegalTransition]]:
            row = conn.execute(sql, args).fetchone()
            assert row is not None
            if row["batch_state"] is None:
                raise batch_not_found(batch_id, self.location, hint=False)
            check_files_open(batch_id, BatchState(row["batch_state"]))
            moved = set(row["moved"])
            refused: list[tuple[str, IllegalTransition]] = []
            for rel_path, _sha256, _etag in completions:
                if rel_path in moved:
                    continue
                try:
                    # LeaseLost propagates: the whole group is left uncommitted, and this host stops.
                    self._move_file(conn, batch_id, rel_path, FileState.UPLOADED)
                except IllegalTransition as error:
                    refused.append((rel_path, error))
            return refused
        return self.db.write(body)

    def fail_file(self, batch_id: str, rel_path: str, error: str) -> None:
        def body(conn: Conn) -> None:
            self._move_file(conn, batch_id, rel_path, FileState.FAILED)
            conn.execute("UPDATE files SET state = %s, error = %s, upload_id = NULL, checksum_kind = NULL, "
                         "sha256 = NULL, updated_at = %s WHERE batch_id = %s AND rel_path = %s",
                         (FileState.FAILED.value, error, isoformat(utcnow()), batch_id, rel_path))
            conn.execute("DELETE FROM parts WHERE batch_id = %s AND rel_path = %s", (batch_id, rel_path))
        self.db.write(body)

    def skip_file(self, batch_id: str, rel_path: str, reason: str) -> None:
        def body(conn: Conn) -> None:
            self._move_file(conn, batch_id, rel_path, FileState.SKIPPED)
            conn.execute("UPDATE files SET state = %s, error = %s, upload_id = NULL, checksum_kind = NULL, "
                         "sha256 = NULL, etag = NULL, updated_at = %s WHERE batch_id = %s AND rel_path = %s",
                         (FileState.SKIPPED.value, reason, isoformat(utcnow()), batch_id, rel_path))
            conn.execute("DELETE FROM parts WHERE batch_id = %s AND rel_path = %s", (batch_id, rel_path))
        self.db.write(body)

    def reset_file(self, batch_id: str, rel_path: str, reason: str) -> None:
        """-> pending, forgetting any upload. Not fenced: finalize's read-back calls it once every
        file is uploaded, and reopens the file's chunk so that a host sends it again."""
        def body(conn: Conn) -> None:
            self._move_file(conn, batch_id, rel_path, FileState.PENDING, fenced=False)
            conn.execute("UPDATE files SET state = %s, error = %s, upload_id = NULL, checksum_kind = NULL, "
                         "sha256 = NULL, etag = NULL, updated_at = %s WHERE batch_id = %s AND rel_path = %s",
                         (FileState.PENDING.value, reason, isoformat(utcnow()), batch_id, rel_path))
            conn.execute("DELETE FROM parts WHERE batch_id = %s AND rel_path = %s", (batch_id, rel_path))
            # A done chunk (finalize's read-back) is reopened for any host; a chunk still held
            # (a sender starting a lost upload over) stays its holder's.
            conn.execute("UPDATE chunks SET done = false, owner = NULL, lease_until = NULL WHERE batch_id = %s "
                         "AND done AND chunk_no = (SELECT chunk_no FROM files WHERE batch_id = %s AND rel_path = %s)",
                         (batch_id, batch_id, rel_path))
        self.db.write(body)

    def refresh_file(self, batch_id: str, rel_path: str, size: int, mtime_ns: int,
                     identity: str | None = None) -> FileRecord:
        def body(conn: Conn) -> None:
            row = self._file_row(conn, batch_id, rel_path)
            check_rescannable(batch_id, rel_path, FileState(row["state"]), row["upload_id"])
            self._fence(conn, batch_id, rel_path, row["chunk_no"])
            conn.execute("UPDATE files SET size = %s, mtime_ns = %s, identity = %s, part_size = NULL, "
                         "updated_at = %s WHERE batch_id = %s AND rel_path = %s",
                         (size, mtime_ns, identity, isoformat(utcnow()), batch_id, rel_path))
        self.db.write(body)
        return self.get_file(batch_id, rel_path)

    def iter_files(self, batch_id: str, states: Iterable[FileState] | None = None,
                   page_size: int = 2000, *, packed: bool | None = None) -> Iterator[FileRecord]:
        wanted = [state.value for state in states] if states is not None else None
        if wanted == []:
            return
        filter_sql = " AND state = ANY(%s)" if wanted else ""
        if packed is not None:  # only the files in shards, or only those of their own
            filter_sql += " AND shard_no IS NOT NULL" if packed else " AND shard_no IS NULL"
        last_key = ""
        while True:
            args: tuple[Any, ...] = (batch_id, last_key, *((wanted,) if wanted else ()), page_size)
            rows = self.db.query(f"SELECT {FILE_COLUMNS} FROM files WHERE batch_id = %s AND key > %s{filter_sql} "
                                 "ORDER BY key LIMIT %s", args)
            if not rows:
                return
            for row in rows:
                yield file_from_row(row)
            last_key = rows[-1]["key"]

    def get_state(self, batch_id: str, problem_limit: int = 20) -> BatchSummary:
        with self.db.snapshot() as conn:
            row = conn.execute(f"SELECT {BATCH_COLUMNS}, file_counts FROM batches WHERE batch_id = %s",
                               (batch_id,)).fetchone()
            if row is None:
                raise batch_not_found(batch_id, self.location)
            counts = {state: 0 for state in FileState}
            sizes = {state: 0 for state in FileState}
            per_state: Iterable[tuple[str, int, int, str | None]]
            if row["file_counts"]:
                per_state = [(state, *pair, None) for state, pair in json.loads(row["file_counts"]).items()]
            else:
                per_state = [(r["state"], r["n"], r["total"], r["changed"]) for r in conn.execute(
                    "SELECT state, count(*) AS n, coalesce(sum(size), 0) AS total, max(updated_at) AS changed "
                    "FROM files WHERE batch_id = %s GROUP BY state", (batch_id,))]
            last_change: str | None = None
            for state, count, total, changed in per_state:
                counts[FileState(state)] = int(count)
                sizes[FileState(state)] = int(total)
                last_change = max(filter(None, (last_change, changed)), default=None)
            listed: dict[FileState, list[FileRecord]] = {}
            for state in (FileState.FAILED, FileState.SKIPPED):
                if not counts[state] or not problem_limit:
                    listed[state] = []
                    continue
                limit = "" if problem_limit < 0 else f" LIMIT {int(problem_limit)}"
                listed[state] = [file_from_row(r) for r in conn.execute(
                    f"SELECT {FILE_COLUMNS} FROM files WHERE batch_id = %s AND state = %s ORDER BY key{limit}",
                    (batch_id, state.value))]
            shards = {ShardState(r["state"]): (int(r["n"]), int(r["total"])) for r in conn.execute(
                "SELECT state, count(*) AS n, coalesce(sum(size), 0) AS total FROM shards WHERE batch_id = %s "
                "GROUP BY state", (batch_id,))}
        return BatchSummary(batch_from_row(row), counts, sizes, listed[FileState.FAILED],
                            listed[FileState.SKIPPED], problem_limit, last_file_change=last_change,
                            shards={state: pair[0] for state, pair in shards.items()},
                            shard_bytes={state: pair[1] for state, pair in shards.items()})

    # -- packed shards, fenced ----------------------------------------------------
    #
    # A shard is one unit of work: one host plans it, sends it and completes or drops it. On a
    # shared journal each of those writes checks, in its own transaction, that this handle's
    # worker owns the chunk of every member (the file fence, over the set), holding those chunk
    # rows FOR KEY SHARE to the commit; members are handled as sets (jsonb), one statement each.

    def _fence_members(self, conn: Conn, batch_id: str, what: str, members_sql: str, args: dict[str, Any]) -> None:
        """LeaseLost unless this handle's worker owns the chunk of every file ``members_sql``
        selects (a query of ``files`` rows by ``%(b)s``), those chunk rows held to the commit."""
        if self.worker_id is None:
            return
        row = conn.execute(
            "WITH fence AS (SELECT c.chunk_no, c.owner FROM chunks c WHERE c.batch_id = %(b)s "
            f"AND c.chunk_no IN (SELECT m.chunk_no FROM ({members_sql}) AS m) FOR KEY SHARE OF c) "
            "SELECT ARRAY(SELECT chunk_no FROM fence WHERE owner IS DISTINCT FROM %(w)s ORDER BY chunk_no) AS lost, "
            "bool_or(owner IS NOT NULL) FILTER (WHERE owner IS DISTINCT FROM %(w)s) AS taken FROM fence",
            {**args, "b": batch_id, "w": self.worker_id}).fetchone()
        assert row is not None
        if row["lost"]:
            raise LeaseLost(f"batch {batch_id}: {what} is no longer this host's to record (the claim on its "
                            f"chunk(s) {', '.join(map(str, row['lost'][:5]))} ran out and "
                            f"{'another host took it' if row['taken'] else 'it was released'}); "
                            "this host stops sending")

    def _shard_row(self, conn: Conn, batch_id: str, shard_no: int) -> dict[str, Any] | None:
        """The shard's row, locked FOR UPDATE (its changes are one at a time); the batch row FOR SHARE."""
        row = conn.execute(
            "WITH b AS (SELECT state FROM batches WHERE batch_id = %(b)s FOR SHARE) "
            "SELECT (SELECT state FROM b) AS batch_state, s.state, s.members FROM (SELECT 1) AS one "
            "LEFT JOIN (SELECT state, members FROM shards WHERE batch_id = %(b)s AND shard_no = %(n)s FOR UPDATE) AS s "
            "ON true", {"b": batch_id, "n": shard_no}).fetchone()
        assert row is not None
        if row["batch_state"] is None:
            raise batch_not_found(batch_id, self.location, hint=False)
        return None if row["state"] is None else row

    def _uploading_shard(self, conn: Conn, batch_id: str, shard_no: int) -> int:
        """Check the shard is uploading and this worker's to change (the fence); its member count."""
        row = self._shard_row(conn, batch_id, shard_no)
        state = None if row is None else ShardState(row["state"])
        if row is None or state is not ShardState.UPLOADING:
            raise shard_not_uploading(batch_id, shard_no, state)
        self._fence_members(conn, batch_id, f"shard {shard_no}",
                            "SELECT chunk_no FROM files WHERE batch_id = %(b)s AND shard_no = %(n)s", {"n": shard_no})
        return int(row["members"])

    def plan_shard(self, batch_id: str, members: Sequence[tuple[str, int]], size: int) -> ShardRecord:
        now = isoformat(utcnow())
        args: dict[str, Any] = {"b": batch_id, "m": json.dumps([list(m) for m in members], ensure_ascii=False),
                                "now": now, "size": size, "count": len(members)}

        def body(conn: Conn) -> int:
            # Numbers are max + 1, so planners of one batch (on any host) take turns for the
            # number alone; this lock is held to the commit and blocks no file write.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('archup-shards:' || %s))", (batch_id,))
            row = conn.execute(
                "SELECT state, prefix, (SELECT coalesce(max(shard_no), 0) + 1 FROM shards WHERE batch_id = %(b)s) "
                "AS next FROM batches WHERE batch_id = %(b)s FOR SHARE", args).fetchone()
            if row is None:
                raise batch_not_found(batch_id, self.location, hint=False)
            check_accepts_files(batch_id, BatchState(row["state"]))
            shard_no = int(row["next"])
            self._fence_members(conn, batch_id, f"a member of shard {shard_no}",
                                "SELECT f.chunk_no FROM files f JOIN jsonb_array_elements(%(m)s::jsonb) AS j(r) "
                                "ON f.batch_id = %(b)s AND f.rel_path = j.r->>0", args)
            moved = conn.execute(
                "WITH s AS (INSERT INTO shards (batch_id, shard_no, key, size, members, state, updated_at) "
                "VALUES (%(b)s, %(n)s, %(key)s, %(size)s, %(count)s, 'uploading', %(now)s)), "
                "moved AS (UPDATE files f SET state = 'uploading', shard_no = %(n)s, shard_offset = (j.r->>1)::bigint, "
                "attempts = f.attempts + 1, error = NULL, updated_at = %(now)s "
                "FROM jsonb_array_elements(%(m)s::jsonb) AS j(r) WHERE f.batch_id = %(b)s AND f.rel_path = j.r->>0 "
                "AND f.state IN ('pending', 'failed') AND f.shard_no IS NULL AND f.upload_id IS NULL RETURNING 1) "
                "SELECT count(*) AS n FROM moved",
                {**args, "n": shard_no, "key": shard_key(f"{row['prefix']}{batch_id}/", shard_no)}).fetchone()
            assert moved is not None
            if int(moved["n"]) != len(members):  # raised inside the transaction: nothing is planned
                raise members_not_plannable(batch_id, shard_no, len(members), int(moved["n"]))
            return shard_no

        return self.get_shard(batch_id, self.db.write(body))

    def get_shard(self, batch_id: str, shard_no: int) -> ShardRecord:
        rows = self.db.query(f"SELECT {SHARD_COLUMNS} FROM shards WHERE batch_id = %s AND shard_no = %s",
                             (batch_id, shard_no))
        if not rows:
            raise shard_not_uploading(batch_id, shard_no, None)
        return shard_from_row(rows[0])

    def iter_shards(self, batch_id: str, states: Iterable[ShardState] | None = None) -> Iterator[ShardRecord]:
        wanted = None if states is None else [state.value for state in states]
        if wanted == []:
            return
        filter_sql = "" if wanted is None else " AND state = ANY(%s)"
        last = 0
        while True:
            rows = self.db.query(f"SELECT {SHARD_COLUMNS} FROM shards WHERE batch_id = %s AND shard_no > %s"
                                 f"{filter_sql} ORDER BY shard_no LIMIT 1000",
                                 (batch_id, last, *(() if wanted is None else (wanted,))))
            if not rows:
                return
            for row in rows:
                yield shard_from_row(row)
            last = rows[-1]["shard_no"]

    def shard_members(self, batch_id: str, shard_no: int) -> list[FileRecord]:
        return [file_from_row(row) for row in self.db.query(
            f"SELECT {FILE_COLUMNS} FROM files WHERE batch_id = %s AND shard_no = %s ORDER BY shard_offset",
            (batch_id, shard_no))]

    def record_shard_upload(self, batch_id: str, shard_no: int, upload_id: str, part_size: int,
                            checksum_kind: str | None) -> None:
        def body(conn: Conn) -> None:
            self._uploading_shard(conn, batch_id, shard_no)
            conn.execute(
                "WITH s AS (UPDATE shards SET upload_id = %(u)s, part_size = %(p)s, checksum_kind = %(k)s, "
                "updated_at = %(now)s WHERE batch_id = %(b)s AND shard_no = %(n)s) "
                "DELETE FROM shard_parts WHERE batch_id = %(b)s AND shard_no = %(n)s",
                {"u": upload_id, "p": part_size, "k": checksum_kind, "now": isoformat(utcnow()), "b": batch_id,
                 "n": shard_no})
        self.db.write(body)

    def record_shard_part(self, batch_id: str, shard_no: int, part: PartRecord) -> None:
        def body(conn: Conn) -> None:
            self._uploading_shard(conn, batch_id, shard_no)
            conn.execute(
                "INSERT INTO shard_parts (batch_id, shard_no, part_number, size, etag, checksum) "
                "VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (batch_id, shard_no, part_number) DO UPDATE SET "
                "size = excluded.size, etag = excluded.etag, checksum = excluded.checksum",
                (batch_id, shard_no, part.part_number, part.size, part.etag, part.checksum))
        self.db.write(body)

    def list_shard_parts(self, batch_id: str, shard_no: int) -> list[PartRecord]:
        rows = self.db.query("SELECT part_number, size, etag, checksum FROM shard_parts WHERE batch_id = %s "
                             "AND shard_no = %s ORDER BY part_number", (batch_id, shard_no))
        return [PartRecord(**row) for row in rows]

    def complete_shard(self, batch_id: str, shard_no: int, *, sha256: str, etag: str,
                       digests: Sequence[tuple[str, str]]) -> None:
        now = isoformat(utcnow())

        def body(conn: Conn) -> None:
            members = self._uploading_shard(conn, batch_id, shard_no)
            row = conn.execute(
                "WITH moved AS (UPDATE files f SET state = 'uploaded', sha256 = j.r->>1, etag = NULL, error = NULL, "
                "updated_at = %(now)s FROM jsonb_array_elements(%(d)s::jsonb) AS j(r) WHERE f.batch_id = %(b)s "
                "AND f.rel_path = j.r->>0 AND f.shard_no = %(n)s AND f.state = 'uploading' RETURNING 1), "
                "s AS (UPDATE shards SET state = 'uploaded', sha256 = %(sha)s, etag = %(etag)s, error = NULL, "
                "updated_at = %(now)s WHERE batch_id = %(b)s AND shard_no = %(n)s), "
                "p AS (DELETE FROM shard_parts WHERE batch_id = %(b)s AND shard_no = %(n)s) "
                "SELECT count(*) AS n FROM moved",
                {"now": now, "d": json.dumps([list(d) for d in digests], ensure_ascii=False), "b": batch_id,
                 "n": shard_no, "sha": sha256, "etag": etag}).fetchone()
            assert row is not None
            if int(row["n"]) != members or len(digests) != members:  # nothing is recorded
                raise members_mismatch(batch_id, shard_no, members, int(row["n"]))
        self.db.write(body)

    def drop_shard(self, batch_id: str, shard_no: int, reason: str,
                   problems: Mapping[str, tuple[FileState, str]]) -> None:
        """An uploading shard is dropped by its sender (fenced); an uploaded one by finalize's
        read-back, which is not fenced (as reset_file) and reopens its members' done chunks."""
        now = isoformat(utcnow())

        def body(conn: Conn) -> None:
            row = self._shard_row(conn, batch_id, shard_no)
            state = None if row is None else ShardState(row["state"])
            if state is None or state is ShardState.DROPPED:
                raise shard_not_uploading(batch_id, shard_no, state)
            if state is ShardState.UPLOADING:
                self._fence_members(conn, batch_id, f"shard {shard_no}",
                                    "SELECT chunk_no FROM files WHERE batch_id = %(b)s AND shard_no = %(n)s",
                                    {"n": shard_no})
            # Its members leave it: to their problem's state and reason, or pending for a new shard.
            conn.execute(
                "WITH moved AS (UPDATE files f SET state = coalesce(%(p)s::jsonb -> f.rel_path ->> 0, 'pending'), "
                "error = coalesce(%(p)s::jsonb -> f.rel_path ->> 1, %(why)s), shard_no = NULL, shard_offset = NULL, "
                "updated_at = %(now)s WHERE f.batch_id = %(b)s AND f.shard_no = %(n)s RETURNING f.chunk_no), "
                "c AS (UPDATE chunks SET done = false, owner = NULL, lease_until = NULL WHERE batch_id = %(b)s "
                "AND done AND %(reopen)s AND chunk_no IN (SELECT chunk_no FROM moved)), "
                "s AS (UPDATE shards SET state = 'dropped', error = %(why)s, updated_at = %(now)s "
                "WHERE batch_id = %(b)s AND shard_no = %(n)s) "
                "DELETE FROM shard_parts WHERE batch_id = %(b)s AND shard_no = %(n)s",
                {"p": json.dumps({path: [target.value, why] for path, (target, why) in problems.items()},
                                 ensure_ascii=False),
                 "why": reason, "now": now, "b": batch_id, "n": shard_no,
                 "reopen": state is ShardState.UPLOADED})
        self.db.write(body)

    # -- several hosts: workers, claims, elections --------------------------------

    def register_worker(self, batch_id: str, worker_id: str, lease: float) -> None:
        """This process joins the batch: its row in the workers view, and its handle bound to it."""
        def body(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO workers (worker_id, batch_id, host, pid, started_at, heartbeat_at, lease_until) "
                "VALUES (%s, %s, %s, %s, now(), now(), now() + make_interval(secs => %s)) "
                "ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = now(), lease_until = excluded.lease_until, "
                "ended_at = NULL", (worker_id, batch_id, socket.gethostname(), os.getpid(), lease))
        self.db.write(body)
        self.bind_worker(worker_id)

    def heartbeat(self, batch_id: str, worker_id: str, lease: float, files_done: int, bytes_done: int) -> int:
        """Extend this worker's leases (its chunks, its scan or finalize election); returns how
        many chunks it still holds. One statement, one round trip."""
        row = self.db.write(lambda conn: conn.execute(
            "WITH w AS (UPDATE workers SET heartbeat_at = now(), lease_until = now() + make_interval(secs => %(l)s), "
            "files_done = %(f)s, bytes_done = %(by)s WHERE worker_id = %(w)s), "
            "b AS (UPDATE batches SET scan_lease_until = CASE WHEN scanner = %(w)s "
            "THEN now() + make_interval(secs => %(l)s) ELSE scan_lease_until END, "
            "finalize_lease_until = CASE WHEN finalizer = %(w)s THEN now() + make_interval(secs => %(l)s) "
            "ELSE finalize_lease_until END WHERE batch_id = %(b)s AND (scanner = %(w)s OR finalizer = %(w)s)), "
            "c AS (UPDATE chunks SET lease_until = now() + make_interval(secs => %(l)s) "
            "WHERE batch_id = %(b)s AND owner = %(w)s AND NOT done RETURNING 1) "
            "SELECT count(*) AS held FROM c",
            {"w": worker_id, "b": batch_id, "l": lease, "f": files_done, "by": bytes_done}).fetchone())
        return int(row["held"]) if row else 0

    def end_worker(self, batch_id: str, worker_id: str, files_done: int = 0, bytes_done: int = 0) -> None:
        """A clean exit: give back the chunks not done, so another host takes them at once."""
        def body(conn: Conn) -> None:
            conn.execute("UPDATE chunks SET owner = NULL, lease_until = NULL WHERE batch_id = %s AND owner = %s "
                         "AND NOT done", (batch_id, worker_id))
            conn.execute("UPDATE batches SET scanner = NULL, scan_lease_until = NULL WHERE batch_id = %s "
                         "AND scanner = %s", (batch_id, worker_id))
            conn.execute("UPDATE workers SET ended_at = now(), lease_until = now(), files_done = %s, "
                         "bytes_done = %s WHERE worker_id = %s", (files_done, bytes_done, worker_id))
        self.db.write(body)

    def claim_scan(self, batch_id: str, worker_id: str, lease: float) -> bool:
        """The election of the one host that scans: True for this worker if the scan is not
        complete and nobody else holds a live lease on it."""
        row = self.db.write(lambda conn: conn.execute(
            "UPDATE batches SET scanner = %(w)s, scan_lease_until = now() + make_interval(secs => %(l)s) "
            "WHERE batch_id = %(b)s AND NOT scan_complete AND (scanner IS NULL OR scanner = %(w)s "
            "OR scan_lease_until < now()) RETURNING batch_id", {"w": worker_id, "b": batch_id, "l": lease}).fetchone())
        return row is not None

    def reopen_chunks(self, batch_id: str) -> int:
        """A new run of a batch left with failed or unsent files: their chunks may be claimed again."""
        return self.db.write(lambda conn: conn.execute(
            "UPDATE chunks c SET done = false, owner = NULL, lease_until = NULL WHERE c.batch_id = %s AND c.done "
            "AND EXISTS (SELECT 1 FROM files f "
            "WHERE f.batch_id = c.batch_id AND f.chunk_no = c.chunk_no AND f.state = ANY(%s))",
            (batch_id, list(_OPEN_FILE_STATES))).rowcount)

    def claim_chunk(self, batch_id: str, worker_id: str, lease: float) -> Claim | None:
        """The next chunk not done whose lease is free or ran out, now this worker's. SKIP LOCKED:
        claimers never queue behind each other, and a chunk whose owner is committing is skipped."""
        row = self.db.write(lambda conn: conn.execute(
            "UPDATE chunks c SET owner = %(w)s, lease_until = now() + make_interval(secs => %(l)s), "
            "claims = c.claims + 1 FROM (SELECT chunk_no FROM chunks WHERE batch_id = %(b)s AND NOT done "
            f"AND {_FREE} ORDER BY chunk_no LIMIT 1 FOR UPDATE SKIP LOCKED) AS free "
            "WHERE c.batch_id = %(b)s AND c.chunk_no = free.chunk_no RETURNING c.chunk_no, c.claims",
            {"w": worker_id, "b": batch_id, "l": lease}).fetchone())
        return None if row is None else Claim(int(row["chunk_no"]), int(row["claims"]) - 1)

    def chunk_files(self, batch_id: str, chunk_no: int) -> list[FileRecord]:
        """The files of a chunk that still need work, in key order (one query: a chunk is small)."""
        rows = self.db.query(f"SELECT {FILE_COLUMNS} FROM files WHERE batch_id = %s AND chunk_no = %s "
                             "AND state = ANY(%s) ORDER BY key", (batch_id, chunk_no, list(_OPEN_FILE_STATES)))
        return [file_from_row(row) for row in rows]

    def finish_chunk(self, batch_id: str, chunk_no: int, worker_id: str) -> bool:
        """The chunk's files are all handled (uploaded, failed or skipped): done, if still ours."""
        return bool(self.db.write(lambda conn: conn.execute(
            "UPDATE chunks SET done = true, lease_until = NULL WHERE batch_id = %s AND chunk_no = %s AND owner = %s",
            (batch_id, chunk_no, worker_id)).rowcount))

    def work_left(self, batch_id: str) -> WorkLeft:
        """One statement of index probes (EXISTS, never a count: a host asks this while it waits)."""
        row = self.db.query(
            "SELECT b.state, b.scan_complete, (b.scanner IS NOT NULL AND b.scan_lease_until >= now()) AS scanner_alive, "
            f"EXISTS (SELECT 1 FROM chunks c WHERE c.batch_id = b.batch_id AND NOT c.done AND {_FREE}) AS claimable, "
            f"{_HAS_OPEN} AS open_files, {_HAS_FAILED} AS failed_files "
            "FROM batches b WHERE b.batch_id = %s", (batch_id,))
        if not row:
            raise batch_not_found(batch_id, self.location, hint=False)
        r = row[0]
        return WorkLeft(bool(r["scan_complete"]), bool(r["scanner_alive"]), bool(r["claimable"]), bool(r["open_files"]), bool(r["failed_files"]), BatchState(r["state"]))

    def claim_finalize(self, batch_id: str, worker_id: str, lease: float) -> bool:
        """The race to finalize: exactly one worker moves the batch to finalizing (or takes over
        a finalize whose worker's lease ran out), and only once the scan is complete and every
        file is uploaded (or skipped): nothing is left to send, on any host. The batch row is
        locked first, so of two racers the second sees the first's commit."""
        def body(conn: Conn) -> bool:
            row = conn.execute("SELECT state, scan_complete, finalizer, finalize_lease_until < now() AS lapsed, "
                               f"({_HAS_OPEN} OR {_HAS_FAILED}) AS not_uploaded "
                               "FROM batches b WHERE batch_id = %s FOR UPDATE", (batch_id,)).fetchone()
            if row is None:
                raise batch_not_found(batch_id, self.location, hint=False)
            state = BatchState(row["state"])
            if not row["scan_complete"] or state.terminal:
                return False
            if state is BatchState.FINALIZING and row["finalizer"] not in (None, worker_id) and not row["lapsed"]:
                return False
            if row["not_uploaded"]:
                return False
            conn.execute("UPDATE batches SET state = %s, updated_at = %s, finalizer = %s, "
                         "finalize_lease_until = now() + make_interval(secs => %s) WHERE batch_id = %s",
                         (BatchState.FINALIZING.value, isoformat(utcnow()), worker_id, lease, batch_id))
            return True
        return self.db.write(body)

    def release_finalize(self, batch_id: str, worker_id: str) -> None:
        self.db.write(lambda conn: conn.execute(
            "UPDATE batches SET finalizer = NULL, finalize_lease_until = NULL WHERE batch_id = %s AND finalizer = %s",
            (batch_id, worker_id)))

    def list_workers(self, batch_id: str) -> list[WorkerRecord]:
        rows = self.db.query(
            "SELECT worker_id, host, pid, started_at, heartbeat_at, files_done, bytes_done, "
            "lease_until < now() AS lease_expired, ended_at IS NOT NULL AS ended FROM workers "
            "WHERE batch_id = %s ORDER BY started_at, worker_id", (batch_id,))
        return [WorkerRecord(row["worker_id"], row["host"], int(row["pid"]), _iso(row["started_at"]),
                             _iso(row["heartbeat_at"]), int(row["files_done"]), int(row["bytes_done"]),
                             bool(row["lease_expired"]), bool(row["ended"])) for row in rows]

    def expire_claims(self, batch_id: str) -> int:
        """gc: free the chunks whose owner's lease ran out (the owner is gone)."""
        return self.db.write(lambda conn: conn.execute(
            "UPDATE chunks SET owner = NULL, lease_until = NULL WHERE batch_id = %s AND owner IS NOT NULL "
            "AND NOT done AND lease_until < now()", (batch_id,)).rowcount)


def _iso(value: Any) -> str:
    return value.astimezone().isoformat(timespec="seconds") if hasattr(value, "astimezone") else str(value)
