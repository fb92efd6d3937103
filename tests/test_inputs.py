"""Hostile inputs: every odd thing a source tree can hold, uploaded over HTTP to a moto S3 server.

Each case asserts its documented behaviour (docs/reliability.md): the file is
uploaded, skipped with a reason, or failed by name with a clear reason; the
exit code; that nothing is lost (every file of the source is accounted for in
the journal) and that nothing is marked uploaded that is not in the bucket
with exactly its bytes. The journal is read back through a fresh connection
after the command returned, the bucket through the separate ``s3`` client.

Faults "between the scan and the read" are placed exactly by wrapping
``Uploader.scan`` (the CLI scans the whole source into the journal before any
file is read), never by racing a sleep.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import socket
import stat
import sys
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self

import pytest
from conftest import Cli
from faultproxy import Canned, FaultProxy, RequestHead, Rule
from faultstore import Call, Faults
from privileges import can_drop_read_override, drop_read_override
from ulid import ULID

import archup.multipart
from archup.journal import BatchRecord, FileRecord, SQLiteJournal
from archup.multipart import MAX_PARTS, MIN_PART_SIZE, part_size_for
from archup.states import BatchState, FileState
from archup.store import S3Store, StoreConfig, TransportKind
from archup.uploader import Uploader, UploadOptions

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB
PART = 5 * MiB          # --part-size 5MiB: the smallest part S3 allows, so the multipart cases stay small
MAX_KEY_BYTES = 1024    # S3's limit on an object key, in UTF-8 bytes


# -- helpers ---------------------------------------------------------------------------------------


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes that differ from part to part, so a swapped, repeated or stale part changes the content."""
    block = hashlib.sha256(f"seed {seed}".encode()).digest() * (MiB // 32)
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += counter.to_bytes(8, "big") + block[: MiB - 8]
        counter += 1
    return bytes(out[:size])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def only_batch(journal_path: Path) -> BatchRecord:
    journal = SQLiteJournal(journal_path)
    try:
        batches = journal.list_batches()
    finally:
        journal.close()
    assert len(batches) == 1, batches
    return batches[0]


def journal_files(journal_path: Path, batch_id: str) -> dict[str, FileRecord]:
    journal = SQLiteJournal(journal_path)
    try:
        return {record.rel_path: record for record in journal.iter_files(batch_id)}
    finally:
        journal.close()


def bucket_files(s3: Any, bucket: str, batch: BatchRecord) -> dict[str, bytes]:
    """Every object under the batch's files/ folder, by path relative to the source."""
    prefix = f"{batch.batch_prefix}files/"
    found: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"][len(prefix):]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def open_uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    return list(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def manifest_paths(s3: Any, bucket: str, batch: BatchRecord) -> list[str]:
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"{batch.batch_prefix}manifest.json")["Body"].read())
    raw = s3.get_object(Bucket=bucket, Key=summary["entries"]["key"])["Body"].read()
    return [json.loads(line)["path"] for line in raw.decode("utf-8").splitlines()]


def check_batch(cli: Any, s3: Any, bucket: str, *, uploaded: dict[str, bytes],
                skipped: dict[str, str] | None = None, failed: dict[str, str] | None = None,
                finalized: bool) -> tuple[BatchRecord, dict[str, FileRecord]]:
    """The journal accounts for exactly these files (nothing lost), each in the expected state
    with a reason containing the given text; the bucket holds exactly the uploaded ones, byte
    for byte; no multipart upload is left open; the manifest (if sealed) lists the uploaded files."""
    skipped, failed = skipped or {}, failed or {}
    batch = only_batch(cli.journal)
    records = journal_files(cli.journal, batch.batch_id)
    assert set(records) == set(uploaded) | set(skipped) | set(failed), sorted(records)
    states = {path: record.state for path, record in records.items()}
    assert states == {**{p: FileState.UPLOADED for p in uploaded}, **{p: FileState.SKIPPED for p in skipped},
                      **{p: FileState.FAILED for p in failed}}, states
    for path, reason in {**skipped, **failed}.items():
        error = records[path].error
        assert error is not None and reason in error, (path, error)
    for path, data in uploaded.items():
        assert records[path].sha256 == sha256(data), path
        assert records[path].size == len(data), path
    stored = bucket_files(s3, bucket, batch)
    assert set(stored) == set(uploaded), sorted(stored)
    for path, data in uploaded.items():
        assert stored[path] == data, path
    assert open_uploads(s3, bucket) == []
    if finalized:
        assert batch.state is BatchState.ENQUEUED
        assert sorted(manifest_paths(s3, bucket, batch)) == sorted(uploaded)
    else:
        assert batch.state is not BatchState.ENQUEUED
    return batch, records


