"""A file the scan found and that cannot then be opened, for good (EACCES, EPERM, ELOOP): named in
manifest-skipped.jsonl with its reason, the batch sealed without it, exit 3, as an unreadable
directory already was. A transient error (EIO) leaves the file failed and the batch resumable.

The permission case runs archup as a real process without CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH (``setpriv --bounding-set``), so root obeys the mode-000 file too, over
HTTP against the suite's moto server."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli
from ulid import ULID

from archup.journal import SQLiteJournal
from archup.states import BatchState, FileState

MiB = 1024 * 1024
PART = 5 * MiB


def _setpriv() -> list[str]:
    """The command prefix that runs archup without root's power to read anything."""
    if os.geteuid() != 0:
        return []
    tool = shutil.which("setpriv")
    if tool is None:
        pytest.skip("running as root and setpriv (util-linux) is not installed")
    return [tool, "--bounding-set", "-dac_override,-dac_read_search"]


def _archup(cli: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    command = [*_setpriv(), sys.executable, "-m", "archup", args[0], *cli.common(args[0]), *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _batches(journal_path: Path) -> list[Any]:
    journal = SQLiteJournal(journal_path)
    try:
        return sorted(journal.list_batches(), key=lambda batch: batch.batch_id)
    finally:
        journal.close()


def _files(journal_path: Path, batch_id: str) -> dict[str, Any]:
    journal = SQLiteJournal(journal_path)
    try:
        return {record.rel_path: record for record in journal.iter_files(batch_id)}
    finally:
        journal.close()


def _skipped_lines(s3: Any, bucket: str, prefix: str) -> dict[str, str]:
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}manifest.json")["Body"].read())
    raw = s3.get_object(Bucket=bucket, Key=summary["skipped"]["key"])["Body"].read().decode()
    return {entry["path"]: entry["reason"] for entry in map(json.loads, raw.splitlines())}


def _tree(tmp_path: Path) -> tuple[Path, list[Path]]:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "ok.txt").write_bytes(b"readable\n")
    (source / "sub" / "also-ok.txt").write_bytes(b"also readable\n")
    small = source / "locked.txt"
    small.write_bytes(b"no one may read this\n")
    large = source / "sub" / "locked.bin"  # a multipart file: the other reader
    large.write_bytes(os.urandom(PART))
    return source, [small, large]


def test_a_file_no_one_may_read_is_named_and_the_batch_sealed_without_it(cli: Cli, s3: Any, bucket: str,
                                                                         tmp_path: Path) -> None:
    source, locked = _tree(tmp_path)
    for path in locked:
        path.chmod(0)
    try:
        first = _archup(cli, "upload", "--part-size", "5MiB", str(source))
        assert first.returncode == 3, first.stderr
        assert "Traceback" not in first.stderr
        [batch] = _batches(cli.journal)
        assert batch.state is BatchState.ENQUEUED, batch  # sealed: an hourly job is not stuck on it
        records = _files(cli.journal, batch.batch_id)
        assert records["locked.txt"].state is FileState.SKIPPED
        assert records["sub/locked.bin"].state is FileState.SKIPPED
        assert {records["ok.txt"].state, records["sub/also-ok.txt"].state} == {FileState.UPLOADED}
        reasons = _skipped_lines(s3, bucket, batch.batch_prefix)
        assert reasons == {"locked.txt": "file unreadable: Permission denied",
                           "sub/locked.bin": "file unreadable: Permission denied"}
        assert "skipped: locked.txt: file unreadable: Permission denied" in first.stderr
        assert "sealed without 2 path(s) that could not be read" in first.stderr
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

        # Nothing refuses for ever: finalize reports the seal, and the next run (the next hour)
        # seals a batch of its own, again without what it cannot read.
        sealed = _archup(cli, "finalize", batch.batch_id)
        assert sealed.returncode == 0, sealed.stderr
        again = _archup(cli, "upload", "--part-size", "5MiB", str(source))
        assert again.returncode == 3, again.stderr
        assert [b.state for b in _batches(cli.journal)] == [BatchState.ENQUEUED, BatchState.ENQUEUED]
    finally:
        for path in locked:
            path.chmod(0o644)


