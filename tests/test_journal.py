"""Unit tests of the Journal API against a real journal file.

Whatever a writer claims to have committed is read back through a second
Journal (its own connection) or a raw sqlite3 connection, never the writer's.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from archup.errors import (
    BatchClosed,
    BatchNotFound,
    FileAlreadyUploaded,
    FileNotInBatch,
    IllegalTransition,
    JournalBusy,
    JournalError,
    JournalTooNew,
)
from archup.journal import (
    BATCH_TTL,
    DEFAULT_BUSY_TIMEOUT,
    SCHEMA_VERSION,
    BatchSettings,
    Destination,
    Journal,
    NewFile,
    PartRecord,
    SQLiteJournal,
)
from archup.journal.database import _MIGRATIONS
from archup.states import BatchState, FileState

SHA = "ab" * 32


# -- helpers ------------------------------------------------------------------


def new_batch_id() -> str:
    return str(ULID())


def key_for(batch_id: str, rel_path: str) -> str:
    return f"staging/{batch_id}/files/{rel_path}"


def new_file(batch_id: str, rel_path: str, size: int = 100, *, state: FileState = FileState.PENDING,
             error: str | None = None) -> NewFile:
    return NewFile(rel_path=rel_path, key=key_for(batch_id, rel_path), size=size, mtime_ns=1_700_000_000,
                   state=state, error=error)


def open_batch(journal: Journal, batch_id: str | None = None) -> str:
    batch_id = batch_id or new_batch_id()
    journal.init_batch(batch_id, source_root="/data/src", bucket="archive", prefix="staging/",
                       part_size=8 * 1024 * 1024)
    return batch_id


def uploaded_file(journal: Journal, batch_id: str, rel_path: str, size: int = 100) -> None:
    journal.add_file(batch_id, new_file(batch_id, rel_path, size))
    journal.start_file(batch_id, rel_path)
    journal.complete_file(batch_id, rel_path, sha256=SHA, etag=f"etag-{rel_path}")


def move_batch(journal: Journal, batch_id: str, *path: BatchState) -> None:
    for target in path:
        journal.set_batch_state(batch_id, target)


class JournalBackend:
    """One journal backend under test: opens handles on one journal, each with its own connections."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self) -> Journal:
        return SQLiteJournal(self.path)


class PostgresBackend(JournalBackend):
    """The shared journal, in a fresh database of a real PostgreSQL server the suite started."""

    name = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url

    def open(self) -> Journal:
        from archup.journal.postgres import PostgresJournal

        return PostgresJournal(self.url, retry_for=5.0)


@contextmanager
def second_journal(where: Path | JournalBackend) -> Iterator[Journal]:
    """A fresh handle, hence a fresh connection: what any other process would see."""
    reader = where.open() if isinstance(where, JournalBackend) else SQLiteJournal(where)
    try:
        yield reader
    finally:
        reader.close()


def raw_connection(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, journal_path: Path) -> JournalBackend:
    """Every test below runs on each backend; those marked sqlite_only test SQLite's own machinery."""
    if request.param != "sqlite" and request.node.get_closest_marker("sqlite_only"):
        pytest.skip("tests SQLite's connection machinery")
    if request.param == "postgres":
        return PostgresBackend(request.getfixturevalue("pg_url"))
    return JournalBackend(journal_path)


@pytest.fixture
def journal(backend: JournalBackend) -> Iterator[Journal]:
    handle = backend.open()
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture
def batch_id(journal: Journal) -> str:
    return open_batch(journal)


# -- connection settings and schema ---------------------------------------------


