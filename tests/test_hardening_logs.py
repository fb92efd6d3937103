"""Hardening, issue 29 item 6: -vvv logs botocore's requests, never their bodies: a file's
bytes do not end up in the log file (nor a log as large as the files)."""

from __future__ import annotations

from pathlib import Path

from conftest import both_transports
from test_cron_output import archup

MARKER = b"FILE-CONTENT-NEVER-LOGGED-"


@both_transports
def test_vvv_logs_no_request_body(cli, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "small.txt").write_bytes(MARKER * 4000)  # about 100 KiB: one PutObject
    (source / "big.bin").write_bytes(MARKER * (6 * 1024 * 1024 // len(MARKER)))  # multipart at 5 MiB parts
    log_file = tmp_path / "archup.log"
    result = archup("-vvv", "--log-file", str(log_file), "upload", "--journal", str(cli.journal),
                    "--bucket", bucket, "--endpoint-url", cli.endpoint, "--part-size", "5MiB", "--json",
                    str(source))
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_file.read_text(encoding="utf-8")
    assert "Making request for" in log  # botocore's request lines are still there
    assert "<body not logged: " in log
    for where, text in (("log file", log), ("stderr", result.stderr)):
        assert MARKER.decode() not in text, f"file content in the {where}"
    assert log_file.stat().st_size < 1024 * 1024, log_file.stat().st_size