def test_a_batch_an_older_archup_left_failed_on_an_unreadable_file_is_sealed_by_the_next_run(
        cli: Cli, s3: Any, bucket: str, tmp_path: Path) -> None:
    """An earlier archup failed the file (and refused to seal for ever): resuming now skips it."""
    source, locked = _tree(tmp_path)
    journal = SQLiteJournal(cli.journal)
    try:
        batch = journal.init_batch(str(ULID()), source_root=str(source.resolve()), bucket=bucket, prefix="staging/",
                                   part_size=PART, endpoint_url=cli.endpoint)
        from archup.store import S3Store, StoreConfig
        from archup.uploader import Uploader, UploadOptions

        store = S3Store(StoreConfig(bucket=bucket, endpoint_url=cli.endpoint))
        Uploader(journal, store, batch.batch_id, UploadOptions(part_size=PART, multipart_threshold=PART)).scan()
        for path in locked:
            rel = path.relative_to(source).as_posix()
            journal.fail_file(batch.batch_id, rel, "unreadable: permission denied")
        journal.set_batch_state(batch.batch_id, BatchState.FAILED, error="2 file(s) failed")
    finally:
        journal.close()
    for path in locked:
        path.chmod(0)
    try:
        resumed = _archup(cli, "resume", batch.batch_id)
    finally:
        for path in locked:
            path.chmod(0o644)
    assert resumed.returncode == 3, resumed.stderr
    [record] = _batches(cli.journal)
    assert record.state is BatchState.ENQUEUED
    assert set(_skipped_lines(s3, bucket, record.batch_prefix)) == {"locked.txt", "sub/locked.bin"}


def _refuse(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    """Every way of opening this one path raises ``code`` (root-proof, in-process)."""
    def refusing(real: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).endswith(name):
                raise OSError(code, os.strerror(code), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return guarded

    monkeypatch.setattr(builtins, "open", refusing(builtins.open))
    monkeypatch.setattr(io, "open", refusing(io.open))
    monkeypatch.setattr(os, "open", refusing(os.open))


@pytest.mark.parametrize("size", [100, PART], ids=["single-put", "multipart"])
@pytest.mark.parametrize("code", [errno.EPERM, errno.ELOOP], ids=["EPERM", "ELOOP"])
def test_other_permanent_open_errors_are_skipped_by_name(cli: Cli, s3: Any, bucket: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, size: int,
                                                         code: int) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "ok.txt").write_bytes(b"readable\n")
    (source / "refused.bin").write_bytes(os.urandom(size))
    _refuse(monkeypatch, "refused.bin", code)
    result = cli("upload", "--part-size", "5MiB", str(source))
    assert result.exit_code == 3, result.stderr
    [batch] = _batches(cli.journal)
    assert batch.state is BatchState.ENQUEUED
    reason = _skipped_lines(s3, bucket, batch.batch_prefix)["refused.bin"]
    assert reason.startswith("file unreadable: "), reason


@pytest.mark.parametrize("size", [100, PART], ids=["single-put", "multipart"])
def test_a_transient_open_error_leaves_the_file_failed_and_the_batch_resumable(
        cli: Cli, s3: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "ok.txt").write_bytes(b"readable\n")
    (source / "flaky.bin").write_bytes(os.urandom(size))
    with monkeypatch.context() as patched:
        _refuse(patched, "flaky.bin", errno.EIO)
        result = cli("upload", "--part-size", "5MiB", str(source))
    assert result.exit_code == 3, result.stderr
    [batch] = _batches(cli.journal)
    assert batch.state is not BatchState.ENQUEUED
    assert _files(cli.journal, batch.batch_id)["flaky.bin"].state is FileState.FAILED
    again = cli("upload", "--part-size", "5MiB", str(source))  # the disk answers again
    assert again.exit_code == 0, again.stderr
    [batch] = _batches(cli.journal)
    assert batch.state is BatchState.ENQUEUED