def _pragmas(conn: sqlite3.Connection) -> dict[str, object]:
    return {name: conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")}


@pytest.mark.sqlite_only
def test_every_connection_runs_wal_with_full_sync_and_a_busy_timeout(journal: Journal) -> None:
    expected = {"journal_mode": "wal", "synchronous": 2,  # 2 is FULL
                "busy_timeout": int(DEFAULT_BUSY_TIMEOUT * 1000), "foreign_keys": 1}
    with journal.atomic() as conn:
        assert _pragmas(conn) == expected

    # Every thread gets its own connection; each must carry the same settings.
    seen: dict[str, object] = {}

    def in_thread() -> None:
        with journal.atomic() as conn:
            seen.update(_pragmas(conn))

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert seen == expected


@pytest.mark.sqlite_only
def test_synchronous_and_busy_timeout_options_are_applied(journal_path: Path) -> None:
    handle = SQLiteJournal(journal_path, synchronous="NORMAL", busy_timeout=1.5)
    try:
        with handle.atomic() as conn:
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
            assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 1500
    finally:
        handle.close()


@pytest.mark.sqlite_only
def test_new_journal_carries_the_schema_version(journal: Journal, journal_path: Path) -> None:
    with closing(raw_connection(journal_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.sqlite_only
def test_journal_from_a_newer_archup_is_refused(journal_path: Path) -> None:
    SQLiteJournal(journal_path).close()
    newer = SCHEMA_VERSION + 1
    with closing(raw_connection(journal_path)) as conn:
        conn.execute(f"PRAGMA user_version={newer}")

    with pytest.raises(JournalTooNew) as excinfo:
        SQLiteJournal(journal_path)

    message = str(excinfo.value)
    assert str(journal_path) in message
    assert f"schema version {newer}" in message
    assert "upgrade archup" in message
    with closing(raw_connection(journal_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newer


@pytest.mark.parametrize("garbage", [b"hello", b"\x00garbage\xff" * 1000], ids=["short", "long"])
@pytest.mark.sqlite_only
def test_garbage_file_is_a_journal_error(journal_path: Path, garbage: bytes) -> None:
    journal_path.parent.mkdir(mode=0o700)
    journal_path.write_bytes(garbage)

    # pytest.raises(JournalError) lets a raw sqlite3.DatabaseError through as a failure.
    with pytest.raises(JournalError) as excinfo:
        SQLiteJournal(journal_path)

    assert str(journal_path) in str(excinfo.value)
    assert journal_path.read_bytes() == garbage


@pytest.mark.sqlite_only
def test_a_schema_3_journal_is_migrated_and_keeps_its_batches(journal_path: Path) -> None:
    """A journal written before schema 4 opens with its batch and file intact; the new
    columns read as 'not recorded' (no symlinks followed, checksum kind unknown)."""
    journal_path.parent.mkdir(mode=0o700)
    with closing(raw_connection(journal_path)) as conn:
        for script in _MIGRATIONS[:3]:
            conn.executescript(script)
        conn.execute("PRAGMA user_version=3")
        conn.execute("INSERT INTO batches (batch_id, state, source_root, bucket, prefix, part_size, created_at, "
                     "updated_at, expires_at) VALUES ('B', 'open', '/src', 'bkt', 'staging/', 8388608, 't', 't', 't')")
        conn.execute("INSERT INTO files (batch_id, rel_path, key, size, mtime_ns, state, upload_id, updated_at) "
                     "VALUES ('B', 'a.bin', 'k', 1, 1, 'uploading', 'up-1', 't')")
        conn.commit()

    handle = SQLiteJournal(journal_path)
    try:
        batch = handle.get_batch("B")
        (record,) = handle.iter_files("B")
    finally:
        handle.close()

    assert (batch.source_root, batch.settings) == ("/src", None)  # not recorded: the next run supplies them
    assert (record.upload_id, record.checksum_kind, record.shard_no) == ("up-1", None, None)
    with closing(raw_connection(journal_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7


@pytest.mark.sqlite_only
def test_a_batch_keeps_its_settings_and_an_upload_its_checksum_kind(journal_path: Path) -> None:
    journal = SQLiteJournal(journal_path)
    try:
        settings = BatchSettings(excludes=("*.tmp",), files_from=("a.bin",), follow_symlinks=True,
                                 storage_class="GLACIER", metadata=(("k", "v"),), tags=(("t", "1"),))
        journal.init_batch("B", source_root="/src", bucket="b", prefix="p/", part_size=5, settings=settings)
        journal.add_file("B", new_file("B", "a.bin"))
        journal.start_file("B", "a.bin")
        journal.record_upload_id("B", "a.bin", "up-1", 5, checksum_kind="CRC32/FULL_OBJECT")
        assert journal.get_batch("B").settings == settings
        assert journal.get_file("B", "a.bin").checksum_kind == "CRC32/FULL_OBJECT"
        journal.reset_file("B", "a.bin", "the server lost the upload")
        assert journal.get_file("B", "a.bin").checksum_kind is None  # a new upload chooses again
    finally:
        journal.close()


@pytest.mark.sqlite_only
def test_empty_file_is_migrated_to_the_current_schema(journal_path: Path) -> None:
    journal_path.parent.mkdir(mode=0o700)
    journal_path.touch(mode=0o600)

    handle = SQLiteJournal(journal_path)
    try:
        batch_id = open_batch(handle)
    finally:
        handle.close()

    with closing(raw_connection(journal_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"batches", "files", "parts"} <= tables
    with second_journal(journal_path) as reader:
        assert reader.get_batch(batch_id).state is BatchState.OPEN


# -- permissions ----------------------------------------------------------------


@pytest.mark.sqlite_only
def test_new_journal_directory_and_files_are_private(journal_path: Path) -> None:
    # With umask 0 nothing masks a missing explicit mode, so the test sees what the code asks for.
    previous = os.umask(0)
    try:
        handle = SQLiteJournal(journal_path)
        try:
            assert mode_of(journal_path.parent) == 0o700
            assert mode_of(journal_path) == 0o600
            uploaded_file(handle, open_batch(handle), "a.bin")
            for suffix in ("-wal", "-shm"):
                sidecar = journal_path.with_name(journal_path.name + suffix)
                assert sidecar.exists(), suffix
                assert mode_of(sidecar) == 0o600, suffix
        finally:
            handle.close()
    finally:
        os.umask(previous)


# -- batches ----------------------------------------------------------------------


def test_init_batch_records_an_open_batch(journal: Journal, backend: JournalBackend) -> None:
    batch_id = new_batch_id()
    record = journal.init_batch(batch_id, source_root="/data/src", bucket="archive", prefix="staging/",
                                part_size=16 * 1024 * 1024, endpoint_url="http://127.0.0.1:9000",
                                region="eu-west-1")

    with second_journal(backend) as reader:
        stored = reader.get_batch(batch_id)
    assert stored == record
    assert stored.state is BatchState.OPEN
    assert (stored.source_root, stored.bucket, stored.prefix) == ("/data/src", "archive", "staging/")
    assert (stored.endpoint_url, stored.region, stored.part_size) == ("http://127.0.0.1:9000", "eu-west-1",
                                                                       16 * 1024 * 1024)
    assert not stored.scan_complete
    assert stored.batch_prefix == f"staging/{batch_id}/"
    lifetime = datetime.fromisoformat(stored.expires_at) - datetime.fromisoformat(stored.created_at)
    assert lifetime == BATCH_TTL


def test_set_batch_state_walks_to_enqueued_and_records_the_manifest(journal: Journal, batch_id: str,
                                                                    backend: JournalBackend) -> None:
    move_batch(journal, batch_id, BatchState.UPLOADING, BatchState.FINALIZING)
    record = journal.set_batch_state(batch_id, BatchState.ENQUEUED, manifest_key="staging/x/manifest.json",
                                     finalized_at="2026-11-28T10:00:00.000Z")
    # Finalize is idempotent: enqueued -> enqueued is allowed and keeps the manifest.
    journal.set_batch_state(batch_id, BatchState.ENQUEUED)

    with second_journal(backend) as reader:
        stored = reader.get_batch(batch_id)
    assert record.state is stored.state is BatchState.ENQUEUED
    assert stored.manifest_key == "staging/x/manifest.json"
    assert stored.finalized_at == "2026-11-28T10:00:00.000Z"


def test_set_batch_state_records_and_clears_the_error(journal: Journal, batch_id: str) -> None:
    assert journal.set_batch_state(batch_id, BatchState.FAILED, error="3 files failed").error == "3 files failed"
    assert journal.set_batch_state(batch_id, BatchState.UPLOADING).error is None


@pytest.mark.parametrize(("path", "target"), [
    ((BatchState.UPLOADING, BatchState.FINALIZING, BatchState.ENQUEUED), BatchState.UPLOADING),
    ((BatchState.ABORTED,), BatchState.OPEN),
    ((BatchState.EXPIRED,), BatchState.UPLOADING),
    ((BatchState.UPLOADING,), BatchState.OPEN),
], ids=["enqueued->uploading", "aborted->open", "expired->uploading", "uploading->open"])
def test_illegal_batch_move_raises_and_changes_nothing(journal: Journal, batch_id: str,
                                                       path: tuple[BatchState, ...], target: BatchState,
                                                       backend: JournalBackend) -> None:
    move_batch(journal, batch_id, *path)

    with pytest.raises(IllegalTransition) as excinfo:
        journal.set_batch_state(batch_id, target)

    assert batch_id in str(excinfo.value)
    assert target.value in str(excinfo.value)
    with second_journal(backend) as reader:
        assert reader.get_batch(batch_id).state is path[-1]


def test_mark_scan_complete(journal: Journal, batch_id: str, backend: JournalBackend) -> None:
    journal.mark_scan_complete(batch_id)

    with second_journal(backend) as reader:
        assert reader.get_batch(batch_id).scan_complete


def test_list_batches_in_id_order_with_state_filter(journal: Journal) -> None:
    batch_ids = [open_batch(journal) for _ in range(4)]
    move_batch(journal, batch_ids[1], BatchState.UPLOADING)
    move_batch(journal, batch_ids[3], BatchState.UPLOADING)

    assert [b.batch_id for b in journal.list_batches()] == sorted(batch_ids)
    assert [b.batch_id for b in journal.list_batches(BatchState.UPLOADING)] == sorted(
        [batch_ids[1], batch_ids[3]])
    assert journal.list_batches(BatchState.ENQUEUED) == []


@pytest.mark.sqlite_only
def test_delete_batch_cascades_to_files_and_parts(journal: Journal, journal_path: Path) -> None:
    doomed, kept = open_batch(journal), open_batch(journal)
    for batch_id in (doomed, kept):
        journal.add_files(batch_id, [new_file(batch_id, "a.bin"), new_file(batch_id, "b.bin")])
        journal.start_file(batch_id, "a.bin")
        journal.record_upload_id(batch_id, "a.bin", "upload-1", 5 * 1024 * 1024)
        journal.record_part(batch_id, "a.bin", PartRecord(1, 5 * 1024 * 1024, "etag-1", None))

    journal.delete_batch(doomed)

    with closing(raw_connection(journal_path)) as conn:
        def count(table: str, batch_id: str) -> int:
            return int(conn.execute(f"SELECT count(*) FROM {table} WHERE batch_id = ?", (batch_id,))
                       .fetchone()[0])
        assert [count(table, doomed) for table in ("batches", "files", "parts")] == [0, 0, 0]
        assert [count(table, kept) for table in ("batches", "files", "parts")] == [1, 2, 1]
    with pytest.raises(BatchNotFound):
        journal.delete_batch(doomed)


# -- files ------------------------------------------------------------------------


def test_add_file_records_a_pending_file(journal: Journal, batch_id: str, backend: JournalBackend) -> None:
    journal.add_file(batch_id, new_file(batch_id, "dir/a.bin", size=1234))

    with second_journal(backend) as reader:
        record = reader.get_file(batch_id, "dir/a.bin")
    assert record.state is FileState.PENDING
    assert (record.key, record.size, record.mtime_ns) == (key_for(batch_id, "dir/a.bin"), 1234, 1_700_000_000)
    assert (record.attempts, record.upload_id, record.sha256, record.etag) == (0, None, None, None)


def test_add_file_twice_is_refused(journal: Journal, batch_id: str) -> None:
    journal.add_file(batch_id, new_file(batch_id, "a.bin"))

    with pytest.raises(IllegalTransition, match="already has file 'a.bin'"):
        journal.add_file(batch_id, new_file(batch_id, "a.bin"))


def test_add_files_counts_new_rows_and_leaves_existing_ones_alone(journal: Journal, batch_id: str,
                                                                  backend: JournalBackend) -> None:
    assert journal.add_files(batch_id, [new_file(batch_id, name) for name in ("a", "b", "c")]) == 3
    journal.start_file(batch_id, "a")

    again = [new_file(batch_id, "a", size=999), new_file(batch_id, "b", size=999),
             new_file(batch_id, "d"), new_file(batch_id, "e"), new_file(batch_id, "e")]
    assert journal.add_files(batch_id, again) == 2
    assert journal.add_files(batch_id, []) == 0

    with second_journal(backend) as reader:
        files = {f.rel_path: f for f in reader.iter_files(batch_id)}
    assert sorted(files) == ["a", "b", "c", "d", "e"]
    assert files["a"].state is FileState.UPLOADING
    assert files["a"].size == files["b"].size == 100


def test_start_file_counts_attempts_and_clears_the_last_error(journal: Journal, batch_id: str) -> None:
    journal.add_file(batch_id, new_file(batch_id, "a.bin"))
    journal.start_file(batch_id, "a.bin")
    journal.fail_file(batch_id, "a.bin", "AccessDenied")
    journal.start_file(batch_id, "a.bin")

    record = journal.get_file(batch_id, "a.bin")
    assert (record.state, record.attempts, record.error) == (FileState.UPLOADING, 2, None)


def test_upload_id_and_parts_are_recorded(journal: Journal, batch_id: str, backend: JournalBackend) -> None:
    part_size = 5 * 1024 * 1024
    journal.add_file(batch_id, new_file(batch_id, "big.bin", size=2 * part_size))
    journal.start_file(batch_id, "big.bin")
    journal.record_upload_id(batch_id, "big.bin", "upload-1", part_size)
    journal.record_part(batch_id, "big.bin", PartRecord(2, part_size, "etag-2", "crc-2"))
    journal.record_part(batch_id, "big.bin", PartRecord(1, part_size, "etag-1-old", None))
    # A retried part replaces its earlier record.
    journal.record_part(batch_id, "big.bin", PartRecord(1, part_size, "etag-1", "crc-1"))

    with second_journal(backend) as reader:
        record = reader.get_file(batch_id, "big.bin")
        parts = reader.list_parts(batch_id, "big.bin")
    assert (record.upload_id, record.part_size) == ("upload-1", part_size)
    assert parts == [PartRecord(1, part_size, "etag-1", "crc-1"), PartRecord(2, part_size, "etag-2", "crc-2")]


def test_complete_file_records_digest_and_etag(journal: Journal, batch_id: str, backend: JournalBackend) -> None:
    journal.add_file(batch_id, new_file(batch_id, "a.bin"))
    journal.start_file(batch_id, "a.bin")
    journal.complete_file(batch_id, "a.bin", sha256=SHA, etag='"etag-a"')

    with second_journal(backend) as reader:
        record = reader.get_file(batch_id, "a.bin")
    assert (record.state, record.sha256, record.etag, record.error) == (FileState.UPLOADED, SHA, '"etag-a"', None)


def test_pending_file_completes_directly(journal: Journal, batch_id: str) -> None:
    journal.add_file(batch_id, new_file(batch_id, "small.bin"))
    journal.complete_file(batch_id, "small.bin", sha256=SHA, etag="e")

    assert journal.get_file(batch_id, "small.bin").state is FileState.UPLOADED


def test_fail_file_forgets_the_upload_and_its_parts(journal: Journal, batch_id: str,
                                                    backend: JournalBackend) -> None:
    journal.add_file(batch_id, new_file(batch_id, "a.bin"))
    journal.start_file(batch_id, "a.bin")
    journal.record_upload_id(batch_id, "a.bin", "upload-1", 5 * 1024 * 1024)
    journal.record_part(batch_id, "a.bin", PartRecord(1, 5 * 1024 * 1024, "etag-1", None))
    journal.fail_file(batch_id, "a.bin", "read error: Input/output error")
    journal.fail_file(batch_id, "a.bin", "read error: again")  # failed -> failed keeps the newer reason

    with second_journal(backend) as reader:
        record = reader.get_file(batch_id, "a.bin")
        parts = reader.list_parts(batch_id, "a.bin")
    assert (record.state, record.error, record.upload_id) == (FileState.FAILED, "read error: again", None)
    assert parts == []


def test_reset_file_returns_an_uploaded_file_to_pending(journal: Journal, batch_id: str,
                                                        backend: JournalBackend) -> None:
    journal.add_file(batch_id, new_file(batch_id, "a.bin"))
    journal.start_file(batch_id, "a.bin")
    journal.record_upload_id(batch_id, "a.bin", "upload-1", 5 * 1024 * 1024)
    journal.record_part(batch_id, "a.bin", PartRecord(1, 5 * 1024 * 1024, "etag-1", None))
    journal.complete_file(batch_id, "a.bin", sha256=SHA, etag="e")
    journal.reset_file(batch_id, "a.bin", "object missing on read-back")

    with second_journal(backend) as reader:
        record = reader.get_file(batch_id, "a.bin")
        parts = reader.list_parts(batch_id, "a.bin")
    assert record.state is FileState.PENDING
    assert (record.upload_id, record.sha256, record.etag) == (None, None, None)
    assert record.error == "object missing on read-back"
    assert parts == []


def test_get_state_counts_files_and_bytes_per_state_and_lists_problems(journal: Journal, batch_id: str) -> None:
    journal.add_files(batch_id, [new_file(batch_id, "p1", 1), new_file(batch_id, "p2", 2),
                                 new_file(batch_id, "u1", 10), new_file(batch_id, "u2", 20),
                                 new_file(batch_id, "s1", 0, state=FileState.SKIPPED, error="symlink"),
                                 new_file(batch_id, "f1", 300), new_file(batch_id, "f2", 400),
                                 new_file(batch_id, "up", 5000)])
    for rel_path in ("u1", "u2"):
        journal.complete_file(batch_id, rel_path, sha256=SHA, etag="e")
    for rel_path in ("f2", "f1"):
        journal.fail_file(batch_id, rel_path, f"{rel_path}: AccessDenied")
    journal.start_file(batch_id, "up")
    other = open_batch(journal)
    journal.add_file(other, new_file(other, "elsewhere", 7))

    summary = journal.get_state(batch_id)

    assert summary.batch.batch_id == batch_id
    assert summary.counts == {FileState.PENDING: 2, FileState.UPLOADING: 1, FileState.UPLOADED: 2,
                              FileState.FAILED: 2, FileState.SKIPPED: 1}
    assert summary.bytes_by_state == {FileState.PENDING: 3, FileState.UPLOADING: 5000, FileState.UPLOADED: 30,
                                      FileState.FAILED: 700, FileState.SKIPPED: 0}
    assert (summary.files_total, summary.bytes_total) == (8, 5733)
    assert [(f.rel_path, f.state, f.error) for f in summary.problems] == [
        ("f1", FileState.FAILED, "f1: AccessDenied"),
        ("f2", FileState.FAILED, "f2: AccessDenied"),
        ("s1", FileState.SKIPPED, "symlink"),
    ]
    assert [f.rel_path for f in journal.get_state(batch_id, problem_limit=2).problems] == ["f1", "f2"]


def test_get_state_of_an_empty_batch_is_all_zero(journal: Journal, batch_id: str) -> None:
    summary = journal.get_state(batch_id)

    assert set(summary.counts) == set(FileState)
    assert (summary.files_total, summary.bytes_total, summary.problems) == (0, 0, [])


def test_iter_files_streams_in_key_order_across_pages(journal: Journal, batch_id: str) -> None:
    names = [f"d{index % 3}/f{index:02d}" for index in (7, 3, 9, 0, 5, 1, 8, 2, 6, 4)]
    journal.add_files(batch_id, [new_file(batch_id, name) for name in names])
    for name in names[::2]:
        journal.complete_file(batch_id, name, sha256=SHA, etag="e")
    other = open_batch(journal)
    journal.add_file(other, new_file(other, "d0/f00"))

    all_keys = [f.key for f in journal.iter_files(batch_id, page_size=3)]
    uploaded = [f.rel_path for f in journal.iter_files(batch_id, [FileState.UPLOADED], page_size=2)]
    pending_or_failed = [f.rel_path for f in journal.iter_files(
        batch_id, [FileState.PENDING, FileState.FAILED], page_size=1)]

    assert all_keys == sorted(key_for(batch_id, name) for name in names)
    assert uploaded == sorted(names[::2])
    assert pending_or_failed == sorted(names[1::2])
    assert list(journal.iter_files(batch_id, [FileState.SKIPPED], page_size=3)) == []


def test_iter_files_with_an_empty_state_filter_yields_nothing(journal: Journal, batch_id: str) -> None:
    journal.add_files(batch_id, [new_file(batch_id, "a"), new_file(batch_id, "b")])

    assert list(journal.iter_files(batch_id, states=[])) == []


# -- illegal transitions ----------------------------------------------------------


def test_completing_a_file_twice_raises_file_already_uploaded(journal: Journal, batch_id: str,
                                                             backend: JournalBackend) -> None:
    uploaded_file(journal, batch_id, "a.bin")

    with pytest.raises(FileAlreadyUploaded) as excinfo:
        journal.complete_file(batch_id, "a.bin", sha256="cd" * 32, etag="other")

    assert batch_id in str(excinfo.value) and "a.bin" in str(excinfo.value)
    with second_journal(backend) as reader:
        record = reader.get_file(batch_id, "a.bin")
    assert (record.sha256, record.etag) == (SHA, "etag-a.bin")


def test_completing_a_file_not_in_the_batch_raises_file_not_in_batch(journal: Journal, batch_id: str) -> None:
    journal.add_file(batch_id, new_file(batch_id, "a.bin"))

    with pytest.raises(FileNotInBatch) as excinfo:
        journal.complete_file(batch_id, "never/added.bin", sha256=SHA, etag="e")

    message = str(excinfo.value)
    assert "File not found in batch" in message
    assert batch_id in message
    assert "never/added.bin" in message
    assert (excinfo.value.batch_id, excinfo.value.rel_path) == (batch_id, "never/added.bin")


@pytest.mark.parametrize("path", [
    (BatchState.FINALIZING,),
    (BatchState.UPLOADING, BatchState.FINALIZING, BatchState.ENQUEUED),
    (BatchState.ABORTED,),
    (BatchState.EXPIRED,),
], ids=["finalizing", "enqueued", "aborted", "expired"])
def test_adding_to_a_closed_batch_raises_batch_closed(journal: Journal, batch_id: str,
                                                      path: tuple[BatchState, ...], backend: JournalBackend) -> None:
    move_batch(journal, batch_id, *path)

    with pytest.raises(BatchClosed) as excinfo:
        journal.add_file(batch_id, new_file(batch_id, "late.bin"))
    with pytest.raises(BatchClosed):
        journal.add_files(batch_id, [new_file(batch_id, "late2.bin")])

    assert batch_id in str(excinfo.value) and path[-1].value in str(excinfo.value)
    with second_journal(backend) as reader:
        assert list(reader.iter_files(batch_id)) == []


@pytest.mark.parametrize("state", [BatchState.UPLOADING, BatchState.FAILED])
def test_a_batch_uploading_or_failed_still_accepts_files(journal: Journal, batch_id: str,
                                                         state: BatchState) -> None:
    journal.set_batch_state(batch_id, state)

    assert journal.add_files(batch_id, [new_file(batch_id, "a.bin")]) == 1


def test_files_of_an_aborted_batch_can_no_longer_change(journal: Journal, batch_id: str) -> None:
    journal.add_file(batch_id, new_file(batch_id, "a.bin"))
    journal.set_batch_state(batch_id, BatchState.ABORTED)

    with pytest.raises(BatchClosed):
        journal.complete_file(batch_id, "a.bin", sha256=SHA, etag="e")
    assert journal.get_file(batch_id, "a.bin").state is FileState.PENDING


UNKNOWN_BATCH_CALLS: dict[str, Callable[[Journal, str], object]] = {
    "get_batch": lambda j, b: j.get_batch(b),
    "get_state": lambda j, b: j.get_state(b),
    "set_batch_state": lambda j, b: j.set_batch_state(b, BatchState.UPLOADING),
    "mark_scan_complete": lambda j, b: j.mark_scan_complete(b),
    "delete_batch": lambda j, b: j.delete_batch(b),
    "add_file": lambda j, b: j.add_file(b, new_file(b, "a.bin")),
    "add_files": lambda j, b: j.add_files(b, [new_file(b, "a.bin")]),
    "start_file": lambda j, b: j.start_file(b, "a.bin"),
    "complete_file": lambda j, b: j.complete_file(b, "a.bin", sha256=SHA, etag="e"),
    "fail_file": lambda j, b: j.fail_file(b, "a.bin", "boom"),
    "seal_batch": lambda j, b: j.seal_batch(b, manifest_key="m", finalized_at="t"),
    "forget_batch": lambda j, b: j.forget_batch(b),
}


@pytest.mark.parametrize("call", UNKNOWN_BATCH_CALLS.values(), ids=UNKNOWN_BATCH_CALLS.keys())
def test_unknown_batch_raises_batch_not_found(journal: Journal, call: Callable[[Journal, str], object]) -> None:
    open_batch(journal)
    unknown = new_batch_id()

    with pytest.raises(BatchNotFound) as excinfo:
        call(journal, unknown)

    assert unknown in str(excinfo.value)


def test_record_part_on_a_file_not_uploading_raises_illegal_transition(journal: Journal, batch_id: str) -> None:
    journal.add_file(batch_id, new_file(batch_id, "a.bin"))

    with pytest.raises(IllegalTransition, match="not uploading"):
        journal.record_part(batch_id, "a.bin", PartRecord(1, 5 * 1024 * 1024, "etag-1", None))
    with pytest.raises(IllegalTransition, match="not uploading"):
        journal.record_upload_id(batch_id, "a.bin", "upload-1", 5 * 1024 * 1024)

    assert journal.list_parts(batch_id, "a.bin") == []
    assert journal.get_file(batch_id, "a.bin").upload_id is None


def test_record_part_of_an_unknown_file_raises_file_not_in_batch(journal: Journal, batch_id: str) -> None:
    with pytest.raises(FileNotInBatch):
        journal.record_part(batch_id, "ghost.bin", PartRecord(1, 1, "etag-1", None))


@pytest.mark.parametrize(("setup", "move"), [
    ("skipped", "start"),
    ("uploaded", "start"),
    ("uploaded", "fail"),
    ("pending", "reset"),
], ids=["skipped->uploading", "uploaded->uploading", "uploaded->failed", "pending->pending"])
def test_illegal_file_moves_raise(journal: Journal, batch_id: str, setup: str, move: str) -> None:
    if setup == "skipped":
        journal.add_file(batch_id, new_file(batch_id, "a.bin", state=FileState.SKIPPED, error="fifo"))
    elif setup == "uploaded":
        uploaded_file(journal, batch_id, "a.bin")
    else:
        journal.add_file(batch_id, new_file(batch_id, "a.bin"))
    before = journal.get_file(batch_id, "a.bin")
    moves: dict[str, Callable[[], None]] = {
        "start": lambda: journal.start_file(batch_id, "a.bin"),
        "fail": lambda: journal.fail_file(batch_id, "a.bin", "boom"),
        "reset": lambda: journal.reset_file(batch_id, "a.bin", "why"),
    }

    with pytest.raises(IllegalTransition, match="cannot become"):
        moves[move]()

    assert journal.get_file(batch_id, "a.bin") == before


# -- the transaction helper ----------------------------------------------------


class Boom(Exception):
    pass


def _insert_batch_row(conn: sqlite3.Connection, batch_id: str) -> None:
    conn.execute("INSERT INTO batches (batch_id, state, source_root, bucket, prefix, part_size, created_at, "
                 "updated_at, expires_at) VALUES (?, 'open', '/s', 'b', 'staging/', 1, 'x', 'x', 'x')",
                 (batch_id,))


def _assert_nothing_written_and_unlocked(journal: Journal, journal_path: Path, batch_id: str) -> None:
    # A short busy timeout: a transaction left open by the writer fails this at once instead of hanging.
    reader = SQLiteJournal(journal_path, busy_timeout=0.2)
    try:
        assert reader.list_batches() == []
        with pytest.raises(BatchNotFound):
            reader.get_batch(batch_id)
        open_batch(reader)
    finally:
        reader.close()
    open_batch(journal)  # the writer's own connection is out of its transaction too


@pytest.mark.parametrize("error", [Boom("inside"), KeyboardInterrupt()], ids=["exception", "KeyboardInterrupt"])
@pytest.mark.sqlite_only
def test_atomic_rolls_back_and_reraises_the_same_exception(journal: Journal, journal_path: Path,
                                                           error: BaseException) -> None:
    batch_id = new_batch_id()

    with pytest.raises(type(error)) as excinfo:
        with journal.atomic() as conn:
            _insert_batch_row(conn, batch_id)
            raise error

    assert excinfo.value is error
    _assert_nothing_written_and_unlocked(journal, journal_path, batch_id)


@pytest.mark.sqlite_only
def test_atomic_keeps_the_original_exception_when_rollback_fails(journal: Journal, journal_path: Path) -> None:
    batch_id = new_batch_id()
    error = Boom("original")

    with pytest.raises(Boom) as excinfo:
        with journal.atomic() as conn:
            _insert_batch_row(conn, batch_id)
            conn.execute("ROLLBACK")  # atomic()'s own ROLLBACK now fails: no transaction is active
            raise error

    assert excinfo.value is error
    _assert_nothing_written_and_unlocked(journal, journal_path, batch_id)


@pytest.mark.sqlite_only
def test_atomic_commits_for_every_other_connection(journal: Journal, journal_path: Path) -> None:
    batch_id = new_batch_id()
    with journal.atomic() as conn:
        _insert_batch_row(conn, batch_id)

    with closing(raw_connection(journal_path)) as conn:
        assert conn.execute("SELECT count(*) FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()[0] == 1


@pytest.mark.sqlite_only
def test_atomic_holds_the_write_lock_from_its_first_read(journal: Journal, journal_path: Path) -> None:
    """A deferred BEGIN takes no lock for a read, so another writer could slip in before our write."""
    other = SQLiteJournal(journal_path, busy_timeout=0.2)
    try:
        with journal.atomic() as conn:
            conn.execute("SELECT count(*) FROM batches").fetchone()
            with pytest.raises(JournalBusy) as excinfo:
                open_batch(other)
        assert str(journal_path) in str(excinfo.value)
        open_batch(other)  # and the lock is released on commit
    finally:
        other.close()



@pytest.mark.sqlite_only
def test_a_nested_atomic_is_a_journal_error_not_a_hang(journal: Journal, journal_path: Path) -> None:
    """An operation called inside atomic() would wait on this thread's own write lock forever.

    Run in a thread bounded by a join timeout, so a regression fails instead of hanging the suite."""
    outcome: list[BaseException | str] = []

    def nest() -> None:
        try:
            with journal.atomic() as conn:
                conn.execute("INSERT INTO batches (batch_id, state, source_root, bucket, prefix, part_size, "
                             "created_at, updated_at, expires_at) VALUES ('outer', 'open', '/', 'b', 'p/', 1, "
                             "'t', 't', 't')")
                open_batch(journal)  # init_batch opens its own atomic()
            outcome.append("no error")
        except BaseException as error:  # noqa: BLE001 - the test inspects whatever it was
            outcome.append(error)

    worker = threading.Thread(target=nest, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "nested atomic() hung on the journal's write lock"
    [error] = outcome
    assert isinstance(error, JournalError)
    assert "atomic() called inside atomic()" in str(error) and str(journal_path) in str(error)
    assert journal.list_batches() == []  # the outer transaction was rolled back, nothing half-written
    open_batch(journal)  # and the lock was released: the journal takes writes again
    assert len(journal.list_batches()) == 1

# -- durability and processes ------------------------------------------------------


def test_completed_file_is_durable_for_a_fresh_journal(journal: Journal, batch_id: str,
                                                       backend: JournalBackend) -> None:
    journal.add_file(batch_id, new_file(batch_id, "a.bin"))
    journal.start_file(batch_id, "a.bin")
    journal.complete_file(batch_id, "a.bin", sha256=SHA, etag="e")

    with second_journal(backend) as reader:
        record = reader.get_file(batch_id, "a.bin")
        summary = reader.get_state(batch_id)
    assert (record.state, record.sha256) == (FileState.UPLOADED, SHA)
    assert summary.counts[FileState.UPLOADED] == 1


def _child_completes_a_file(journal: Journal, parent_conn: sqlite3.Connection, batch_id: str) -> None:
    with journal.atomic() as conn:
        if conn is parent_conn:
            raise SystemExit(3)  # the child reused the connection it inherited
    uploaded_file(journal, batch_id, "from-child.bin")


@pytest.mark.sqlite_only
def test_forked_child_opens_its_own_connection(journal: Journal, batch_id: str, journal_path: Path) -> None:
    uploaded_file(journal, batch_id, "from-parent-before.bin")
    with journal.atomic() as parent_conn:
        pass

    child = multiprocessing.get_context("fork").Process(
        target=_child_completes_a_file, args=(journal, parent_conn, batch_id))
    child.start()
    child.join(timeout=60)

    assert child.exitcode == 0, "child failed (3: it used the parent's connection)"
    uploaded_file(journal, batch_id, "from-parent-after.bin")
    with journal.atomic() as conn_after:
        assert conn_after is parent_conn  # the parent keeps its own connection
    assert journal.integrity_check() == "ok"
    with second_journal(journal_path) as reader:
        files = {f.rel_path: f.state for f in reader.iter_files(batch_id)}
    assert files == {name: FileState.UPLOADED
                     for name in ("from-parent-before.bin", "from-child.bin", "from-parent-after.bin")}


# -- bugs ---------------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_a_full_disk_during_a_write_is_a_journal_error(journal: Journal, batch_id: str) -> None:
    with journal.atomic() as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        # Cap the database at its current size: the next growth fails as a full disk would.
        conn.execute(f"PRAGMA max_page_count = {pages}").fetchone()
    many = [new_file(batch_id, f"dir/{'x' * 200}-{index}") for index in range(500)]

    with pytest.raises(JournalError):
        journal.add_files(batch_id, many)


# -- the archived index and forgetting ------------------------------------------

DESTINATION = Destination("/data/src", "archive", "staging/", None)


def sealed_batch(journal: Journal, files: dict[str, tuple[int, int]], *, seen: tuple[str, ...] = (),
                 batch_id: str | None = None, covers: Callable[[str], bool] | None = None) -> str:
    """A batch that uploaded ``files`` (rel_path -> (size, mtime_ns)), whose walk found ``seen``
    archived unchanged, finalized."""
    batch_id = batch_id or open_batch(journal)
    journal.add_files(batch_id, [NewFile(path, key_for(batch_id, path), size, mtime)
                                 for path, (size, mtime) in files.items()], seen_archived=seen)
    for path in files:
        journal.complete_file(batch_id, path, sha256=SHA, etag=f"etag-{path}")
    journal.mark_scan_complete(batch_id, files_archived=len(seen))
    journal.set_batch_state(batch_id, BatchState.FINALIZING)
    journal.seal_batch(batch_id, manifest_key=f"staging/{batch_id}/manifest.json", finalized_at="t", covers=covers)
    return batch_id


def index_of(journal: Journal) -> dict[str, tuple[int, int, str]]:
    return {row.rel_path: (row.size, row.mtime_ns, row.batch_id) for row in journal.iter_archived(DESTINATION)}


def test_seal_batch_indexes_the_uploaded_files_and_find_archived_matches_size_and_mtime(
        journal: Journal, backend: JournalBackend) -> None:
    first = sealed_batch(journal, {"a.bin": (10, 1), "b.bin": (20, 2)})

    with second_journal(backend) as reader:
        assert reader.get_batch(first).state is BatchState.ENQUEUED
        assert reader.find_archived(DESTINATION, [("a.bin", 10, 1), ("b.bin", 20, 3), ("b.bin", 21, 2),
                                                  ("c.bin", 1, 1)]) == {"a.bin"}
        other = DESTINATION._replace(prefix="elsewhere/")
        assert reader.find_archived(other, [("a.bin", 10, 1)]) == set()  # per source and destination
        assert index_of(reader) == {"a.bin": (10, 1, first), "b.bin": (20, 2, first)}


def test_seal_batch_records_the_summary_sha256_in_its_transaction(journal: Journal,
                                                                  backend: JournalBackend) -> None:
    """The sealed manifest.json's SHA-256 is stored with the seal, read back through another
    handle; a batch sealed without one (and any unsealed batch) reads None."""
    digest = hashlib.sha256(b'{"manifest": "sealed"}').hexdigest()
    batch_id = open_batch(journal)
    journal.add_files(batch_id, [NewFile("a.bin", key_for(batch_id, "a.bin"), 1, 1)])
    journal.complete_file(batch_id, "a.bin", sha256=SHA, etag="e")
    journal.mark_scan_complete(batch_id)
    journal.set_batch_state(batch_id, BatchState.FINALIZING)
    assert journal.get_batch(batch_id).summary_sha256 is None
    journal.seal_batch(batch_id, manifest_key=f"staging/{batch_id}/manifest.json", finalized_at="t",
                       summary_sha256=digest)
    unrecorded = sealed_batch(journal, {"b.bin": (1, 1)})

    with second_journal(backend) as reader:
        sealed = reader.get_batch(batch_id)
        assert (sealed.state, sealed.summary_sha256) == (BatchState.ENQUEUED, digest)
        assert reader.get_state(batch_id).batch.summary_sha256 == digest
        assert [b.summary_sha256 for b in reader.list_batches() if b.batch_id == batch_id] == [digest]
        assert reader.get_batch(unrecorded).summary_sha256 is None


def test_find_archived_with_a_nul_in_a_path_matches_nothing_by_mistake(journal: Journal) -> None:
    sealed_batch(journal, {"a": (1, 1)})
    # SQLite's JSON functions end a string at NUL: "a\0b" must not be taken for "a".
    assert journal.find_archived(DESTINATION, [("a\0b", 1, 1)]) == set()
    assert journal.find_archived(DESTINATION, [("a\0b", 1, 1), ("a", 1, 1)]) == {"a"}


def test_the_index_holds_one_row_a_path_however_many_batches(journal: Journal) -> None:
    batches = [sealed_batch(journal, {"a.bin": (10, mtime)}) for mtime in (1, 2, 3)]

    assert index_of(journal) == {"a.bin": (10, 3, batches[-1])}
    assert journal.find_archived(DESTINATION, [("a.bin", 10, 1)]) == set()  # an older version is not the latest


def test_a_path_the_walk_did_not_find_drops_out_and_the_seen_ones_stay(journal: Journal) -> None:
    first = sealed_batch(journal, {"a.bin": (1, 1), "b.bin": (2, 2), "c.bin": (3, 3)})
    second = sealed_batch(journal, {"a.bin": (1, 9)}, seen=("b.bin",))  # c.bin deleted from the source

    assert index_of(journal) == {"a.bin": (1, 9, second), "b.bin": (2, 2, first)}


def test_covers_limits_what_a_selective_walk_drops(journal: Journal) -> None:
    first = sealed_batch(journal, {"docs/a.md": (1, 1), "docs/b.md": (1, 1), "src/c.py": (1, 1)})
    sealed_batch(journal, {}, seen=("docs/a.md",), covers=lambda path: path.startswith("docs/"))

    # docs/b.md was not found where the walk looked; src/c.py was never looked for.
    assert index_of(journal) == {"docs/a.md": (1, 1, first), "src/c.py": (1, 1, first)}


def test_a_skipped_file_is_kept_unless_covers_says_it_is_gone(journal: Journal) -> None:
    first = sealed_batch(journal, {"a.bin": (1, 1), "b.bin": (1, 1)})
    second = open_batch(journal)
    journal.add_files(second, [new_file(second, "a.bin", state=FileState.SKIPPED, error="unreadable"),
                               new_file(second, "b.bin", state=FileState.SKIPPED, error="missing")])
    sealed_batch(journal, {}, batch_id=second, covers=lambda path: path == "b.bin")

    assert index_of(journal) == {"a.bin": (1, 1, first)}


def test_an_older_batch_sealed_late_never_replaces_a_newer_version(journal: Journal) -> None:
    older, newer = open_batch(journal), open_batch(journal)  # ULIDs: older < newer
    sealed_batch(journal, {"a.bin": (1, 2), "n.bin": (1, 1)}, batch_id=newer)
    sealed_batch(journal, {"a.bin": (1, 1)}, batch_id=older)

    # The newer batch's versions stand, and the older walk drops nothing the newer one archived.
    assert index_of(journal) == {"a.bin": (1, 2, newer), "n.bin": (1, 1, newer)}


def test_an_older_walk_never_takes_back_a_newer_walks_seen_mark(journal: Journal) -> None:
    first = sealed_batch(journal, {"a.bin": (1, 1)})
    older, newer = open_batch(journal), open_batch(journal)
    journal.add_files(newer, [], seen_archived=["a.bin"])
    journal.add_files(older, [], seen_archived=["a.bin"])  # a resumed older batch walks after it

    sealed_batch(journal, {}, batch_id=newer)

    assert index_of(journal) == {"a.bin": (1, 1, first)}


def test_seal_batch_refuses_a_batch_that_cannot_become_enqueued(journal: Journal, batch_id: str) -> None:
    journal.set_batch_state(batch_id, BatchState.ABORTED)

    with pytest.raises(IllegalTransition):
        journal.seal_batch(batch_id, manifest_key="m", finalized_at="t")
    assert journal.get_batch(batch_id).state is BatchState.ABORTED
    assert index_of(journal) == {}


# Each batch state, and the moves that reach it from open.
STATE_PATHS: dict[BatchState, tuple[BatchState, ...]] = {
    BatchState.OPEN: (),
    BatchState.UPLOADING: (BatchState.UPLOADING,),
    BatchState.FAILED: (BatchState.UPLOADING, BatchState.FAILED),
    BatchState.FINALIZING: (BatchState.UPLOADING, BatchState.FINALIZING),
    BatchState.ENQUEUED: (BatchState.UPLOADING, BatchState.FINALIZING, BatchState.ENQUEUED),
    BatchState.ABORTED: (BatchState.ABORTED,),
    BatchState.EXPIRED: (BatchState.EXPIRED,),
}


def test_forget_batch_forgets_terminal_batches_only_and_keeps_their_counts(
        journal: Journal, backend: JournalBackend) -> None:
    assert set(STATE_PATHS) == set(BatchState)  # a state added later must be placed here
    batches: dict[BatchState, str] = {}
    for state, path in STATE_PATHS.items():
        batch_id = batches[state] = open_batch(journal)
        uploaded_file(journal, batch_id, "done.bin", size=7)
        journal.add_file(batch_id, new_file(batch_id, "big.bin", size=50))
        journal.start_file(batch_id, "big.bin")
        journal.record_upload_id(batch_id, "big.bin", "up-1", 25)
        journal.record_part(batch_id, "big.bin", PartRecord(1, 25, "e1", None))
        journal.add_file(batch_id, new_file(batch_id, "odd", state=FileState.SKIPPED, error="a socket"))
        move_batch(journal, batch_id, *path)
    before = {state: journal.get_state(batch_id) for state, batch_id in batches.items()}

    forgot = {state: journal.forget_batch(batch_id) for state, batch_id in batches.items()}

    assert forgot == {state: state.terminal for state in BatchState}
    with second_journal(backend) as reader:
        for state, batch_id in batches.items():
            after = reader.get_state(batch_id)
            assert (after.counts, after.bytes_by_state) == (before[state].counts, before[state].bytes_by_state)
            files = list(reader.iter_files(batch_id))
            if state.terminal:
                assert after.batch.forgotten_at is not None and files == []
                assert reader.list_parts(batch_id, "big.bin") == [] and not reader.upload_ids(batch_id)
                assert (after.failed, after.skipped) == ([], [])
            else:
                assert after.batch.forgotten_at is None
                assert sorted(record.rel_path for record in files) == ["big.bin", "done.bin", "odd"]
                assert len(reader.list_parts(batch_id, "big.bin")) == 1
    assert not any(journal.forget_batch(batch_id) for batch_id in batches.values())  # once


def test_a_forgotten_batch_still_answers_for_what_it_archived(journal: Journal) -> None:
    first = sealed_batch(journal, {"a.bin": (10, 1)})

    assert journal.forget_batch(first)

    assert journal.find_archived(DESTINATION, [("a.bin", 10, 1)]) == {"a.bin"}
    batch = journal.get_batch(first)
    assert (batch.state, batch.manifest_key) == (BatchState.ENQUEUED, f"staging/{first}/manifest.json")


def _fill(journal: Journal, count: int) -> str:
    batch_id = open_batch(journal)
    journal.add_files(batch_id, [new_file(batch_id, f"dir/{n:06d}/file-with-a-longish-name.bin")
                                 for n in range(count)])
    journal.set_batch_state(batch_id, BatchState.ABORTED)
    return batch_id


@pytest.mark.sqlite_only
def test_compact_gives_the_forgotten_space_back(journal: Journal, journal_path: Path) -> None:
    keep = _fill(journal, 200)
    doomed = _fill(journal, 20_000)
    journal.compact()  # a checkpoint: the size of the file alone
    full = journal.size_on_disk()

    assert journal.forget_batch(doomed)
    journal.compact()

    assert journal.size_on_disk() < full / 4
    assert len(list(journal.iter_files(keep))) == 200
    assert journal.integrity_check() == "ok"


@pytest.mark.sqlite_only
def test_compact_vacuums_an_older_journal_only_when_most_of_it_is_free(journal_path: Path) -> None:
    """A journal created before incremental auto-vacuum is rebuilt once more than half of its
    pages are free (and made incremental from then on); with less free, left as it is."""
    journal_path.parent.mkdir(mode=0o700)
    with closing(raw_connection(journal_path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for script in _MIGRATIONS:
            conn.executescript(script)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    journal = SQLiteJournal(journal_path)
    try:
        keep, doomed = _fill(journal, 10_000), _fill(journal, 2_000)
        journal.compact()
        full = journal.size_on_disk()
        journal.forget_batch(doomed)  # about a sixth free: kept for the next rows
        journal.compact()
        assert journal.size_on_disk() == full
        journal.forget_batch(keep)  # nearly all free
        journal.compact()
        assert journal.size_on_disk() < full / 4
        with closing(raw_connection(journal_path)) as conn:
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    finally:
        journal.close()


@pytest.mark.sqlite_only
def test_a_schema_4_journal_gets_the_archived_index_of_its_finalized_batches(journal_path: Path) -> None:
    journal_path.parent.mkdir(mode=0o700)
    with closing(raw_connection(journal_path)) as conn:
        for script in _MIGRATIONS[:4]:
            conn.executescript(script)
        conn.execute("PRAGMA user_version=4")
        for batch_id, state in (("01A", "enqueued"), ("01B", "enqueued"), ("01C", "failed")):
            conn.execute("INSERT INTO batches (batch_id, state, source_root, bucket, prefix, part_size, created_at, "
                         "updated_at, expires_at) VALUES (?, ?, '/data/src', 'archive', 'staging/', 5, 't', 't', 't')",
                         (batch_id, state))
        for batch_id, rel_path, mtime, state in (("01A", "a", 1, "uploaded"), ("01A", "b", 1, "uploaded"),
                                                 ("01B", "a", 2, "uploaded"), ("01B", "c", 1, "skipped"),
                                                 ("01C", "b", 2, "uploaded")):
            conn.execute("INSERT INTO files (batch_id, rel_path, key, size, mtime_ns, state, updated_at) "
                         "VALUES (?, ?, ?, 1, ?, ?, 't')", (batch_id, rel_path, f"k/{batch_id}/{rel_path}", mtime, state))
        conn.commit()

    journal = SQLiteJournal(journal_path)
    try:
        # The latest finalized version of each path; a failed batch's files are not archived.
        assert index_of(journal) == {"a": (1, 2, "01B"), "b": (1, 1, "01A")}
    finally:
        journal.close()
    with closing(raw_connection(journal_path)) as conn:
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "files_by_path" not in indexes  # --skip-archived reads the index now


def test_init_batch_unless_unfinished_names_the_unfinished_batch_of_the_source(journal: Journal) -> None:
    from archup.errors import BatchExists

    first = open_batch(journal)
    with pytest.raises(BatchExists) as caught:
        journal.init_batch(new_batch_id(), source_root="/data/src", bucket="archive", prefix="staging/",
                           part_size=8 * 1024 * 1024, unless_unfinished=True)
    assert caught.value.existing == first
    elsewhere = journal.init_batch(new_batch_id(), source_root="/data/src", bucket="other", prefix="staging/",
                                   part_size=8 * 1024 * 1024, unless_unfinished=True)
    assert elsewhere.batch_id != first
    with pytest.raises(BatchExists) as again:
        journal.init_batch(first, source_root="/x", bucket="y", prefix="z/", part_size=8 * 1024 * 1024)
    assert again.value.existing == first
    move_batch(journal, first, BatchState.ABORTED)
    assert journal.init_batch(new_batch_id(), source_root="/data/src", bucket="archive", prefix="staging/",
                              part_size=8 * 1024 * 1024, unless_unfinished=True).state is BatchState.OPEN


def test_skip_file_takes_a_file_no_one_may_read_out_of_the_upload(journal: Journal, batch_id: str,
                                                                  backend: JournalBackend) -> None:
    """uploading (its upload recorded) or failed -> skipped with the reason, the upload forgotten;
    an uploaded file is never skipped."""
    for rel_path in ("a.bin", "b.bin", "c.bin"):
        journal.add_file(batch_id, new_file(batch_id, rel_path))
    journal.start_file(batch_id, "a.bin")
    journal.record_upload_id(batch_id, "a.bin", "upload-1", 5 * 1024 * 1024)
    journal.record_part(batch_id, "a.bin", PartRecord(1, 5 * 1024 * 1024, "etag-1", None))
    journal.skip_file(batch_id, "a.bin", "file unreadable: Permission denied")
    journal.fail_file(batch_id, "b.bin", "unreadable: permission denied")
    journal.skip_file(batch_id, "b.bin", "file unreadable: Permission denied")
    journal.complete_file(batch_id, "c.bin", sha256=SHA, etag="e")
    with pytest.raises(IllegalTransition):
        journal.skip_file(batch_id, "c.bin", "file unreadable: Permission denied")

    with second_journal(backend) as reader:
        records = {path: reader.get_file(batch_id, path) for path in ("a.bin", "b.bin", "c.bin")}
        parts = reader.list_parts(batch_id, "a.bin")
        unreadable = reader.count_skipped(batch_id, ["file unreadable"])
    assert [(r.state, r.error, r.upload_id) for r in (records["a.bin"], records["b.bin"])] == [
        (FileState.SKIPPED, "file unreadable: Permission denied", None)] * 2
    assert records["c.bin"].state is FileState.UPLOADED
    assert parts == [] and unreadable == 2


def test_a_batch_is_updated_when_any_of_its_files_changes(journal: Journal, batch_id: str,
                                                           backend: JournalBackend) -> None:
    """status's "updated" is the newest change to the batch's row or any of its files, not the
    row's alone (which stays at its creation while files complete)."""
    journal.add_file(batch_id, new_file(batch_id, "a.bin"))
    journal.add_file(batch_id, new_file(batch_id, "b.bin"))
    journal.complete_file(batch_id, "b.bin", sha256=SHA, etag="e")
    with second_journal(backend) as reader:
        summary = reader.get_state(batch_id)
        completed = reader.get_file(batch_id, "b.bin")
    assert summary.last_file_change == completed.updated_at
    assert summary.updated_at == max(summary.batch.updated_at, completed.updated_at)


def _writer_with(journal: Journal, monkeypatch: pytest.MonkeyPatch, linger: float
                 ) -> tuple[str, list[str], list[int], list[str]]:
    """A batch of 20 pending files, the journal's commit_linger set, and its group commits counted."""
    batch_id = open_batch(journal)
    names = [f"f{index:02d}" for index in range(20)]
    journal.add_files(batch_id, [new_file(batch_id, name) for name in names])
    groups: list[int] = []
    real = journal.complete_files

    def counted(batch: str, completions: list[tuple[str, str, str]]) -> Any:
        groups.append(len(completions))
        return real(batch, completions)

    monkeypatch.setattr(journal, "complete_files", counted)
    monkeypatch.setattr(journal, "commit_linger", linger)
    return batch_id, names, groups, []


def test_completions_waiting_in_a_linger_are_one_group_and_close_ends_it(
        journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's first completion starts the linger; the rest queue up meanwhile and go in
    one transaction. close() ends the linger at once (the run's end waits for no timer)."""
    from archup.outcomes import CompletionWriter

    batch_id, names, groups, committed = _writer_with(journal, monkeypatch, 120.0)
    writer = CompletionWriter(journal, batch_id, lambda record, sha256, etag: committed.append(record.rel_path),
                              lambda error: committed.append(f"error: {error}"))
    for name in names:
        writer.put(journal.get_file(batch_id, name), "ab" * 32, "etag")
    closing = time.monotonic()
    writer.close()
    assert time.monotonic() - closing < 60  # not the linger's 120 s: close() ended it
    assert groups == [20] and committed == names
    assert all(journal.get_file(batch_id, name).state is FileState.UPLOADED for name in names)


def test_a_lingering_group_is_committed_when_its_linger_ends(journal: Journal,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from archup.outcomes import CompletionWriter

    batch_id, names, groups, _ = _writer_with(journal, monkeypatch, 0.05)
    done = threading.Event()
    writer = CompletionWriter(journal, batch_id, lambda record, sha256, etag: done.set(), lambda error: None)
    try:
        writer.put(journal.get_file(batch_id, names[0]), "ab" * 32, "etag")
        assert done.wait(timeout=30)  # without close()
        assert groups == [1] and journal.get_file(batch_id, names[0]).state is FileState.UPLOADED
    finally:
        writer.close()
