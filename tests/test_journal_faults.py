"""A hostile world around the journal, and secrets.

The journal cannot be created or written (a file where its directory should be,
a read-only directory or filesystem), is held by another writer past the busy
timeout, is corrupted, comes from a newer archup, or fills the disk. Each gives
one clear line on stderr, a documented exit code, no traceback, an intact
journal, and nothing marked uploaded that was not committed after its object
was stored. Then secrets: private permissions, keys that never climb out of
their prefix, credentials nowhere.

Tests run as root here, where permission bits do not bind; the read-only cases
therefore either use a fault no permission can lift (a file as the parent
directory, /proc, a read-only bind mount in a private mount namespace), or run
archup without CAP_DAC_OVERRIDE (dropped from its capability bounding set).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import both_transports
from privileges import can_drop_read_override, drop_read_override
from typer.testing import CliRunner
from ulid import ULID

from archup.cli import app
from archup.cli import common as cli_common
from archup.errors import JournalBusy, JournalError
from archup.journal import Journal, SQLiteJournal
from archup.journal.database import SQLiteDatabase
from archup.states import BatchState, FileState
from archup.store import S3Store, StoreConfig
from archup.uploader import Uploader, UploadOptions

MiB = 1024 * 1024
ARCHUP = [sys.executable, "-m", "archup"]


# -- helpers ---------------------------------------------------------------------------------------


def run_archup(*args: str, env: dict[str, str] | None = None, timeout: float = 90,
           preexec_fn: Any = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ARCHUP, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def one_error_line(stderr: str, stdout: str = "") -> str:
    """stderr's only error: one line, 'archup: error: ...', and never a traceback."""
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("archup: error: ")]
    assert len(errors) == 1, stderr
    assert not any(line.startswith(("  File ", "sqlite3.")) for line in stderr.splitlines()), stderr
    return errors[0]


def upload_args(cli: Any, journal: Path | str, source: Path, *extra: str) -> list[str]:
    return ["upload", "--journal", str(journal), "--bucket", cli.bucket, "--endpoint-url", cli.endpoint,
            *extra, str(source)]


def make_source(root: Path, count: int = 3, size: int = 10) -> dict[str, bytes]:
    files = {f"dir{index % 2}/file-{index:03d}.txt": f"file {index}\n".encode().ljust(size, b".")
             for index in range(count)}
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def file_digests(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.iterdir()) if path.is_file()}


def raw(path: Path) -> sqlite3.Connection:
    """A second connection that is not archup's: durability is checked through it."""
    return sqlite3.connect(path, isolation_level=None)


def can_unshare_mounts() -> bool:
    if os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


def check_uploaded_rows_have_their_objects(journal_path: Path, s3: Any, bucket: str, source: Path) -> int:
    """Every row marked uploaded has its object in the bucket with the file's bytes and digest."""
    with closing(raw(journal_path)) as conn:
        rows = conn.execute("SELECT rel_path, key, sha256 FROM files WHERE state = 'uploaded'").fetchall()
    for rel_path, key, digest in rows:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == (source / rel_path).read_bytes(), rel_path
        assert hashlib.sha256(body).hexdigest() == digest, rel_path
    return len(rows)


# -- the journal cannot be created or written ------------------------------------------------------