def upload_json(cli: Any, source: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli("upload", "--json", *args, str(source))
    assert "Traceback" not in result.stderr
    document = json.loads(result.stdout)
    assert isinstance(document, dict), result.stdout
    return result.exit_code, document


def after_scan(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run ``action`` right after the scan wrote every file into the journal, before any is read."""
    original = Uploader.scan

    def scan_then_act(self: Uploader) -> None:
        original(self)
        action()

    monkeypatch.setattr(Uploader, "scan", scan_then_act)


# -- unreadable ------------------------------------------------------------------------------------


def test_unreadable_file_and_directory_with_real_permission_bits(cli, s3, bucket, tmp_path: Path) -> None:
    """chmod 000 as a real process. Root ignores permission bits, so as root archup runs without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (dropped from its bounding set): the bits then bind it too."""
    if not can_drop_read_override():
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (prctl PR_CAPBSET_DROP refused)")
    import subprocess
    source = tmp_path / "src"
    files = {"ok.txt": b"readable\n", "sub/also-ok.txt": b"also readable\n"}
    for rel, data in files.items():
        write(source / rel, data)
    locked = write(source / "locked.txt", b"no one may read this\n")
    locked_dir = source / "locked-dir"
    write(locked_dir / "inner.txt", b"inside an unreadable directory\n")
    locked.chmod(0)
    locked_dir.chmod(0)
    try:
        full = [sys.executable, "-m", "archup", "upload", *cli.common("upload"), str(source)]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=120, check=False,
                              preexec_fn=drop_read_override)
    finally:
        locked.chmod(0o644)
        locked_dir.chmod(0o755)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    # A file no one may read is skipped by name like the directory, and the batch sealed without both.
    assert "skipped: locked.txt: file unreadable: Permission denied" in proc.stderr
    assert "skipped: locked-dir: directory unreadable: Permission denied" in proc.stderr
    check_batch(cli, s3, bucket, uploaded=files,
                skipped={"locked.txt": "file unreadable: Permission denied", "locked-dir": "directory unreadable"},
                finalized=True)


@pytest.mark.parametrize("size", [100, PART], ids=["single-put", "multipart"])
def test_unreadable_file_is_skipped_by_name_in_process(cli, s3, bucket, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """Root-proof: every way of opening this one path (open(), io.open(), os.open()) raises EACCES,
    as it would for any user the permission bits keep out; every other path opens as usual."""
    source = tmp_path / "src"
    files = {"ok.txt": b"readable\n"}
    write(source / "ok.txt", files["ok.txt"])
    write(source / "locked.bin", pattern(size))

    def refuse_locked(real: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).endswith("locked.bin"):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
            return real(path, *args, **kwargs)
        return guarded

    monkeypatch.setattr(builtins, "open", refuse_locked(builtins.open))
    monkeypatch.setattr(io, "open", refuse_locked(io.open))
    monkeypatch.setattr(os, "open", refuse_locked(os.open))
    result = cli("upload", "--part-size", "5MiB", str(source))
    assert result.exit_code == 3, result.stderr
    assert "skipped: locked.bin: file unreadable: Permission denied" in result.stderr
    assert "sealed without 1 path(s) that could not be read" in result.stderr  # and what to do
    check_batch(cli, s3, bucket, uploaded=files, skipped={"locked.bin": "file unreadable: Permission denied"},
                finalized=True)


def refuse_listing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Root-proof: listing a directory called ``name`` raises EACCES, as for a user kept out."""
    real_scandir = os.scandir

    def refuse(path: Any = ".") -> Any:
        if os.fsdecode(path).endswith(name):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)


@pytest.mark.parametrize(("exclude", "reported"), [
    pytest.param(None, True, id="no-exclude"),
    pytest.param("*.tmp", True, id="exclude-other-files"),
    pytest.param("lost+found/", False, id="exclude-dir-pattern"),
    pytest.param("/lost+found/**", False, id="exclude-everything-under"),
])
def test_unreadable_directory_is_partial_unless_excluded(cli, s3, bucket, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, exclude: str | None,
                                                         reported: bool) -> None:
    """An unreadable lost+found must not make every cron run partial once the user excluded it."""
    source = tmp_path / "src"
    files = {"ok.txt": b"readable\n"}
    write(source / "ok.txt", files["ok.txt"])
    write(source / "lost+found" / "x", b"never listed\n")
    refuse_listing(monkeypatch, "lost+found")
    result = cli("upload", *(["--exclude", exclude] if exclude else []), str(source))
    if reported:
        assert result.exit_code == 3, result.stderr
        assert "skipped: lost+found: directory unreadable: Permission denied" in result.stderr
        check_batch(cli, s3, bucket, uploaded=files, skipped={"lost+found": "directory unreadable"}, finalized=True)
    else:
        assert result.exit_code == 0, result.stderr
        assert "lost+found" not in result.stderr
        check_batch(cli, s3, bucket, uploaded=files, finalized=True)


@pytest.mark.parametrize("mode", ["--quiet", "--json"])
def test_unreadable_paths_are_named_also_with_quiet_and_json(cli, s3, bucket, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """--quiet is errors only, and a path that could not be read is one: still named."""
    source = tmp_path / "src"
    write(source / "ok.txt", b"readable\n")
    write(source / "lost+found" / "x", b"never listed\n")
    refuse_listing(monkeypatch, "lost+found")
    result = cli("upload", mode, str(source))
    assert result.exit_code == 3, result.stderr
    if mode == "--json":
        summary = json.loads(result.stdout)
        assert summary["files_unreadable"] == 1
        assert summary["unreadable"] == [{"path": "lost+found", "error": "directory unreadable: Permission denied"}]
    else:
        assert result.stdout == ""
        assert "unreadable: lost+found: directory unreadable: Permission denied" in result.stderr


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_partial_run_names_the_first_20_failures_a_count_and_the_resume_command(
        cli, s3, bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_json: bool) -> None:
    source = tmp_path / "src"
    write(source / "ok.txt", b"readable\n")
    locked = {f"locked-{index:02d}.txt" for index in range(25)}
    for name in locked:
        write(source / name, b"no one may read this\n")
    real_open = os.open

    # An I/O error: a transient one, which fails the file (a permission refusal skips it).
    def refuse_locked(path: Any, *args: Any, **kwargs: Any) -> Any:
        if os.path.basename(os.fsdecode(path)) in locked:
            raise OSError(errno.EIO, "Input/output error", os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_locked)
    result = cli("upload", *(["--json"] if as_json else []), str(source))

    assert result.exit_code == 3, result.stderr
    batch = only_batch(cli.journal)
    if as_json:
        report = json.loads(result.stdout)
        assert report["files_failed"] == 25 and len(report["failures"]) == 20
        assert {item["path"] for item in report["failures"]} < locked
        assert all("Input/output error" in item["error"] for item in report["failures"])
        assert report["resume"].startswith(f"archup resume {batch.batch_id}")
    else:
        named = [line for line in result.stderr.splitlines() if line.startswith("failed: locked-")]
        assert len(named) == 20, result.stderr
        assert "... and 5 more failed" in result.stderr
        assert f"resume with 'archup resume {batch.batch_id}" in result.stderr


# -- changed between the scan and the read ---------------------------------------------------------


def test_library_file_deleted_between_scan_and_send(moto_endpoint: str, s3, bucket, journal_path: Path,
                                                    tmp_path: Path) -> None:
    source = tmp_path / "src"
    write(source / "stays.txt", b"stays\n")
    write(source / "gone.txt", b"deleted after the scan\n")
    journal = SQLiteJournal(journal_path)
    try:
        batch = journal.init_batch(str(ULID()), source_root=str(source), bucket=bucket, prefix="staging/",
                                   part_size=PART, endpoint_url=moto_endpoint)
        store = S3Store(StoreConfig(bucket=bucket, endpoint_url=moto_endpoint))
        uploader = Uploader(journal, store, batch.batch_id,
                            UploadOptions(parallel=2, part_size=PART, multipart_threshold=PART))
        uploader.scan()
        (source / "gone.txt").unlink()
        result = uploader.send()
    finally:
        journal.close()
    assert result.fatal is None
    assert (result.files_uploaded, result.files_failed) == (1, 1)
    assert result.failures == [("gone.txt", "vanished: no such file")]
    records = journal_files(journal_path, batch.batch_id)
    assert records["gone.txt"].state is FileState.FAILED
    assert records["stays.txt"].state is FileState.UPLOADED
    assert set(bucket_files(s3, bucket, batch)) == {"stays.txt"}


@pytest.mark.parametrize("size", [100, PART], ids=["single-put", "multipart"])
@pytest.mark.parametrize("change,reason", [
    pytest.param("deleted", "vanished: no such file", id="deleted"),
    pytest.param("directory", "vanished: replaced by a directory", id="directory"),
])
def test_file_vanished_or_replaced_by_a_directory_after_the_scan(cli, s3, bucket, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, size: int,
                                                                 change: str, reason: str) -> None:
    source = tmp_path / "src"
    files = {"stays.txt": b"stays\n"}
    write(source / "stays.txt", files["stays.txt"])
    victim = write(source / "victim.bin", pattern(size))

    def mutate() -> None:
        victim.unlink()
        if change == "directory":
            write(victim / "new-file-inside.txt", b"appeared after the scan\n")

    after_scan(monkeypatch, mutate)
    result = cli("upload", "--part-size", "5MiB", str(source))
    assert result.exit_code == 3, result.stderr
    assert f"failed: victim.bin: {reason}" in result.stderr
    check_batch(cli, s3, bucket, uploaded=files, failed={"victim.bin": reason}, finalized=False)


def _blocked_on_a_fifo() -> bool:
    """True if a thread of this process sleeps in the kernel waiting for a FIFO's other end."""
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "wchan").read_text() in ("wait_for_partner", "fifo_open"):
                return True
        except OSError:
            continue
    return False


class FifoWatchdog:
    """Detects a thread blocked opening ``fifo`` (its wchan), then frees it by opening the write
    end, so a run that blocks on a FIFO fails the test instead of hanging it."""

    def __init__(self, fifo: Path, limit: float = 30.0) -> None:
        self.fifo = fifo
        self.limit = limit
        self.done = threading.Event()
        self.blocked = False
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self._thread.join(5)

    def _watch(self) -> None:
        deadline = threading.Event()
        timer = threading.Timer(self.limit, deadline.set)
        timer.start()
        try:
            while not self.done.wait(0.01):  # a bounded poll with a short interval
                if _blocked_on_a_fifo() or deadline.is_set():
                    self.blocked = True
                    self._free()
        finally:
            timer.cancel()

    def _free(self) -> None:
        try:
            os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader's open() returns
        except OSError:
            pass  # no reader yet (ENXIO), or the fifo is gone


@pytest.mark.parametrize("size", [100, PART], ids=["single-put", "multipart"])
def test_file_replaced_by_a_fifo_after_the_scan_never_blocks(cli, s3, bucket, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    source = tmp_path / "src"
    files = {"stays.txt": b"stays\n"}
    write(source / "stays.txt", files["stays.txt"])
    victim = write(source / "victim.bin", pattern(size))

    def mutate() -> None:
        victim.unlink()
        os.mkfifo(victim)

    after_scan(monkeypatch, mutate)
    with FifoWatchdog(victim) as watchdog:
        result = cli("upload", "--part-size", "5MiB", str(source))
    assert not watchdog.blocked, "archup blocked opening a FIFO that replaced a scanned file"
    assert result.exit_code == 3, result.stderr
    assert "failed: victim.bin" in result.stderr
    check_batch(cli, s3, bucket, uploaded=files, failed={"victim.bin": ""}, finalized=False)


def test_file_replaced_by_a_symlink_after_the_scan_is_not_followed(cli, s3, bucket, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "src"
    original = b"the file the scan saw\n"
    victim = write(source / "victim.txt", original)
    secret = write(tmp_path / "outside" / "secret.txt", b"SECRET outside the source!\n"[: len(original)])
    assert len(secret.read_bytes()) == len(original)
    scanned = victim.stat()

    def mutate() -> None:
        # The target looks exactly like the scanned file: same size, same mtime.
        os.utime(secret, ns=(scanned.st_atime_ns, scanned.st_mtime_ns))
        victim.unlink()
        victim.symlink_to(secret)

    after_scan(monkeypatch, mutate)
    result = cli("upload", str(source))
    batch = only_batch(cli.journal)
    assert secret.read_bytes() not in bucket_files(s3, bucket, batch).values(), "followed a symlink out of the source"
    assert result.exit_code == 3, result.stderr
    # A symlink stands where the file was (ELOOP): named and sealed without, as a permission refusal.
    check_batch(cli, s3, bucket, uploaded={}, skipped={"victim.txt": "file unreadable: replaced by a symlink"},
                finalized=True)


# -- symlinks: skipped, never followed -------------------------------------------------------------


def test_symlinks_are_skipped_by_name_and_never_followed(cli, s3, bucket, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    secret = b"outside the source tree: must never be uploaded\n"
    write(outside / "secret.txt", secret)
    write(outside / "deeper" / "secret2.txt", secret)
    source = tmp_path / "src"
    files = {"real.txt": b"a real file\n", "dir/inner.txt": b"inner\n"}
    for rel, data in files.items():
        write(source / rel, data)
    links = {
        "loop-a": "loop-b", "loop-b": "loop-a",           # a loop of two
        "self-loop": "self-loop",                          # a loop of one
        "dir/up": "..",                                    # a directory loop: following it never ends
        "to-outside-file": str(outside / "secret.txt"),    # absolute, out of the source root
        "to-outside-dir": "../outside",                    # relative, out of the source root
        "dir/to-real": "../real.txt",                      # inside the source: still not followed
        "dangling": str(tmp_path / "does-not-exist"),
    }
    for rel, target in links.items():
        os.symlink(target, source / rel)

    code, summary = upload_json(cli, source)
    assert code == 0, summary
    assert summary["files_uploaded"] == len(files) and summary["files_skipped"] == len(links)
    assert summary["total_bytes"] == sum(len(data) for data in files.values())
    check_batch(cli, s3, bucket, uploaded=files, skipped={rel: "symlink" for rel in links}, finalized=True)

    human = cli("status", summary["batch_id"])
    for rel in links:
        assert f"{rel}" in human.stdout + human.stderr


def test_files_from_never_follows_a_symlinked_directory(cli, s3, bucket, tmp_path: Path) -> None:
    """--files-from names a file by a path through a symlinked directory."""
    outside = tmp_path / "outside"
    write(outside / "secret.txt", b"outside the source tree\n")
    source = tmp_path / "src"
    write(source / "real.txt", b"real\n")
    (source / "link").symlink_to(outside, target_is_directory=True)
    listing = write(tmp_path / "list.txt", b"real.txt\nlink/secret.txt\nlink\n")

    code, summary = upload_json(cli, source, "--files-from", str(listing))
    batch = only_batch(cli.journal)
    assert b"outside the source tree\n" not in bucket_files(s3, bucket, batch).values(), \
        "--files-from followed a symlinked directory out of the source"
    assert code == 0, summary
    check_batch(cli, s3, bucket, uploaded={"real.txt": b"real\n"},
                skipped={"link/secret.txt": "symlink", "link": "symlink"}, finalized=True)



# -- special files: skipped, never opened ----------------------------------------------------------


def test_fifo_and_unix_socket_are_skipped_and_never_block(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = {"real.txt": b"real\n"}
    write(source / "real.txt", files["real.txt"])
    os.mkfifo(source / "a-fifo")  # opening it for reading would block until a writer comes
    sock_path = source / "a-socket"
    assert len(os.fsencode(sock_path)) < 100, "unix socket paths are limited to 108 bytes"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.fspath(sock_path))  # the socket file stays after close
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)

    # A real process with a timeout: a run that blocks on the FIFO fails the test instead of hanging it.
    result = cli.subprocess("upload", "--json", str(source), timeout=90)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["files_skipped"] == 2
    reason = "not a regular file"
    check_batch(cli, s3, bucket, uploaded=files, skipped={"a-fifo": reason, "a-socket": reason}, finalized=True)


def test_device_node_is_skipped(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = {"real.txt": b"real\n"}
    write(source / "real.txt", files["real.txt"])
    try:
        os.mknod(source / "null-device", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # like /dev/null
    except (PermissionError, OSError) as error:
        pytest.skip(f"cannot create a device node here ({error.strerror}); needs root / CAP_MKNOD")
    code, summary = upload_json(cli, source)
    assert code == 0, summary
    check_batch(cli, s3, bucket, uploaded=files, skipped={"null-device": "not a regular file"}, finalized=True)


# -- empty things ----------------------------------------------------------------------------------


def test_empty_file_is_uploaded_and_empty_directory_is_not_archived(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = {"empty.txt": b"", "dir/empty-too": b"", "dir/full.txt": b"not empty\n"}
    for rel, data in files.items():
        write(source / rel, data)
    (source / "empty-dir").mkdir()
    (source / "dir" / "nested" / "empty" / "dirs").mkdir(parents=True)

    code, summary = upload_json(cli, source)
    assert code == 0, summary
    assert summary["files_uploaded"] == 3 and summary["files_skipped"] == 0
    batch, records = check_batch(cli, s3, bucket, uploaded=files, finalized=True)
    assert records["empty.txt"].sha256 == sha256(b"")
    head = s3.head_object(Bucket=bucket, Key=f"{batch.batch_prefix}files/empty.txt")
    assert head["ContentLength"] == 0
    all_keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=batch.batch_prefix)["Contents"]]
    assert not any("empty-dir" in key or key.endswith("/") or "nested" in key for key in all_keys), all_keys


# -- sizes at the part boundaries ------------------------------------------------------------------


def test_files_at_part_size_boundaries(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = {
        "below-one-part.bin": pattern(PART - 1, 1),   # single PUT (under the threshold)
        "one-part.bin": pattern(PART, 2),             # exactly the part size: multipart, one part
        "three-parts.bin": pattern(3 * PART, 3),      # exactly three part sizes: three full parts
    }
    for rel, data in files.items():
        write(source / rel, data)

    code, summary = upload_json(cli, source, "--part-size", "5MiB")
    assert code == 0, summary
    batch, records = check_batch(cli, s3, bucket, uploaded=files, finalized=True)
    etags = {rel: s3.head_object(Bucket=bucket, Key=f"{batch.batch_prefix}files/{rel}")["ETag"] for rel in files}
    assert "-" not in etags["below-one-part.bin"]
    assert etags["one-part.bin"].endswith('-1"'), etags
    assert etags["three-parts.bin"].endswith('-3"'), etags
    assert records["three-parts.bin"].part_size == PART


@pytest.mark.parametrize("size,configured,expected", [
    (100 * GiB, 5 * MiB, 11 * MiB),          # 100 GiB / 10,000 = 10.24 MiB, grown to whole MiB
    (5 * MiB * MAX_PARTS, 5 * MiB, 5 * MiB),  # exactly 10,000 parts: no growth
    (5 * MiB * MAX_PARTS + 1, 5 * MiB, 6 * MiB),
    (5 * TiB, 8 * MiB, 525 * MiB),            # S3's largest object
    (1, 1, MIN_PART_SIZE),                    # never below S3's 5 MiB minimum
])
def test_part_size_keeps_every_file_within_10000_parts(size: int, configured: int, expected: int) -> None:
    part_size = part_size_for(size, configured)
    assert part_size == expected
    assert part_size % MiB == 0 and part_size >= MIN_PART_SIZE
    assert -(-size // part_size) <= MAX_PARTS
    assert part_size <= 5 * GiB  # S3's largest part


def test_sparse_file_that_needs_a_larger_part_size(cli, s3, bucket, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The 10,000-part rule scaled down: with at most 2 parts, a 15 MiB sparse file at --part-size 5MiB
    must go in 8 MiB parts (a 100 GiB file at 5 MiB would need 11 MiB parts: see the test above)."""
    monkeypatch.setattr(archup.multipart, "MAX_PARTS", 2)
    source = tmp_path / "src"
    source.mkdir()
    sparse = source / "sparse.img"
    size = 3 * PART
    with open(sparse, "wb") as handle:
        handle.truncate(size)        # a hole...
        handle.seek(size - 5)
        handle.write(b"tail\n")      # ...and some data at the end
    data = sparse.read_bytes()
    assert data[:PART] == bytes(PART)

    code, summary = upload_json(cli, source, "--part-size", "5MiB")
    assert code == 0, summary
    batch, records = check_batch(cli, s3, bucket, uploaded={"sparse.img": data}, finalized=True)
    assert records["sparse.img"].part_size == 8 * MiB
    head = s3.head_object(Bucket=bucket, Key=f"{batch.batch_prefix}files/sparse.img")
    assert head["ETag"].endswith('-2"'), head["ETag"]
    assert head["Metadata"]["archup-part-size"] == str(8 * MiB)


# -- names -----------------------------------------------------------------------------------------

NFC = unicodedata.normalize("NFC", "caf\u00e9.txt")
NFD = unicodedata.normalize("NFD", "caf\u00e9.txt")
AWKWARD_NAMES = {
    "with spaces/a file with  spaces .txt": b"spaces\n",
    "percent%20not-a-space%zz.txt": b"percent\n",
    "plus+sign+.txt": b"plus\n",
    "hash#fragment.txt": b"hash\n",
    "question?mark=1&x=2.txt": b"query\n",
    "back\\slash\\.txt": b"backslash\n",
    "emoji \U0001F389/\U0001F680 rocket.txt": b"emoji\n",
    NFC: b"composed\n",
    NFD: b"decomposed\n",
    "-leading-dash.txt": b"dash\n",
    "--help": b"looks like an option\n",
    "-/--json": b"a directory named '-'\n",
    "tab\tand\rcarriage.txt": b"control characters\n",
    "semi;colon & amp.txt": b"semicolon\n",
    "Case.txt": b"upper\n",
    "case.txt": b"lower\n",
}


def test_awkward_names_are_uploaded_under_their_exact_keys(cli, s3, bucket, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert NFC != NFD and unicodedata.normalize("NFC", NFD) == NFC
    # The source itself starts with '-': given after '--', relative to the working directory.
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "-src"
    for rel, data in AWKWARD_NAMES.items():
        write(source / rel, data)
    assert {p.name for p in source.iterdir()} >= {NFC, NFD}, "this filesystem normalizes names"

    result = cli("upload", "--json", "--", "-src")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files_uploaded"] == len(AWKWARD_NAMES)
    batch, records = check_batch(cli, s3, bucket, uploaded=AWKWARD_NAMES, finalized=True)
    assert batch.source_root == str(source)
    for rel, data in AWKWARD_NAMES.items():
        assert records[rel].key == f"{batch.batch_prefix}files/{rel}"
        assert s3.get_object(Bucket=bucket, Key=records[rel].key)["Body"].read() == data
    # NFC and NFD forms of one name are two files, two keys, two manifest entries.
    assert records[NFC].key != records[NFD].key
    assert manifest_paths(s3, bucket, batch).count(NFC) == 1 and manifest_paths(s3, bucket, batch).count(NFD) == 1


def test_newline_in_a_name_that_the_server_refuses_fails_that_file_by_name(cli, s3, bucket, tmp_path: Path) -> None:
    """moto's HTTP server answers 404 to any key holding a newline (real S3 stores it): this shows how
    archup treats one key the server refuses. That archup maps the name to its exact key and uploads
    it where the server accepts it is the next test (moto in-process, no HTTP)."""
    source = tmp_path / "src"
    files = {"plain.txt": b"plain\n"}
    write(source / "plain.txt", files["plain.txt"])
    write(source / "two\nlines.txt", b"newline\n")
    result = cli("upload", str(source))
    assert result.exit_code == 3, result.stderr
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed_lines) == 1 and failed_lines[0].startswith("failed: two\\nlines.txt: "), result.stderr
    check_batch(cli, s3, bucket, uploaded=files, failed={"two\nlines.txt": "404"}, finalized=False)


def test_newline_in_a_name_maps_to_its_exact_key(tmp_path: Path) -> None:
    """moto in-process (no HTTP), where a newline in a key is stored as S3 stores it. Leaving the
    mock wipes moto's in-memory state, the HTTP server's included: no fixture keeps a bucket past
    its test, so nothing else depends on it."""
    from moto import mock_aws

    source = tmp_path / "src"
    files = {"two\nlines.txt": b"newline\n", "dir\nname/inner.txt": b"inner\n"}
    for rel, data in files.items():
        write(source / rel, data)
    with mock_aws():
        import boto3

        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="archup-newline")
        journal = SQLiteJournal(tmp_path / "journal.db")
        try:
            batch = journal.init_batch(str(ULID()), source_root=str(source), bucket="archup-newline",
                                       prefix="staging/", part_size=PART)
            # moto's server answers 404 to a key with a newline (botocore's and the CRT's alike),
            # so this test runs on moto's in-process mock, which answers botocore only.
            store = S3Store(StoreConfig(bucket="archup-newline", region="us-east-1", transport=TransportKind.BOTOCORE))
            result = Uploader(journal, store, batch.batch_id, UploadOptions(parallel=2)).run()
            records = {record.rel_path: record for record in journal.iter_files(batch.batch_id)}
        finally:
            journal.close()
        assert result.files_uploaded == 2 and result.files_failed == 0, result.failures
        for rel, data in files.items():
            assert records[rel].key == f"{batch.batch_prefix}files/{rel}"
            assert client.get_object(Bucket="archup-newline", Key=records[rel].key)["Body"].read() == data


def test_name_not_valid_utf8_is_skipped_and_reported_by_a_printable_name(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = {"good.txt": b"good\n"}
    write(source / "good.txt", files["good.txt"])
    bad_file = os.fsencode(source) + b"/bad-\xff\xfe-name.txt"
    with open(bad_file, "wb") as handle:
        handle.write(b"a latin-1 name\n")
    bad_dir = os.fsencode(source) + b"/dir-\xe9"
    os.mkdir(bad_dir)
    with open(bad_dir + b"/inside.txt", "wb") as handle:
        handle.write(b"inside a latin-1 directory\n")

    result = cli("upload", str(source))
    # A directory whose name is not UTF-8 hides what it holds: unreadable, exit 3 (issue 29, item 7).
    assert result.exit_code == 3, result.stderr
    for text in (result.stdout, result.stderr):
        text.encode("utf-8")  # printable: no lone surrogates reach the terminal
    printable = {"bad-\\xff\\xfe-name.txt", "dir-\\xe9"}  # bad bytes shown as \xNN
    reported = [line for line in result.stderr.splitlines() if line.startswith("  skipped: ")]
    assert len(reported) == 2, result.stderr
    for name in printable - {"dir-\\xe9"}:
        assert any(line.startswith(f"  skipped: {name}") and line.endswith(": file name is not valid UTF-8")
                   for line in reported), (name, reported)
    assert "  skipped: dir-\\xe9: directory unreadable: its name is not valid UTF-8" in reported
    batch = only_batch(cli.journal)
    records = journal_files(cli.journal, batch.batch_id)
    skipped = {path: record for path, record in records.items() if record.state is FileState.SKIPPED}
    # The journal's name for such a file may carry a mark that keeps it apart from real names.
    assert {path.rstrip("/") for path in skipped} == printable, sorted(skipped)
    check_batch(cli, s3, bucket, uploaded=files, skipped={path: "not valid UTF-8" for path in skipped},
                finalized=True)


# -- two paths, one key? ---------------------------------------------------------------------------
#
# The path -> key mapping is injective on POSIX for names that are valid UTF-8: a key is
# <batch prefix>files/ + the path relative to the source, joined with '/'; a name can hold
# neither '/' nor NUL, so the '/'-joined path splits back into exactly one list of names;
# names in one directory are distinct byte strings, and UTF-8 decoding is one-to-one; keys
# are compared byte for byte by S3, with no case folding or Unicode normalization. Names
# that differ only in NFC/NFD form or in case are therefore distinct keys. The one place a
# name is rewritten is a name that is not valid UTF-8, shown with its bad bytes escaped.


def test_names_differing_only_in_normal_form_or_case_get_distinct_keys(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = {NFC: b"nfc\n", NFD: b"nfd\n", "dir/" + NFC: b"nfc in dir\n", "dir/" + NFD: b"nfd in dir\n",
             "README": b"upper\n", "readme": b"lower\n"}
    for rel, data in files.items():
        write(source / rel, data)
    code, summary = upload_json(cli, source)
    assert code == 0, summary
    _, records = check_batch(cli, s3, bucket, uploaded=files, finalized=True)
    keys = [record.key for record in records.values()]
    assert len(set(keys)) == len(files)


def test_escaped_name_does_not_collide_with_a_real_name(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    literal = "bad\\xff.txt"  # a valid UTF-8 name: b, a, d, backslash, x, f, f, ...
    write(source / literal, b"a real file with a backslash in its name\n")
    with open(os.fsencode(source) + b"/bad\xff.txt", "wb") as handle:
        handle.write(b"a name that is not UTF-8\n")
    code, summary = upload_json(cli, source)
    assert code == 0, summary
    batch = only_batch(cli.journal)
    records = journal_files(cli.journal, batch.batch_id)
    states = sorted(record.state.value for record in records.values())
    assert states == ["skipped", "uploaded"], records  # both files accounted for
    assert bucket_files(s3, bucket, batch) == {literal: b"a real file with a backslash in its name\n"}


def test_files_from_paths_that_name_one_file_give_one_canonical_key(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = {"a/b.txt": b"one file\n"}
    write(source / "a" / "b.txt", files["a/b.txt"])
    listing = write(tmp_path / "list.txt", b"a/b.txt\n./a/b.txt\na/./b.txt\na//b.txt\n")
    code, summary = upload_json(cli, source, "--files-from", str(listing))
    assert code in (0, 2), summary
    batch = only_batch(cli.journal) if code == 0 else None
    if batch is not None:  # normalized: one file, one key
        check_batch(cli, s3, bucket, uploaded=files, finalized=True)


# -- keys over S3's 1,024-byte limit ---------------------------------------------------------------


def _key_over_limit(head: RequestHead) -> bool:
    """A request on a key over 1,024 bytes (moto does not enforce S3's limit; the proxy does)."""
    key = head.path.lstrip("/").partition("/")[2]
    return len(key.encode("utf-8")) > MAX_KEY_BYTES


KEY_TOO_LONG = Canned(400, "KeyTooLongError", "Your key is too long")


def test_key_over_1024_bytes_fails_that_file_by_name(cli, s3, bucket, tmp_path: Path, moto_endpoint: str) -> None:
    overhead = len("staging/") + len(str(ULID())) + len("/files/")
    deep = "/".join(["d" * 200] * 4) + "/"        # four directories of 200-byte names
    at_limit = deep + "f" * (MAX_KEY_BYTES - overhead - len(deep))
    over_small = deep + "g" * (MAX_KEY_BYTES - overhead - len(deep) + 1)
    over_large = deep + "h" * (MAX_KEY_BYTES - overhead - len(deep) + 30)
    assert overhead + len(at_limit) == MAX_KEY_BYTES
    source = tmp_path / "src"
    files = {"short.txt": b"short\n", at_limit: b"exactly 1024 bytes of key\n"}
    for rel, data in files.items():
        write(source / rel, data)
    write(source / over_small, b"one byte too long\n")
    write(source / over_large, pattern(PART, 7))  # multipart: CreateMultipartUpload is refused

    with FaultProxy(moto_endpoint, rules=[Rule(_key_over_limit, KEY_TOO_LONG)]) as proxy:
        result = Cli(proxy.url, bucket, cli.journal)("upload", "--part-size", "5MiB", str(source))
    assert result.exit_code == 3, result.stderr
    assert "Traceback" not in result.stderr
    for rel in (over_small, over_large):
        assert f"failed: {rel}: " in result.stderr
    assert result.stderr.count("KeyTooLongError") >= 2
    check_batch(cli, s3, bucket, uploaded=files,
                failed={over_small: "KeyTooLongError", over_large: "KeyTooLongError"}, finalized=False)


# -- a file that changes while it is being uploaded ------------------------------------------------


@pytest.mark.parametrize("change", [
    "append",
    "rewrite-in-place",
    "rewrite-keeping-mtime",
])
def test_file_changing_during_multipart_upload_is_failed_and_its_upload_aborted(
        cli, s3, bucket, tmp_path: Path, store_faults: Faults, change: str) -> None:
    source = tmp_path / "src"
    files = {"small.txt": b"small and steady\n"}
    write(source / "small.txt", files["small.txt"])
    big = write(source / "big.bin", pattern(3 * PART, 11))
    scanned = big.stat()
    changed = threading.Event()

    def change_the_file(call: Call) -> None:
        changed.set()
        if change == "append":
            with open(big, "ab") as handle:
                handle.write(b"appended while part 1 was in flight\n")
            return
        # Same size, new bytes in part 1 (already read) and part 3 (not yet read): the parts
        # sent would make an object that is neither the old file nor the new one.
        with open(big, "r+b") as handle:
            handle.write(b"X" * 64)
            handle.seek(2 * PART)
            handle.write(b"Y" * 64)
        if change == "rewrite-in-place":
            os.utime(big, ns=(scanned.st_atime_ns, scanned.st_mtime_ns + 1_000_000))  # a new mtime
        else:
            os.utime(big, ns=(scanned.st_atime_ns, scanned.st_mtime_ns))  # the old mtime put back

    # Once, as the store returns part 1 of big.bin.
    store_faults.after("upload_part", "*/big.bin", part_number=1, do=change_the_file)
    # --parallel 1: the byte budget (parallel x part size) holds the read of part 2 until part 1
    # returned, so the change always lands before the read pass ends.
    result = cli("upload", "--part-size", "5MiB", "--parallel", "1", str(source))
    assert changed.is_set()
    assert result.exit_code == 3, result.stderr
    reason = "file grew during upload" if change == "append" else "changed since the scan"
    assert f"failed: big.bin: {reason}" in result.stderr, result.stderr
    check_batch(cli, s3, bucket, uploaded=files, failed={"big.bin": reason}, finalized=False)

    if change == "append":
        # Nothing lost: the next run sends the file as it is now, and seals the batch.
        rerun = cli("upload", "--part-size", "5MiB", str(source))
        assert rerun.exit_code == 0, rerun.stderr
        check_batch(cli, s3, bucket, uploaded={**files, "big.bin": big.read_bytes()}, finalized=True)


def test_an_unreadable_directory_alone_seals_the_rest_and_exits_partial(cli, s3, bucket, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No file failed, but a directory could not be listed: its files should be archived and
    are not, so the run is partial (exit 3), though the batch is sealed with what was read."""
    source = tmp_path / "src"
    files = {"ok.txt": b"readable\n", "sub/also-ok.txt": b"also readable\n"}
    for rel, data in files.items():
        write(source / rel, data)
    write(source / "locked-dir" / "inner.txt", b"never read\n")
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path).endswith("locked-dir"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, summary = upload_json(cli, source)
    assert code == 3, summary
    assert (summary["status"], summary["files_unreadable"], summary["files_skipped"]) == ("enqueued", 1, 1)
    check_batch(cli, s3, bucket, uploaded=files, skipped={"locked-dir": "directory unreadable"}, finalized=True)

    # A skip by policy alone (a symlink) is no failure: exit 0, nothing unreadable.
    monkeypatch.setattr(os, "scandir", real_scandir)
    (source / "locked-dir" / "inner.txt").unlink()
    (source / "locked-dir").rmdir()
    os.symlink("ok.txt", source / "link")
    code, summary = upload_json(cli, source, "--new-batch")
    assert (code, summary["files_unreadable"], summary["files_skipped"]) == (0, 0, 1), summary
