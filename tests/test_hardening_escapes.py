"""Hardening, issue 29 item 2: names, keys and server texts from outside never reach the
terminal (or a log line) raw: control characters are escaped, and each stays on its line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from archup import logs
from archup.batches import GcReport
from archup.cli import lifecycle
from archup.cli.progress import RichProgress
from archup.cli.verify import describe
from archup.journal import NewFile, SQLiteJournal
from archup.states import FileState
from archup.verify import Difference, Problem

BATCH = "01K8RNKN488RQCG3YGG72QBZS5"
# Sets the window title, clears the screen, and starts a forged line of its own.
HOSTILE = "x\x1b]0;pwned\x07\x1b[2J\nFORGED LINE\r"


def _raw(text: str) -> bool:
    return any(char in text for char in "\x1b\x07\r") or "\nFORGED" in text


def test_verify_differences_are_escaped() -> None:
    for difference in (Difference(f"files/{HOSTILE}", HOSTILE, Problem.MISSING, 3, None),
                       Difference(None, None, Problem.SIZE_MISMATCH, HOSTILE, HOSTILE)):
        line = describe(difference)
        assert not _raw(line) and "\n" not in line, line
        assert "\\x1b]0;pwned" in line


@pytest.fixture
def failed_batch(journal_path: Path) -> Path:
    journal = SQLiteJournal(journal_path)
    try:
        journal.init_batch(BATCH, source_root=f"/src/{HOSTILE}", bucket="b", prefix="p/", part_size=8 << 20)
        journal.add_files(BATCH, [NewFile(HOSTILE, f"p/{BATCH}/files/{HOSTILE}", 1, 0),
                                  NewFile("skipped", f"p/{BATCH}/files/skipped", 0, 0, FileState.SKIPPED,
                                          error=HOSTILE)])
        journal.fail_file(BATCH, HOSTILE, f"AccessDenied: {HOSTILE}")
    finally:
        journal.close()
    return journal_path


def test_status_escapes_the_error_column_and_every_field(cli, failed_batch: Path) -> None:
    result = cli("status", BATCH)
    assert result.exit_code == 0, result
    assert not _raw(result.stdout), result.stdout
    assert "failed: x\\x1b]0;pwned" in result.stdout and "AccessDenied: x\\x1b]0;pwned" in result.stdout
    assert "skipped: skipped: x\\x1b]0;pwned" in result.stdout


def test_list_escapes_the_source_root(cli, failed_batch: Path) -> None:
    result = cli("list")
    assert result.exit_code == 0 and not _raw(result.stdout), result.stdout


def test_progress_failed_line_escapes_the_server_error(capsys: pytest.CaptureFixture[str]) -> None:
    with RichProgress(total_bytes=10, total_files=1) as progress:
        progress.on_file_started(HOSTILE, 10)
        progress.on_file_done(HOSTILE, FileState.FAILED, 10, f"SlowDown: {HOSTILE}")
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if "failed:" in line]
    assert failed and not _raw(failed[0]) and "SlowDown: x\\x1b]0;pwned" in failed[0], err


def test_gc_escapes_orphan_keys(capsys: pytest.CaptureFixture[str]) -> None:
    report = GcReport(orphan_uploads=[{"bucket": "b", "key": f"p/{HOSTILE}", "upload_id": HOSTILE}])
    lifecycle._print_gc_report(report, None, abort_orphans=False)
    out = capsys.readouterr().out
    assert not _raw(out) and out.count("\n") == 2 and "orphan upload s3://b/p/x\\x1b" in out, out


def test_log_lines_escape_control_characters_and_stay_one_line(tmp_path: Path) -> None:
    log_file = tmp_path / "archup.log"
    logs.configure(1, log_file)
    logging.getLogger("archup.test").info("uploaded %s", HOSTILE)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("archup.test").warning("with a traceback %s", HOSTILE, exc_info=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = log_file.read_text()
    assert not _raw(text), text
    assert "uploaded x\\x1b]0;pwned\\x07\\x1b[2J\\nFORGED LINE\\r" in text
    assert "Traceback (most recent call last):\n" in text  # a traceback keeps its own lines


def test_a_plain_difference_reads_as_before() -> None:
    assert describe(Difference("k", "plain/name.txt", Problem.MISSING, 3, None)) == \
        "missing: plain/name.txt: expected 3 bytes, found no object"
