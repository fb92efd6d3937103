"""SIGINT/SIGTERM: stop taking work, commit, say how to resume, exit 130; a rerun finishes the batch."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def _wait_for_progress(proc: subprocess.Popen[str], journal: Path, at_least: int) -> None:
    """Bounded poll (short intervals) until the run has committed some files."""
    deadline = time.monotonic() + 60
    while _uploaded(journal) < at_least:
        try:
            proc.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            assert time.monotonic() < deadline, "no progress within 60 s"
        else:
            pytest.fail(f"upload ended before it could be interrupted: {proc.communicate()}")


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


def test_second_signal_exits_at_once_and_batch_stays_resumable(cli, bucket, tmp_path: Path) -> None:
    source = _source(tmp_path)
    args = [sys.executable, "-m", "archup", "upload", "--journal", str(cli.journal), "--bucket", bucket,
            "--endpoint-url", cli.endpoint, "--parallel", "2", "--bwlimit", "32KiB", str(source)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_progress(proc, cli.journal, 2)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    with sqlite3.connect(cli.journal) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    result = cli("upload", "--json", str(source))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["files_uploaded"] == FILES
