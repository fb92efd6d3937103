"""SIGINT/SIGTERM: stop taking work, commit, say how to resume, exit 130; a rerun finishes the batch."""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faultstore import Faults

FILES = 120


def _source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(FILES):
        (source / f"f{index:03}.bin").write_bytes(os.urandom(8 * 1024))
    return source


def _uploaded(journal: Path) -> int:
    if not journal.exists():
        return 0
    try:
        with sqlite3.connect(journal, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM files WHERE state = 'uploaded'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # the schema is not there yet


def _wait_until(proc: subprocess.Popen[str], reached: Callable[[], bool], what: str) -> None:
    """Bounded poll (short intervals) until ``reached()``; the run must still be going then."""
    deadline = time.monotonic() + 60
    while not reached():
        try:
            proc.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            assert time.monotonic() < deadline, f"{what} not within 60 s"
        else:
            pytest.fail(f"upload ended before it could be interrupted: {proc.communicate()}")


def _wait_for_progress(proc: subprocess.Popen[str], journal: Path, at_least: int) -> None:
    """Until the run has committed some files."""
    _wait_until(proc, lambda: _uploaded(journal) >= at_least, f"{at_least} files uploaded")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_and_rerun_finishes(cli, s3, bucket, tmp_path: Path, signum: int) -> None:
    source = _source(tmp_path)
    # --bwlimit keeps the run going long enough to be interrupted in the middle.
    args = [sys.executable, "-m", "archup", "upload", "--journal", str(cli.journal), "--bucket", bucket,
            "--endpoint-url", cli.endpoint, "--parallel", "2", "--bwlimit", "128KiB", str(source)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_progress(proc, cli.journal, 3)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    done_before = _uploaded(cli.journal)
    assert 3 <= done_before < FILES
    with sqlite3.connect(cli.journal) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        batch_id, state = conn.execute("SELECT batch_id, state FROM batches").fetchone()
    assert state == "uploading"

    # The command it prints finishes the batch as printed: no bucket, endpoint or source to repeat.
    printed = re.search(r"resume with '([^']+)'", stderr)
    assert printed is not None, stderr
    words = shlex.split(printed.group(1))
    assert words[:3] == ["archup", "resume", batch_id], words
    rerun = subprocess.run([sys.executable, "-m", "archup", *words[1:], "--json"], capture_output=True, text=True,
                           timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["batch_id"] == batch_id
    assert summary["files_uploaded"] == FILES
    # Only what was not committed before the signal is sent again.
    assert summary["bytes_sent"] <= (FILES - done_before) * 8 * 1024


BIG = 6 * 1024 * 1024


def _big_source(tmp_path: Path) -> tuple[Path, bytes]:
    source = tmp_path / "big-src"
    source.mkdir()
    data = os.urandom(BIG)
    (source / "big.bin").write_bytes(data)
    return source, data


def _start_held_multipart(cli, bucket: str, source: Path, *extra: str) -> subprocess.Popen[str]:
    """An upload with a part held back by --bwlimit (the 5 MiB one needs about 80 s) once another
    is recorded: a stop that waited for the work in flight would take that long. Both parts are
    in flight at once, so either may be the one recorded first."""
    args = [sys.executable, "-m", "archup", "upload", "--journal", str(cli.journal), "--bucket", bucket,
            "--endpoint-url", cli.endpoint, "--part-size", "5MiB", "--bwlimit", "64KiB", *extra, str(source)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until(proc, lambda: _parts_recorded(cli.journal) > 0, "a part recorded")
    return proc


def _stderr_until(proc: subprocess.Popen[str], text: str, seconds: float = 30) -> str:
    """What stderr carried until ``text`` appeared (each wait bounded). Read from the raw pipe:
    a buffered readline() could pull the awaited line into its buffer, where select() never
    sees it."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + seconds
    while text.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {text!r} on stderr within {seconds} s: {seen!r}"
        chunk = os.read(fd, 65536)
        assert chunk, f"stderr closed before {text!r}: {seen!r}"
        seen += chunk
    return seen.decode()


def _parts_recorded(journal: Path) -> int:
    try:
        with sqlite3.connect(journal, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM parts").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # no journal, or no schema yet


def _resumes_to_the_same_bytes(cli, s3, bucket: str, source: Path, data: bytes) -> None:
    with sqlite3.connect(cli.journal) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        kept = int(conn.execute("SELECT coalesce(sum(size), 0) FROM parts").fetchone()[0])
    assert 0 < kept < BIG
    result = cli("upload", "--json", "--part-size", "5MiB", str(source))
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["bytes_sent"] == BIG - kept  # the recorded part was kept, only the other sent
    assert s3.get_object(Bucket=bucket, Key=summary["prefix"] + "files/big.bin")["Body"].read() == data


def test_second_signal_exits_at_once_and_batch_stays_resumable(cli, s3, bucket, tmp_path: Path) -> None:
    """With a long grace, only the second signal can end the run in less than the ~80 s its
    held-back part needs: it must exit 130 at once, and the batch resumes, keeping the recorded part."""
    source, data = _big_source(tmp_path)
    proc = _start_held_multipart(cli, bucket, source, "--grace", "600")
    proc.send_signal(signal.SIGINT)
    # Signals sent back to back may be taken as one: the second goes once the first is handled.
    seen = _stderr_until(proc, "archup: stopping")
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=30)
    stderr = seen + rest
    assert proc.returncode == 130, stderr
    assert "second signal; exiting now" in stderr and "archup resume " in stderr, stderr
    _resumes_to_the_same_bytes(cli, s3, bucket, source, data)


def test_first_signal_exits_after_the_grace_when_work_in_flight_outlasts_it(cli, s3, bucket,
                                                                             tmp_path: Path) -> None:
    """One SIGTERM, --grace 2: the held-back part would need ~80 s; archup exits 130 after the
    grace, saying how to resume, and the batch resumes, keeping the recorded part."""
    source, data = _big_source(tmp_path)
    proc = _start_held_multipart(cli, bucket, source, "--grace", "2", "--json")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "still in flight 2 s after the signal" in stderr and "archup resume " in stderr, stderr
    (line,) = stdout.splitlines()  # --json: still exactly one object, though it exits at once
    assert json.loads(line)["exit_code"] == 130 and "archup resume " in json.loads(line)["error"]
    _resumes_to_the_same_bytes(cli, s3, bucket, source, data)


def test_a_signal_during_the_preflight_ends_the_run_before_any_file_is_read(cli, bucket, tmp_path: Path,
                                                                             store_faults: Faults) -> None:
    """The handler covers the whole command: a SIGINT while the bucket is being checked stops
    the run before the batch begins (exit 130, the resume command), not with a traceback."""
    source = _source(tmp_path)
    # As HeadBucket returns, every time the bucket is checked.
    store_faults.after("check_bucket", do=lambda call: os.kill(os.getpid(), signal.SIGINT), times=None)
    result = cli("upload", str(source))
    assert result.exit_code == 130, result.stderr
    assert "interrupted before it began; resume with 'archup resume " in result.stderr
    assert _uploaded(cli.journal) == 0
