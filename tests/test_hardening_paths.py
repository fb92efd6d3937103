"""Hardening, issue 29 item 1: the journal's directory, its locks/ and the log file are never
taken through a symlink, nor from another user, nor when others can write there."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archup.cli import app
from archup.errors import UnsafeJournalPath
from archup.lock import BatchLock

BATCH = "01K8RNKN488RQCG3YGG72QBZS5"
VICTIM = b"root's own private file\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root")


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    victim.chmod(0o600)
    return victim


def _journal_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o700)
    return directory


def test_a_symlink_planted_as_a_lock_file_is_not_followed(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    victim = _victim(tmp_path)
    (directory / "locks").mkdir(mode=0o700)
    (directory / "locks" / f"{BATCH}.lock").symlink_to(victim)
    with pytest.raises(UnsafeJournalPath, match="is a symlink"):
        BatchLock(directory / "journal.db", BATCH).acquire()
    assert victim.read_bytes() == VICTIM


def test_a_dangling_symlink_planted_as_a_lock_file_creates_nothing(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    (directory / "locks").mkdir(mode=0o700)
    target = tmp_path / "created-through-the-link"
    (directory / "locks" / f"{BATCH}.lock").symlink_to(target)
    with pytest.raises(UnsafeJournalPath):
        BatchLock(directory / "journal.db", BATCH).acquire()
    assert not target.exists()


def test_a_locks_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    (directory / "locks").mkdir()
    (directory / "locks").chmod(0o777)
    with pytest.raises(UnsafeJournalPath, match=r"locks is writable by group or others \(mode 0777\)"):
        BatchLock(directory / "journal.db", BATCH).acquire()


def test_a_locks_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (directory / "locks").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafeJournalPath, match="is a symlink"):
        BatchLock(directory / "journal.db", BATCH).acquire()
    assert list(elsewhere.iterdir()) == []


def test_a_new_lock_still_works_and_is_private(tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    with BatchLock(directory / "journal.db", BATCH):
        lock_file = directory / "locks" / f"{BATCH}.lock"
        assert lock_file.stat().st_mode & 0o777 == 0o600
        assert b'"pid"' in lock_file.read_bytes()
    with BatchLock(directory / "journal.db", BATCH):  # taken again: the file is reused
        pass


def test_a_dangling_symlink_at_the_journal_path_is_refused_and_creates_nothing(cli, tmp_path: Path) -> None:
    directory = _journal_dir(tmp_path)
    target = tmp_path / "target.db"
    (directory / "journal.db").symlink_to(target)
    result = cli("list", "--journal", str(directory / "journal.db"))
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("a\n")
    upload = cli("upload", str(source), "--journal", str(directory / "journal.db"))
    assert (result.exit_code, upload.exit_code) == (1, 1), (result, upload)
    assert "is a symlink" in upload.stderr and str(directory / "journal.db") in upload.stderr
    assert not target.exists()


def test_a_journal_directory_others_can_write_is_refused(cli, tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    result = cli("list", "--journal", str(directory / "journal.db"))
    assert result.exit_code == 1
    assert f"journal directory {directory} is writable by group or others (mode 0777)" in result.stderr
    assert result.stderr.count("\n") == 1


def _with_log_file(cli, log_file: Path):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, ["--log-file", str(log_file), "list", "--journal", str(cli.journal)],
                                catch_exceptions=False)
    return result


def test_a_symlinked_log_file_is_refused_and_its_target_untouched(cli, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    link = tmp_path / "archup.log"
    link.symlink_to(victim)
    result = _with_log_file(cli, link)
    assert result.exit_code == 2
    assert "cannot open log file" in result.stderr and "symlink" in result.stderr
    assert victim.read_bytes() == VICTIM


def test_a_new_log_file_is_created_private_and_then_appended_to(cli, tmp_path: Path) -> None:
    log_file = tmp_path / "archup.log"
    assert _with_log_file(cli, log_file).exit_code == 0
    first = log_file.read_text()
    assert _with_log_file(cli, log_file).exit_code == 0
    assert log_file.read_text().startswith(first) and len(log_file.read_text()) > len(first)
    assert log_file.stat().st_mode & 0o777 == 0o600


@needs_root
def test_another_users_shared_directory_is_refused_by_root(moto_endpoint: str, bucket: str) -> None:
    """The reported case, replayed: an unprivileged user (nobody) prepares a shared journal
    directory with a 0777 locks/, a symlink planted at the source lock's name and a 0666
    journal.db; root's upload there must refuse, and leave root's 0600 file as it was."""
    nobody = pwd.getpwnam("nobody")
    # Outside pytest's 0700 tmp_path, which nobody cannot reach.
    tmp_path = Path(tempfile.mkdtemp(prefix="archup-shared-"))
    tmp_path.chmod(0o755)
    try:
        _replay_the_shared_directory_attack(tmp_path, nobody, moto_endpoint, bucket)
    finally:
        shutil.rmtree(tmp_path)


def _replay_the_shared_directory_attack(tmp_path: Path, nobody: pwd.struct_passwd, moto_endpoint: str,
                                        bucket: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    victim = _victim(tmp_path)
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("a\n")
    # Everything below is done by nobody itself, not chowned afterwards.
    plant = ("import os, sys; d = sys.argv[1]; os.mkdir(d + '/locks'); os.chmod(d + '/locks', 0o777); "
             "[os.symlink(sys.argv[2], d + '/locks/' + n) for n in sys.argv[3:]]; "
             "fd = os.open(d + '/journal.db', os.O_CREAT | os.O_WRONLY, 0o666); os.fchmod(fd, 0o666)")
    names = [f"source-{i}.lock" for i in range(3)]  # any name: the directory is refused before a lock is opened
    subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", plant, str(shared), str(victim), *names],
                   check=True)
    assert (shared / "journal.db").stat().st_uid == nobody.pw_uid
    for journal_dir in (shared, tmp_path / "owned-dir"):
        if journal_dir != shared:  # a directory of root's own, but with nobody's journal.db in it
            journal_dir.mkdir(mode=0o700)
            (journal_dir / "journal.db").touch(mode=0o600)
            os.chown(journal_dir / "journal.db", nobody.pw_uid, nobody.pw_gid)
        proc = subprocess.run(
            [sys.executable, "-m", "archup", "upload", str(source), "--journal", str(journal_dir / "journal.db"),
             "--bucket", bucket, "--endpoint-url", moto_endpoint],
            capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 1, proc.stderr
        assert str(journal_dir) in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert victim.read_bytes() == VICTIM
    assert victim.stat().st_uid == 0


def test_the_library_never_creates_a_journal_through_a_dangling_symlink(tmp_path) -> None:
    from archup.errors import JournalError
    from archup.journal import SQLiteJournal

    target = tmp_path / "elsewhere" / "owned.db"
    target.parent.mkdir()
    (tmp_path / "state").mkdir(mode=0o700)
    link = tmp_path / "state" / "journal.db"
    link.symlink_to(target)
    with pytest.raises(JournalError, match="cannot create journal"):
        SQLiteJournal(link)
    assert not target.exists()
