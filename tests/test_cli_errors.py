"""Bad input and unusable destinations: a documented exit code and one clear line, never a traceback.

These run archup as a real subprocess (``python -m archup``) wherever the exit
code, stderr or the absence of a traceback is what is being tested.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
import typer.core
import typer.main
from conftest import both_transports
from typer.testing import CliRunner
from ulid import ULID

from archup.cli import app
from archup.errors import ExitCode
from archup.journal import NewFile, SQLiteJournal

WELL_FORMED_UNKNOWN = "01K8RNKN488RQCG3YGG72QBZS5"
DOCUMENTED_EXIT_CODES = {0, 1, 2, 3, 4, 5, 75, 130}  # 75: restore left archived objects thawing


def archup(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """archup as a subprocess with exactly these arguments (no --bucket or --journal added)."""
    return subprocess.run([sys.executable, "-m", "archup", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_error_line(stderr: str, stdout: str = "") -> str:
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("archup: error: "), lines[0]
    return lines[0]


def assert_no_batch(journal: Path) -> None:
    """Bad input never leaves a batch behind (journal not created, or created empty)."""
    if journal.exists():
        opened = SQLiteJournal(journal)
        try:
            assert opened.list_batches() == []
        finally:
            opened.close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released without listening)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def source(tmp_path: Path) -> Path:
    directory = tmp_path / "src"
    (directory / "sub").mkdir(parents=True)
    (directory / "a.txt").write_bytes(b"alpha\n")
    (directory / "sub" / "b.txt").write_bytes(b"bravo\n")
    return directory


# -- bad input: exit 2 ---------------------------------------------------------------------------


def test_missing_directory_is_a_usage_error(cli, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    result = cli.subprocess("upload", str(missing))
    assert result.exit_code == ExitCode.USAGE == 2
    line = assert_one_error_line(result.stderr, result.stdout)
    assert str(missing) in line
    assert result.stdout == ""
    assert_no_batch(cli.journal)


def test_a_file_instead_of_a_directory_is_a_usage_error(cli, source: Path) -> None:
    result = cli.subprocess("upload", str(source / "a.txt"))
    assert result.exit_code == 2
    line = assert_one_error_line(result.stderr, result.stdout)
    assert str(source / "a.txt") in line and "not a directory" in line
    assert_no_batch(cli.journal)


# The first case of each kind runs as a real subprocess; its variants run in-process (same exit
# code through click, and any exception would fail the test with its traceback) to keep the suite fast.


def run(cli: Any, how: str, *args: str) -> Any:
    return cli.subprocess(*args) if how == "subprocess" else cli(*args)


@pytest.mark.parametrize(("command", "batch_id", "how"), [
    ("status", "not-a-ulid", "subprocess"),
    ("finalize", "not-a-ulid", "subprocess"),
    ("status", "01K8RNKN488RQCG3YGG72QBZS", "in-process"),      # 25 characters
    ("finalize", "01K8RNKN488RQCG3YGG72QBZS5X", "in-process"),  # 27 characters
    ("status", "01K8RNKN488RQCG3YGG72QBZSU", "in-process"),     # U is not in the ULID alphabet
    ("finalize", "81K8RNKN488RQCG3YGG72QBZS5", "in-process"),   # beyond the largest ULID
])
def test_malformed_batch_id_is_a_usage_error(cli, command: str, batch_id: str, how: str) -> None:
    result = run(cli, how, command, batch_id)
    assert result.exit_code == 2, result.stderr
    line = assert_one_error_line(result.stderr, result.stdout)
    assert "malformed" in line and batch_id in line
    assert_no_batch(cli.journal)


def test_malformed_batch_id_for_upload_batch_is_a_usage_error(cli, source: Path) -> None:
    result = cli("upload", "--batch", "nope", str(source))
    assert result.exit_code == 2, result.stderr
    assert "malformed" in assert_one_error_line(result.stderr, result.stdout)
    assert_no_batch(cli.journal)


@pytest.mark.parametrize(("command", "how"), [("status", "subprocess"), ("finalize", "in-process")])
def test_unknown_batch_id_is_a_usage_error(cli, source: Path, command: str, how: str) -> None:
    uploaded = cli("upload", "--json", str(source))  # the journal exists and holds another batch
    assert uploaded.exit_code == 0, uploaded.stderr
    result = run(cli, how, command, WELL_FORMED_UNKNOWN)
    assert result.exit_code == 2, result.stderr
    line = assert_one_error_line(result.stderr, result.stdout)
    assert WELL_FORMED_UNKNOWN in line and "no batch" in line


def test_no_bucket_configured_is_a_usage_error(cli, source: Path) -> None:
    result = archup("upload", "--journal", str(cli.journal), "--endpoint-url", cli.endpoint, str(source))
    assert result.returncode == 2, result.stderr
    line = assert_one_error_line(result.stderr, result.stdout)
    assert "--bucket" in line and "ARCHUP_BUCKET" in line
    assert_no_batch(cli.journal)


@pytest.mark.parametrize(("size", "how"), [("abc", "subprocess"), ("4MiB", "in-process"),
                                           ("5242879", "in-process"), ("6GiB", "in-process"),
                                           ("0", "in-process"), ("8XB", "in-process")])
def test_bad_part_size_is_a_usage_error(cli, source: Path, size: str, how: str) -> None:
    result = run(cli, how, "upload", "--part-size", size, str(source))
    assert result.exit_code == 2, result.stderr
    line = assert_one_error_line(result.stderr, result.stdout)
    assert size in line
    assert_no_batch(cli.journal)


@pytest.mark.parametrize(("parallel", "how"), [("0", "subprocess"), ("-1", "in-process"), ("257", "in-process")])
def test_out_of_range_parallel_is_a_usage_error(cli, source: Path, parallel: str, how: str) -> None:
    result = run(cli, how, "upload", "--parallel", parallel, str(source))
    assert result.exit_code == 2, result.stderr
    line = assert_one_error_line(result.stderr, result.stdout)
    assert "--parallel" in line and parallel in line
    assert_no_batch(cli.journal)


@pytest.mark.parametrize(("args", "how"), [(["--parallel", "many"], "subprocess"),
                                           (["--no-such-option"], "in-process"), ([], "in-process")])
def test_options_click_rejects_exit_2_without_traceback(cli, source: Path, args: list[str], how: str) -> None:
    result = run(cli, how, "upload", *args, *([str(source)] if args else []))
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip()
    assert_no_batch(cli.journal)


# -- unusable destination: exit 5 ----------------------------------------------------------------


def test_non_existent_bucket_is_a_destination_error(cli, s3, source: Path) -> None:
    cli.bucket = "archup-no-such-bucket-anywhere"
    result = cli.subprocess("upload", str(source))
    assert result.exit_code == ExitCode.DESTINATION == 5, result.stderr
    line = assert_one_error_line(result.stderr, result.stdout)
    assert cli.bucket in line
    assert_no_batch(cli.journal)
    assert cli.bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}


def test_unreachable_endpoint_is_a_destination_error_and_does_not_hang(cli, source: Path) -> None:
    cli.endpoint = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = cli.subprocess("upload", str(source), timeout=90)
    elapsed = time.monotonic() - started
    assert result.exit_code == 5, result.stderr
    line = assert_one_error_line(result.stderr, result.stdout)
    assert cli.endpoint in line
    assert elapsed < 30, f"took {elapsed:.1f}s to give up on a closed port"
    assert_no_batch(cli.journal)


def test_finalize_against_an_unreachable_endpoint_fails_then_succeeds_later(cli, s3, bucket,
                                                                            source: Path) -> None:
    uploaded = cli("upload", "--no-finalize", "--json", str(source))
    assert uploaded.exit_code == 0, uploaded.stderr
    batch_id = json.loads(uploaded.stdout)["batch_id"]

    unreachable = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    # Another endpoint than the batch recorded, confirmed: the configured one is used.
    result = cli("finalize", batch_id, "--endpoint-url", unreachable, "--trust-recorded-endpoint")
    assert result.exit_code == 5, result.stderr
    assert unreachable in assert_one_error_line(result.stderr, result.stdout)
    assert time.monotonic() - started < 30
    assert not [k["Key"] for k in s3.list_objects_v2(Bucket=bucket).get("Contents", []) if "manifest" in k["Key"]]
    status = json.loads(cli("status", batch_id, "--json").stdout)
    assert status["finalized_at"] is None and status["status"] != "enqueued"

    again = cli("finalize", batch_id, "--json")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "enqueued"


# -- help ----------------------------------------------------------------------------------------


def test_top_level_help_lists_every_command_and_the_exit_code_table(cli) -> None:
    result = archup("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Exit codes:" in text
    table = text.split("Exit codes:", 1)[1]
    listed = {int(match.group(1)) for match in re.finditer(r"^\s*(\d+)\s+\S", table, re.MULTILINE)}
    assert listed == DOCUMENTED_EXIT_CODES == {int(code) for code in ExitCode}
    for name in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
        assert re.search(rf"^\s+{re.escape(name)}\s", text, re.MULTILINE), f"{name} missing from --help"


def test_every_command_has_help_text(cli) -> None:
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    assert {"upload", "status", "finalize"} <= set(commands)
    for name, command in commands.items():
        assert (command.help or "").strip(), f"{name} has no help text"
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        first_line = command.help.strip().splitlines()[0]
        assert " ".join(first_line.split()[:4]) in " ".join(result.stdout.split()), name
        assert "--json" in result.stdout, f"{name} has no --json"
        for parameter in command.params:
            if isinstance(parameter, typer.core.TyperOption) and parameter.name != "help":
                assert (parameter.help or "").strip(), f"{name} {parameter.opts} has no help"


def test_upload_help_shows_the_exit_code_table() -> None:
    result = CliRunner().invoke(app, ["upload", "--help"])
    assert result.exit_code == 0, result.output
    for code in DOCUMENTED_EXIT_CODES:
        assert re.search(rf"^\s*{code}\s+\S", result.stdout, re.MULTILINE), code


# -- error messages are one line, whatever the file names ------------------------------------------


def test_refusal_stays_one_line_when_a_file_name_has_control_characters(cli, s3, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    name = "two\nlines \x1b[31mred.txt"
    (source / name).write_bytes(b"x\n")
    batch_id = str(ULID())
    journal = SQLiteJournal(cli.journal)
    try:
        batch = journal.init_batch(batch_id, source_root=str(source), bucket=cli.bucket, prefix="staging/",
                                   part_size=8 * 1024 * 1024, endpoint_url=cli.endpoint)
        info = (source / name).stat()
        journal.add_files(batch_id, [NewFile(name, f"{batch.batch_prefix}files/{name}", info.st_size,
                                             info.st_mtime_ns)])
        journal.mark_scan_complete(batch_id)
    finally:
        journal.close()

    result = cli("finalize", batch_id)
    assert result.exit_code == 3, result.stderr
    line = assert_one_error_line(result.stderr, result.stdout)
    assert "\x1b" not in result.stderr
    assert "two" in line and "red.txt" in line


# -- credentials ---------------------------------------------------------------------------------

CANARY_KEY_ID = "AKIACANARY7Q3ZX9WQ4T"
CANARY_SECRET = "canarySecret/9f8e7d6c5b4a3+ZzYyXxWw1234567890"
CANARY_TOKEN = "canaryToken//FwoGZXIvYXdzEBcaDH7Q3ZX9canary"


@both_transports
def test_credentials_never_appear_in_output_logs_journal_or_manifest(cli, s3, bucket, source: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CANARY_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", CANARY_TOKEN)
    # The subprocess inherits this environment: make sure it really is what boto3 signs with.
    credentials = boto3.session.Session().get_credentials()
    assert (credentials.access_key, credentials.secret_key, credentials.token) == (
        CANARY_KEY_ID, CANARY_SECRET, CANARY_TOKEN)
    canaries = [CANARY_KEY_ID, CANARY_SECRET, CANARY_TOKEN, CANARY_SECRET.split("/")[0]]

    # The most talkative run there is, as a real process: botocore's debug log prints whole requests.
    log_file = tmp_path / "archup.log"
    loud = archup("-vvv", "--log-file", str(log_file), "upload", "--journal", str(cli.journal),
                  "--bucket", bucket, "--endpoint-url", cli.endpoint, "--json", str(source))
    assert loud.returncode == 0, loud.stderr[-3000:]
    first = json.loads(loud.stdout)["batch_id"]
    assert "Authorization" in loud.stderr or "authorization" in loud.stderr  # the requests were logged

    runs = [cli("upload", "--new-batch", "--no-finalize", str(source))]
    assert runs[0].exit_code == 0, runs[0].stderr
    second = next(b.batch_id for b in _batches(cli.journal) if b.batch_id != first)
    runs += [
        cli("finalize", second),
        cli("status", first),
        cli("status", second, "--json"),
        cli("list", "--json"),
        cli("upload", "--bucket", "archup-no-such-bucket-for-canary", str(source)),
    ]
    assert [result.exit_code for result in runs] == [0, 0, 0, 0, 0, 5]
    outputs = [loud.stdout, loud.stderr] + [text for result in runs for text in (result.stdout, result.stderr)]
    assert any(first in text for text in outputs) and any(second in text for text in outputs)

    stored: dict[str, bytes] = {str(log_file): log_file.read_bytes()}
    for path in cli.journal.parent.rglob("*"):
        if path.is_file():
            stored[str(path)] = path.read_bytes()
    assert str(cli.journal) in stored
    for item in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        head = s3.head_object(Bucket=bucket, Key=item["Key"])
        stored[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        stored[item["Key"] + " (metadata)"] = json.dumps(head["Metadata"]).encode()
    assert sum(1 for key in stored if key.endswith("manifest.json")) == 2
    assert sum(1 for key in stored if key.endswith("manifest.jsonl")) == 2

    for canary in canaries:
        for text in outputs:
            assert canary not in text
        for where, data in stored.items():
            assert canary.encode() not in data, f"{canary!r} found in {where}"


def _batches(journal_path: Path) -> list[Any]:
    journal = SQLiteJournal(journal_path)
    try:
        return journal.list_batches()
    finally:
        journal.close()
