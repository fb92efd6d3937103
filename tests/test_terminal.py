"""On a terminal: a live progress display (files, bytes, rate, ETA, the files in flight) and the
summary. Run for real in a pseudo-terminal, as a person at a shell would see it; the cron side
(no terminal: no escape codes at all) is in tests/test_options.py."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

FILES = 8
SIZE = 128 * 1024


def _run_in_a_terminal(args: list[str], seconds: float = 120) -> tuple[int, str]:
    """Run with stdin, stdout and stderr on a pty; everything it wrote, and its exit code."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "40"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + seconds
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no output for {seconds} s: {b''.join(chunks)[-2000:]!r}"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_live_progress_and_the_summary(cli, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(FILES):
        (source / f"file-{index}.bin").write_bytes(os.urandom(SIZE))
    # --bwlimit makes the run last a few seconds, so the display refreshes several times.
    args = [sys.executable, "-m", "archup", "upload", "--journal", str(cli.journal), "--bucket", bucket,
            "--endpoint-url", cli.endpoint, "--parallel", "2", "--bwlimit", "512KiB", str(source)]

    code, output = _run_in_a_terminal(args)

    assert code == 0, output
    assert "\x1b[" in output  # drawn with terminal control codes (the cron run has none)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    # Files done of the total, bytes done of the total, the rate, the time left, files in flight.
    assert re.search(rf"\b\d/{FILES} files\b", plain), plain
    assert re.search(r"\d+(\.\d+)?/1\.0 MiB", plain), plain
    assert re.search(r"\d+(\.\d+)? [kKM]i?B/s", plain), plain
    assert re.search(r"MiB (\d+(\.\d+)? [KM]iB/s|\?) (\d+(\.\d)?s|\d+m \d\ds|-) ", plain), plain  # IEC, 2m 14s
    assert "file-" in plain.split("files", 1)[1], plain
    # Then the summary, as a table.
    # Labels in words, sizes, the time it took and the average rate in units (cron keeps raw numbers).
    assert re.search(rf"│ files uploaded +│ {FILES} +│", plain), plain
    assert re.search(r"│ status +│ enqueued \(sealed\) +│", plain), plain  # the seal, said
    assert re.search(r"│ size +│ 1\.00 MiB +│", plain), plain
    assert re.search(r"│ elapsed +│ \d+(\.\d)?s +│", plain), plain
    assert re.search(r"│ rate +│ \d+(\.\d+)? [KM]iB/s +│", plain), plain


def test_status_and_list_on_a_terminal_read_at_a_glance(cli, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(3):
        (source / f"file-{index}.bin").write_bytes(os.urandom(SIZE))
    uploaded = cli("upload", "--json", str(source))
    assert uploaded.exit_code == 0, uploaded.stderr
    batch_id = json.loads(uploaded.stdout)["batch_id"]
    journal = ["--journal", str(cli.journal)]

    code, output = _run_in_a_terminal([sys.executable, "-m", "archup", "status", batch_id, *journal])
    assert code == 0, output
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert re.search(r"│ bytes +│ 384 KiB of 384 KiB uploaded +│", plain), plain

    code, output = _run_in_a_terminal([sys.executable, "-m", "archup", "list", *journal])
    assert code == 0, output
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    header = next(line for line in plain.splitlines() if "Batch" in line)
    assert re.search(r"Batch +Status +Age +Files +Uploaded +Source", header), plain
    assert re.search(rf"{batch_id} +enqueued +\d+(\.\d)?s +3 of 3 +384 KiB of 384 KiB +", plain), plain