@pytest.mark.parametrize("command", ["upload", "list"])
def test_journal_parent_is_a_file(cli, tmp_path: Path, command: str) -> None:
    """A regular file where the journal's directory should be: ENOTDIR, whoever runs it."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a file, not a directory\n")
    journal = blocker / "journal.db"
    source = tmp_path / "src"
    make_source(source)
    args = upload_args(cli, journal, source) if command == "upload" else ["list", "--journal", str(journal)]
    result = run_archup(*args)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr, result.stdout)
    verb = "create" if command == "upload" else "open"  # list never creates a journal
    assert f"cannot {verb} journal {journal}" in line and "Not a directory" in line
    assert blocker.read_bytes() == b"a file, not a directory\n"


def test_journal_under_proc_cannot_be_created(cli, tmp_path: Path) -> None:
    journal = Path("/proc/self/archup-no-such-dir/journal.db")
    source = tmp_path / "src"
    make_source(source)
    result = run_archup(*upload_args(cli, journal, source))
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr, result.stdout)
    assert f"cannot create journal {journal}" in line


@pytest.mark.parametrize("exists", [False, True], ids=["new-journal", "existing-journal"])
def test_journal_directory_read_only_by_permission(cli, tmp_path: Path, exists: bool) -> None:
    """A 0500 directory; as root, archup runs without CAP_DAC_OVERRIDE so the bits bind."""
    if not can_drop_read_override():
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (prctl PR_CAPBSET_DROP refused)")
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    journal = directory / "journal.db"
    if exists:
        SQLiteJournal(journal).close()
    before = file_digests(directory)
    source = tmp_path / "src"
    make_source(source)
    directory.chmod(0o500)
    try:
        result = run_archup(*upload_args(cli, journal, source), preexec_fn=drop_read_override)
        listed = run_archup("list", "--journal", str(journal), preexec_fn=drop_read_override)
    finally:
        directory.chmod(0o700)
    # 'list' never creates a journal: with none there, it has nothing to list (exit 0).
    for run in (result, listed) if exists else (result,):
        assert run.returncode == 1, run.stderr
        line = one_error_line(run.stderr, run.stdout)
        assert str(journal) in line
    if not exists:
        assert listed.returncode == 0 and f"no journal at {journal}" in listed.stderr, listed.stderr
    assert file_digests(directory) == before  # nothing written, nothing left behind


def test_journal_on_a_read_only_filesystem(cli, tmp_path: Path) -> None:
    """EROFS: a read-only bind mount in a private mount namespace, which no permission can lift."""
    if not can_unshare_mounts():
        pytest.skip("needs root and mount namespaces (unshare -m) to make a read-only bind mount")
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    journal = directory / "journal.db"
    SQLiteJournal(journal).close()
    before = file_digests(directory)
    source = tmp_path / "src"
    make_source(source)
    command = shlex.join([*ARCHUP, *upload_args(cli, journal, source)])
    where = shlex.quote(str(directory))
    script = f"mount --bind {where} {where} && mount -o remount,ro,bind {where} && exec {command}"
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=90,
                            check=False)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr, result.stdout)
    assert str(journal) in line
    assert file_digests(directory) == before


# -- another writer holds the journal --------------------------------------------------------------


@contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another writer: a second connection inside BEGIN IMMEDIATE."""
    conn = raw(path)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def test_library_journal_locked_past_the_busy_timeout(journal_path: Path) -> None:
    SQLiteJournal(journal_path).close()
    with write_lock_held(journal_path):
        started = time.monotonic()
        with pytest.raises(JournalBusy) as excinfo:
            SQLiteJournal(journal_path, busy_timeout=0.2)
        waited = time.monotonic() - started
    assert 0.2 <= waited < 10, waited  # it waited for the lock, then gave up
    assert str(journal_path) in str(excinfo.value) and "locked" in str(excinfo.value)
    SQLiteJournal(journal_path, busy_timeout=0.2).close()  # usable again once the writer is gone


