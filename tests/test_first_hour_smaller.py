"""The smaller things a new user meets: resume keeps the run's --parallel, an empty 'list' says so,
skipped entries are not all called files, counts of bytes agree with their number, abort and
status name the batch's state alike, and a sealed batch reads as sealed."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from conftest import Cli
from test_terminal import _run_in_a_terminal

from archup.cli.verify import describe
from archup.verify import Difference, Problem


def _source(tmp_path: Path, count: int = 3) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(count):
        (source / f"file-{index}.txt").write_bytes(f"file {index}\n".encode())
    return source


def test_resume_keeps_the_parallel_the_batch_was_started_with(cli: Cli, tmp_path: Path) -> None:
    source = _source(tmp_path)
    first = cli("upload", "--parallel", "8", "--no-finalize", "--json", str(source))
    assert first.exit_code == 0, first.stderr
    batch_id = json.loads(first.stdout)["batch_id"]
    resumed = cli("resume", batch_id)
    assert resumed.exit_code == 0, resumed.stderr
    assert "with 8 streams" in resumed.stderr, resumed.stderr
    # A flag still wins for this run.
    second = cli("upload", "--parallel", "3", "--no-finalize", "--new-batch", "--json", str(source))
    again = cli("resume", "--parallel", "2", json.loads(second.stdout)["batch_id"])
    assert again.exit_code == 0 and "with 2 streams" in again.stderr, again.stderr


def test_list_with_no_match_says_so_in_one_line(cli: Cli, tmp_path: Path) -> None:
    source = _source(tmp_path)
    assert cli("upload", str(source)).exit_code == 0
    code, output = _run_in_a_terminal([sys.executable, "-m", "archup", "list", "--status", "failed",
                                       "--journal", str(cli.journal)])
    assert code == 0, output
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output).strip()
    assert plain == "no batches in state failed", plain


def test_skipped_entries_are_counted_as_entries_not_files(cli: Cli, tmp_path: Path) -> None:
    source = _source(tmp_path, 1)
    os.symlink("file-0.txt", source / "link")
    (source / "dir").mkdir()
    os.symlink("..", source / "dir" / "up")
    result = cli("upload", str(source))
    assert result.exit_code == 0, result.stderr
    assert "archup: 2 entries skipped:" in result.stderr, result.stderr
    assert "file(s) skipped" not in result.stderr


def test_a_count_of_bytes_agrees_with_its_number() -> None:
    one = Difference("k", "a.txt", Problem.SIZE_MISMATCH, 5, 1)
    assert describe(one) == "size_mismatch: a.txt: expected 5 bytes, found 1 byte"


def test_abort_and_status_name_the_state_alike(cli: Cli, tmp_path: Path) -> None:
    source = _source(tmp_path)
    uploaded = cli("upload", "--no-finalize", "--json", str(source))
    batch_id = json.loads(uploaded.stdout)["batch_id"]
    aborted = cli("abort", batch_id)
    assert aborted.exit_code == 0, aborted.stderr
    assert re.search(r"^status +aborted$", aborted.stdout, re.MULTILINE), aborted.stdout
    assert not re.search(r"^state ", aborted.stdout, re.MULTILINE), aborted.stdout
    status = cli("status", batch_id)
    assert re.search(r"^status +aborted$", status.stdout, re.MULTILINE), status.stdout
    assert json.loads(cli("abort", batch_id, "--json").stdout)["state"] == "aborted"  # the JSON stays


def test_a_sealed_batch_reads_as_sealed_and_its_json_stays_enqueued(cli: Cli, tmp_path: Path) -> None:
    source = _source(tmp_path)
    uploaded = cli("upload", "--json", str(source))
    batch_id = json.loads(uploaded.stdout)["batch_id"]
    status = cli("status", batch_id)
    assert re.search(r"^status +enqueued \(sealed\)$", status.stdout, re.MULTILINE), status.stdout
    assert json.loads(cli("status", batch_id, "--json").stdout)["status"] == "enqueued"