def test_library_journal_locked_during_the_upload_then_resumed(cli, moto_endpoint: str, s3, bucket,
                                                               journal_path: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = make_source(source, count=6)
    journal = SQLiteJournal(journal_path, busy_timeout=0.2)
    try:
        batch = journal.init_batch(str(ULID()), source_root=str(source), bucket=bucket, prefix="staging/",
                                   part_size=8 * MiB, endpoint_url=moto_endpoint)
        uploader = Uploader(journal, S3Store(StoreConfig(bucket=bucket, endpoint_url=moto_endpoint)),
                            batch.batch_id, UploadOptions(parallel=2))
        uploader.scan()
        with write_lock_held(journal_path), pytest.raises(JournalBusy):
            result = uploader.send()
            raise result.fatal or AssertionError("send() went on while another writer held the journal")
    finally:
        journal.close()
    with closing(raw(journal_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        states = [row[0] for row in conn.execute("SELECT state FROM files")]
    assert sorted(states) == ["pending"] * len(files)  # no completion committed, none claimed

    rerun = cli("upload", "--json", str(source))  # picks the same batch up
    assert rerun.exit_code == 0, rerun.stderr
    assert json.loads(rerun.stdout)["batch_id"] == batch.batch_id
    assert check_uploaded_rows_have_their_objects(journal_path, s3, bucket, source) == len(files)


@pytest.mark.parametrize("full_object", [True, False], ids=["full-object-crc32", "composite-sha256"])
def test_journal_error_recording_the_last_part_never_completes_a_short_object(
        cli, moto_endpoint: str, s3, bucket, journal_path: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, full_object: bool) -> None:
    """The server holds part 3 but the journal could not record it: the upload must not be
    completed from the two recorded parts (a 10 MiB object for a 15 MiB file, marked uploaded)."""
    source = tmp_path / "src"
    source.mkdir()
    data = os.urandom(15 * MiB)
    (source / "big.bin").write_bytes(data)
    real_record_part = SQLiteJournal.record_part

    def disk_full_on_part_3(self: Journal, batch_id: str, rel_path: str, part: Any) -> None:
        if part.part_number == 3:
            raise JournalError("journal: database or disk is full (simulated)")
        real_record_part(self, batch_id, rel_path, part)

    monkeypatch.setattr(SQLiteJournal, "record_part", disk_full_on_part_3)
    journal = SQLiteJournal(journal_path)
    try:
        batch = journal.init_batch(str(ULID()), source_root=str(source), bucket=bucket, prefix="staging/",
                                   part_size=5 * MiB, endpoint_url=moto_endpoint)
        store = S3Store(StoreConfig(bucket=bucket, endpoint_url=moto_endpoint, full_object_checksum=full_object))
        result = Uploader(journal, store, batch.batch_id,
                          UploadOptions(parallel=1, part_size=5 * MiB, multipart_threshold=5 * MiB)).run()
        record = journal.get_file(batch.batch_id, "big.bin")
    finally:
        journal.close()
    assert isinstance(result.fatal, JournalError), result.fatal
    assert record.state is not FileState.UPLOADED
    key = record.key
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=key)  # nothing completed

    monkeypatch.setattr(SQLiteJournal, "record_part", real_record_part)
    rerun = cli("upload", "--json", "--part-size", "5MiB", str(source))  # the disk has room again
    assert rerun.exit_code == 0, rerun.stderr
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_cli_journal_locked_past_the_busy_timeout_exits_4(cli, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI waits 30 s for the lock; in-process its journal gets 0.2 s so the test stays fast."""
    real_journal = cli_common.SQLiteJournal

    def impatient(path: Any, **kwargs: Any) -> Journal:
        return real_journal(path, **{**kwargs, "busy_timeout": 0.2})

    monkeypatch.setattr(cli_common, "SQLiteJournal", impatient)
    source = tmp_path / "src"
    make_source(source)
    SQLiteJournal(cli.journal).close()
    with write_lock_held(cli.journal):
        result = cli("upload", str(source))
    assert result.exit_code == 4, result.stderr
    line = one_error_line(result.stderr, result.stdout)
    assert f"journal {cli.journal} is locked by another writer" in line and "try again" in line
    journal = SQLiteJournal(cli.journal)
    try:
        assert journal.list_batches() == []
    finally:
        journal.close()


# -- corrupted, or from a newer archup -------------------------------------------------------------


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not SQLite\xff" * 500)


def _truncated_to_one_page(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(4096)


def _truncated_in_the_header(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(50)


def _page_overwritten(path: Path) -> None:
    """The root page of the batches table (which every command reads) overwritten with garbage
    (page 3: page 2 of an auto-vacuum database is its first pointer map)."""
    with closing(raw(path)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'batches'").fetchone()[0]
        assert root == 3
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xde\xad\xbe\xef" * (page_size // 4))


CORRUPTIONS = {"garbage": _garbage, "truncated-to-one-page": _truncated_to_one_page,
               "truncated-in-the-header": _truncated_in_the_header, "page-overwritten": _page_overwritten}


def _journal_with_a_batch(cli: Any, source: Path) -> str:
    result = cli("upload", "--json", str(source))
    assert result.exit_code == 0, result.stderr
    return str(json.loads(result.stdout)["batch_id"])


CORRUPTION_CASES = [
    pytest.param(corruption, command, id=f"{corruption}-{command}")
    for corruption in CORRUPTIONS for command in ("upload", "status", "list")
]


@pytest.mark.parametrize("corruption,command", CORRUPTION_CASES)
def test_corrupted_journal_is_a_clear_error(cli, tmp_path: Path, corruption: str, command: str) -> None:
    source = tmp_path / "src"
    make_source(source)
    batch_id = _journal_with_a_batch(cli, source)
    assert not Path(f"{cli.journal}-wal").exists()
    CORRUPTIONS[corruption](cli.journal)
    before = file_digests(cli.journal.parent)
    args = {
        "upload": upload_args(cli, cli.journal, source),
        "status": ["status", batch_id, "--journal", str(cli.journal)],
        "list": ["list", "--journal", str(cli.journal)],
    }[command]
    result = run_archup(*args)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr, result.stdout)
    assert f"journal {cli.journal}" in line
    assert file_digests(cli.journal.parent) == before  # refused, never rewritten


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupted_journal_message_says_what_to_do(cli, tmp_path: Path, corruption: str) -> None:
    source = tmp_path / "src"
    make_source(source)
    batch_id = _journal_with_a_batch(cli, source)
    CORRUPTIONS[corruption](cli.journal)
    result = cli("status", batch_id)
    assert result.exit_code == 1, result.stderr
    assert "move it aside" in one_error_line(result.stderr, result.stdout)


def test_journal_truncated_to_zero_bytes_is_a_new_empty_journal(cli, tmp_path: Path) -> None:
    """archup creates the journal file empty before SQLite writes it, so an empty file is a new
    journal: its batches are gone (their objects stay in the bucket; 'archup gc' finds orphans)."""
    source = tmp_path / "src"
    make_source(source)
    batch_id = _journal_with_a_batch(cli, source)
    cli.journal.write_bytes(b"")
    result = run_archup("status", batch_id, "--journal", str(cli.journal))
    assert result.returncode == 2, result.stderr
    assert f"no batch {batch_id}" in one_error_line(result.stderr, result.stdout)


def test_journal_from_a_newer_archup_is_refused_and_not_modified(cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    make_source(source)
    batch_id = _journal_with_a_batch(cli, source)
    with closing(raw(cli.journal)) as conn:
        conn.execute("PRAGMA user_version = 999")
    before = file_digests(cli.journal.parent)
    runs = [run_archup(*upload_args(cli, cli.journal, source)), run_archup("status", batch_id, "--journal", str(cli.journal)),
            run_archup("list", "--journal", str(cli.journal))]
    for result in runs:
        assert result.returncode == 1, result.stderr
        line = one_error_line(result.stderr, result.stdout)
        assert f"journal {cli.journal} has schema version 999" in line and "upgrade archup" in line
    assert file_digests(cli.journal.parent) == before
    with closing(raw(cli.journal)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 999


def test_newer_journal_in_rollback_mode_is_refused_and_not_modified(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE from_the_future (x)")
        conn.execute("PRAGMA user_version = 999")
        conn.commit()
    before = path.read_bytes()
    result = run_archup("list", "--journal", str(path))
    assert result.returncode == 1, result.stderr
    assert "schema version 999" in one_error_line(result.stderr, result.stdout)
    assert path.read_bytes() == before


# -- the disk fills up -----------------------------------------------------------------------------


def test_disk_full_during_the_upload_is_a_clear_error_and_resumable(cli, s3, bucket, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """After the scan, every journal connection is capped at the database's size (PRAGMA
    max_page_count): the next write that needs a new page fails with SQLITE_FULL, as on a full disk."""
    source = tmp_path / "src"
    files = make_source(source, count=120)
    full = threading.Event()
    capped: set[int] = set()
    real_connection = SQLiteDatabase.connection
    real_scan = Uploader.scan

    def connection(self: SQLiteDatabase) -> sqlite3.Connection:
        conn = real_connection(self)
        if full.is_set() and id(conn) not in capped:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}").fetchone()
            capped.add(id(conn))
        return conn

    def scan_then_fill(self: Uploader) -> None:
        real_scan(self)
        full.set()

    monkeypatch.setattr(SQLiteDatabase, "connection", connection)
    monkeypatch.setattr(Uploader, "scan", scan_then_fill)
    result = cli("upload", str(source))  # in-process: an escaping exception would fail the test here
    assert result.exit_code == 1, result.stderr
    line = one_error_line(result.stderr, result.stdout)
    assert f"journal {cli.journal}" in line and "full" in line

    with closing(raw(cli.journal)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        batch_state = conn.execute("SELECT state FROM batches").fetchone()[0]
    assert batch_state != BatchState.ENQUEUED.value
    uploaded = check_uploaded_rows_have_their_objects(cli.journal, s3, bucket, source)
    assert uploaded < len(files)

    # Space again: the same command finishes the batch, every file exactly once.
    full.clear()
    monkeypatch.setattr(SQLiteDatabase, "connection", real_connection)
    rerun = cli("upload", "--json", str(source))
    assert rerun.exit_code == 0, rerun.stderr
    assert json.loads(rerun.stdout)["files_uploaded"] == len(files)
    assert check_uploaded_rows_have_their_objects(cli.journal, s3, bucket, source) == len(files)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_disk_full_on_a_real_tiny_filesystem(cli, s3, bucket, tmp_path: Path) -> None:
    """A 256 KiB tmpfs holds the journal (private mount namespace): the scan fills it (ENOSPC)."""
    if not can_unshare_mounts():
        pytest.skip("needs root and mount namespaces (unshare -m) to mount a tiny tmpfs")
    source = tmp_path / "src"
    make_source(source, count=1500)
    state = tmp_path / "state"
    state.mkdir()
    copy = tmp_path / "copy"
    copy.mkdir()
    journal = state / "journal.db"
    command = shlex.join([*ARCHUP, *upload_args(cli, journal, source)])
    script = (f"mount -t tmpfs -o size=256k,mode=0700 tmpfs {shlex.quote(str(state))} || exit 99\n"
              f"{command}\ncode=$?\ncp -a {shlex.quote(str(state) + '/.')} {shlex.quote(str(copy))}\nexit $code\n")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr, result.stdout)
    assert f"journal {journal}" in line and "full" in line
    with closing(raw(copy / "journal.db")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM files WHERE state = 'uploaded'").fetchone()[0] == 0
        assert conn.execute("SELECT scan_complete FROM batches").fetchone()[0] == 0
    assert [k["Key"] for k in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
            if "/files/" in k["Key"]] == []


# -- secrets: private files ------------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_journal_lock_and_log_files_are_private(cli, bucket, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With umask 0 nothing masks a missing explicit mode: what is checked is what archup asks for."""
    source = tmp_path / "src"
    make_source(source)
    journal = tmp_path / "fresh" / "state" / "journal.db"
    log_file = tmp_path / "archup.log"
    seen: dict[str, tuple[bool, int]] = {}
    real_send = Uploader.send

    def send_and_look(self: Uploader) -> Any:
        result = real_send(self)
        # Mid-run: the WAL and shared-memory files and the lock files exist now.
        for path in journal.parent.rglob("*"):
            seen[str(path.relative_to(journal.parent))] = (path.is_dir(), mode_of(path))
        return result

    monkeypatch.setattr(Uploader, "send", send_and_look)
    previous = os.umask(0)
    try:
        result = CliRunner().invoke(app, ["--log-file", str(log_file), "-vvv", "upload", "--journal", str(journal),
                                          "--bucket", bucket, "--endpoint-url", cli.endpoint, str(source)],
                                    catch_exceptions=False)
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.stderr
    assert mode_of(journal.parent) == 0o700
    assert mode_of(journal) == 0o600
    assert mode_of(log_file) == 0o600 and log_file.stat().st_size > 0
    assert {"journal.db-wal", "journal.db-shm", "locks"} <= set(seen), seen
    for name, (is_dir, mode) in seen.items():
        assert mode == (0o700 if is_dir else 0o600), (name, oct(mode))


# -- secrets: keys never climb out of their prefix -------------------------------------------------


@pytest.mark.parametrize("prefix", ["../x", "a/../b", "x/..", "./x", "..", "a/./b"])
def test_prefix_with_dot_segments_is_refused(cli, tmp_path: Path, prefix: str) -> None:
    source = tmp_path / "src"
    make_source(source)
    result = run_archup(*upload_args(cli, cli.journal, source, "--prefix", prefix))
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr, result.stdout)
    assert "prefix" in line and "'..'" in line
    if cli.journal.exists():
        journal = SQLiteJournal(cli.journal)
        try:
            assert journal.list_batches() == []
        finally:
            journal.close()


@pytest.mark.parametrize("prefix", ["/x", "//x/"])
def test_leading_slash_in_prefix_is_normalized(cli, s3, bucket, tmp_path: Path, prefix: str) -> None:
    source = tmp_path / "src"
    files = make_source(source)
    for name in ("...", "..hidden", ".dot"):  # names made of dots are names, never '..' segments
        (source / name).write_bytes(name.encode())
        files[name] = name.encode()
    result = cli("upload", "--json", "--prefix", prefix, str(source))
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["prefix"] == f"x/{summary['batch_id']}/"
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert len([key for key in keys if "/files/" in key]) == len(files)
    for key in keys:
        assert key.startswith("x/"), key
        assert not key.startswith("/")
        assert ".." not in key.split("/") and "." not in key.split("/"), key


# -- secrets: credentials nowhere ------------------------------------------------------------------

CANARY_KEY_ID = "AKIACANARYJF7Q3ZX9WQ"
CANARY_SECRET = "canaryJournalFaultsSecret/9f8e7d6c5b4a3+ZzYyXxWw12345"
CANARY_TOKEN = "canaryJFToken//FwoGZXIvYXdzEBcaDH7Q3ZX9canary+session=="


def _process_has_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False


@both_transports
def test_credentials_never_in_output_log_journal_wal_manifest_or_command_line(
        cli, s3, bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CANARY_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", CANARY_TOKEN)
    credentials = boto3.session.Session().get_credentials()
    assert (credentials.access_key, credentials.secret_key, credentials.token) == (
        CANARY_KEY_ID, CANARY_SECRET, CANARY_TOKEN)  # these are what the process signs with
    canaries = [CANARY_KEY_ID, CANARY_SECRET, CANARY_TOKEN, CANARY_SECRET.split("/")[0], CANARY_TOKEN[14:40]]
    source = tmp_path / "src"
    files = make_source(source, count=4)
    (source / "big.bin").write_bytes(os.urandom(6 * MiB))  # a multipart upload too
    log_file = tmp_path / "archup.log"
    SQLiteJournal(cli.journal).close()

    # Hold the journal's write lock so the real process waits (busy timeout) where its command line
    # can be read; keep a reader open so the -wal file outlives the run and its bytes can be read.
    keeper = raw(cli.journal)
    keeper.execute("BEGIN")  # an open read transaction: the closing writer cannot delete the WAL
    keeper.execute("SELECT count(*) FROM batches").fetchone()
    try:
        with write_lock_held(cli.journal):
            proc = subprocess.Popen(
                [*ARCHUP, "-vvv", "--log-file", str(log_file), *upload_args(cli, cli.journal, source, "--json",
                                                                             "--part-size", "5MiB")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 60
            while not _process_has_open(proc.pid, cli.journal):  # a bounded poll, short interval
                try:
                    proc.wait(timeout=0.01)
                except subprocess.TimeoutExpired:
                    assert time.monotonic() < deadline, "archup never opened the journal"
                else:
                    pytest.fail(f"archup ended before it opened the journal: {proc.communicate()}")
            command_line = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        stored = {name: (cli.journal.parent / name).read_bytes()
                  for name in ("journal.db", "journal.db-wal", "journal.db-shm")}
        stored.update({str(path): path.read_bytes() for path in (cli.journal.parent / "locks").iterdir()})
    finally:
        keeper.close()
    assert len(stored["journal.db-wal"]) > 0  # the WAL really was there to be read
    summary = json.loads(stdout)
    assert summary["files_uploaded"] == len(files) + 1
    log_text = log_file.read_text()
    assert "authorization" in log_text.lower()  # botocore's debug output, requests included, was logged
    for item in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        head = s3.head_object(Bucket=bucket, Key=item["Key"])
        stored[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        stored[item["Key"] + " (metadata)"] = json.dumps(head["Metadata"]).encode()
    assert any(name.endswith("manifest.json") for name in stored)
    assert any(name.endswith("manifest.jsonl") for name in stored)
    texts = {"stdout": stdout, "stderr": stderr, "log file": log_text,
             "command line": command_line.decode("utf-8", "replace")}
    for canary in canaries:
        for where, text in texts.items():
            assert canary not in text, f"{canary!r} in {where}"
        for where, data in stored.items():
            assert canary.encode() not in data, f"{canary!r} in {where}"
