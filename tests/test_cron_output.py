"""What a cron job sees: config precedence, the log file, scrubbed signatures, one JSON object.

The click-error and log-file tests run archup as a real process (``python -m
archup``): the path through ``main()`` and a fresh logging setup are what they test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import both_transports
from test_cli_errors import closed_port
from typer.testing import CliRunner

from archup.cli import app
from archup.journal import SQLiteJournal

WELL_FORMED_UNKNOWN = "01K8RNKN488RQCG3YGG72QBZS5"
# A 64-hex-digit value (a SigV4 signature) anywhere shortly after "Signature".
SIGNATURE_IN_CLEAR = re.compile(r"Signature.{0,16}?(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])", re.DOTALL)


def archup(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """archup as a subprocess with exactly these arguments."""
    return subprocess.run([sys.executable, "-m", "archup", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_json_object(stdout: str) -> dict[str, Any]:
    """stdout is exactly one JSON object (raw_decode would accept trailing text; json.loads does not)."""
    document = json.loads(stdout)
    assert isinstance(document, dict), stdout
    return document


@pytest.fixture
def source(tmp_path: Path) -> Path:
    directory = tmp_path / "src"
    directory.mkdir()
    (directory / "a.txt").write_bytes(b"alpha\n")
    (directory / "b.txt").write_bytes(b"bravo\n")
    return directory


def upload_in_process(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


# -- 1. precedence: flags, then environment, then the config file -----------------------------------


@pytest.mark.parametrize("variable", ["ARCHUP_ENDPOINT_URL", "AWS_ENDPOINT_URL"])
def test_environment_beats_the_config_file_for_endpoint_and_journal(
        cli, bucket: str, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    file_journal, env_journal = tmp_path / "from-file.db", tmp_path / "from-env.db"
    config = tmp_path / "config.toml"
    # The file names an endpoint nothing listens on: if it won, the upload could not succeed.
    config.write_text(f'endpoint_url = "http://127.0.0.1:{closed_port()}"\njournal_path = "{file_journal}"\n')
    monkeypatch.setenv("ARCHUP_CONFIG", str(config))
    monkeypatch.setenv(variable, cli.endpoint)
    monkeypatch.setenv("ARCHUP_JOURNAL", str(env_journal))
    result = upload_in_process("upload", "--bucket", bucket, "--retries", "0", "--json", str(source))
    assert result.exit_code == 0, result.stderr
    assert one_json_object(result.stdout)["files_uploaded"] == 2
    assert env_journal.exists() and not file_journal.exists()


def test_archup_journal_beats_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file_journal, env_journal = tmp_path / "from-file.db", tmp_path / "from-env.db"
    config = tmp_path / "config.toml"
    config.write_text(f'journal_path = "{file_journal}"\n')
    monkeypatch.setenv("ARCHUP_CONFIG", str(config))
    monkeypatch.setenv("ARCHUP_JOURNAL", str(env_journal))
    result = upload_in_process("list")
    assert result.exit_code == 0, result.stderr
    assert f"no journal at {env_journal} " in result.stderr  # list names the journal it looked for
    assert not env_journal.exists() and not file_journal.exists()  # and creates none


@pytest.mark.parametrize("key", ["journal", "journal_path"])
def test_config_file_supplies_endpoint_and_journal_when_environment_is_silent(
        cli, bucket: str, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    file_journal = tmp_path / "from-file.db"
    config = tmp_path / "config.toml"
    config.write_text(f'endpoint_url = "{cli.endpoint}"\n{key} = "{file_journal}"\n')
    monkeypatch.setenv("ARCHUP_CONFIG", str(config))
    result = upload_in_process("upload", "--bucket", bucket, "--json", str(source))
    assert result.exit_code == 0, result.stderr
    assert file_journal.exists()
    # And a flag beats both the environment and the file.
    flag_journal = tmp_path / "from-flag.db"
    monkeypatch.setenv("ARCHUP_JOURNAL", str(tmp_path / "from-env.db"))
    listed = upload_in_process("list", "--journal", str(flag_journal), "--json")
    assert listed.exit_code == 0, listed.stderr
    assert one_json_object(listed.stdout) == {"batches": []}  # the file's journal holds one batch
    assert not (tmp_path / "from-env.db").exists()


def test_environment_beats_the_config_file_for_bucket_prefix_and_parallel(
        cli, bucket: str, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'bucket = "archup-no-such-bucket-from-file"\nendpoint_url = "{cli.endpoint}"\n'
                      '[upload]\nprefix = "from-file/"\nparallel = 0\n')  # parallel 0 would be refused
    monkeypatch.setenv("ARCHUP_CONFIG", str(config))
    monkeypatch.setenv("ARCHUP_BUCKET", bucket)
    monkeypatch.setenv("ARCHUP_PREFIX", "from-env/")
    monkeypatch.setenv("ARCHUP_PARALLEL", "3")
    result = upload_in_process("upload", "--journal", str(cli.journal), "--json", str(source))
    assert result.exit_code == 0, result.stderr
    summary = one_json_object(result.stdout)
    assert summary["bucket"] == bucket and summary["prefix"].startswith("from-env/")


# -- 2. signatures never reach a log line ------------------------------------------------------------


def test_scrub_covers_botocore_sigv4_debug_lines() -> None:
    from archup.logs import scrub

    signature, token = "9f" * 32, "FwoGZXIvYXdzEBcaDUnregisteredToken"
    lines = [
        f"CanonicalRequest:\nPUT\n/b/k\n\nhost:127.0.0.1\nx-amz-security-token:{token}\n\nhost;x-amz-security-token",
        f"Signature:\n{signature}",
        f"'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIAUNREGISTERED/x, Signature={signature}'",
        f"https://b.example/k?X-Amz-Credential=AKIAUNREGISTERED%2Fx&X-Amz-Signature={signature}&X-Amz-Date=1",
        "https://b.example/k?AWSAccessKeyId=AKIAUNREGISTERED&Signature=dGhpcyBpcyBiYXNlNjQ%3D&Expires=1",
    ]
    for line in lines:
        scrubbed = scrub(line)
        assert signature not in scrubbed and token not in scrubbed and "AKIAUNREGISTERED" not in scrubbed
        assert "dGhpcyBpcyBiYXNlNjQ" not in scrubbed and "***" in scrubbed, scrubbed


@both_transports
def test_signatures_are_scrubbed_from_botocore_debug_output(cli, bucket: str, source: Path,
                                                           tmp_path: Path) -> None:
    log_file = tmp_path / "archup.log"
    # A multipart file too, so CreateMultipartUpload / UploadPart / Complete are signed and logged.
    (source / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    result = archup("-vvv", "--log-file", str(log_file), "upload", "--journal", str(cli.journal),
                    "--bucket", bucket, "--endpoint-url", cli.endpoint, "--part-size", "5MiB", "--json",
                    str(source))
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_file.read_text(encoding="utf-8")
    for where, text in (("stdout", result.stdout), ("stderr", result.stderr), ("log file", log)):
        leaked = SIGNATURE_IN_CLEAR.search(text)
        assert leaked is None, f"signature in {where}: {leaked.group(0)!r}"
    for text in (result.stderr, log):
        # botocore.auth's own lines were logged, and scrubbed (not merely absent).
        assert "StringToSign:" in text and "CanonicalRequest:" in text
        assert re.search(r"Signature:\s*\*\*\*", text), "botocore's 'Signature:' line was not scrubbed"


# -- 3. the log file without -v: errors and the outcome; --quiet wins over -v ------------------------


def test_log_file_without_v_gets_the_error_which_stderr_prints_once(cli, source: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "archup.log"
    result = archup("--log-file", str(log_file), "upload", "--journal", str(cli.journal),
                    "--bucket", "archup-no-such-bucket", "--endpoint-url", cli.endpoint, str(source))
    assert result.returncode == 5, result.stderr
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("archup: error: "), result.stderr
    message = lines[0].removeprefix("archup: error: ")
    assert "archup-no-such-bucket" in message
    log = log_file.read_text(encoding="utf-8")
    errors = [line for line in log.splitlines() if message in line]
    assert len(errors) == 1 and " ERROR " in errors[0] and "exit 5" in errors[0], log


def test_log_file_without_v_gets_each_file_and_the_outcome(cli, source: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "archup.log"
    result = archup("--log-file", str(log_file), "upload", "--journal", str(cli.journal),
                    "--bucket", cli.bucket, "--endpoint-url", cli.endpoint, str(source))
    assert result.returncode == 0, result.stderr
    assert " INFO " not in result.stderr  # stderr keeps its level: warnings only without -v
    log = log_file.read_text(encoding="utf-8")
    assert re.search(r" INFO archup\.upload: uploaded a\.txt ", log), log
    outcome = [line for line in log.splitlines() if "archup upload: done" in line]
    assert len(outcome) == 1 and "status=enqueued" in outcome[0] and "files_uploaded=2" in outcome[0], log


def test_quiet_means_errors_only_on_stderr_even_with_v(cli, source: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "archup.log"
    loud = archup("-v", "upload", "--journal", str(cli.journal), "--bucket", cli.bucket,
                  "--endpoint-url", cli.endpoint, "--new-batch", str(source))
    assert loud.returncode == 0, loud.stderr
    assert "uploaded a.txt" in loud.stderr  # -v alone does log on stderr
    quiet = archup("-v", "--log-file", str(log_file), "upload", "--journal", str(cli.journal), "--quiet",
                   "--bucket", cli.bucket, "--endpoint-url", cli.endpoint, "--new-batch", str(source))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and quiet.stdout == ""
    log = log_file.read_text(encoding="utf-8")
    assert "uploaded a.txt" in log and "archup upload: done" in log  # the log file still has it


# -- 4. --json: exactly one JSON object on stdout, whatever fails ------------------------------------

BAD_OPTION = {
    "upload": ["--parallel", "many", "DIR"],
    "status": ["--no-such-option", WELL_FORMED_UNKNOWN],
    "resume": ["--parallel", "many", WELL_FORMED_UNKNOWN],
    "finalize": [WELL_FORMED_UNKNOWN, "--endpoint-url"],  # an option without its value
    "verify": ["--parallel", "many", WELL_FORMED_UNKNOWN],
    "list": ["--status", "bogus"],
    "abort": ["--purge=yes", WELL_FORMED_UNKNOWN],
    "gc": ["--abort-orphans=maybe"],
    "version": ["--json=yes"],
    "restore": ["--parallel", "many", WELL_FORMED_UNKNOWN, "DIR"],
}

COMMAND_ARGS = {"upload": ["DIR"], "status": [WELL_FORMED_UNKNOWN], "resume": [WELL_FORMED_UNKNOWN],
                "finalize": [WELL_FORMED_UNKNOWN], "verify": [WELL_FORMED_UNKNOWN], "list": [],
                "abort": [WELL_FORMED_UNKNOWN], "gc": [], "version": [], "restore": [WELL_FORMED_UNKNOWN, "DIR"]}


def test_every_command_has_its_json_cases() -> None:
    import typer.main

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert set(BAD_OPTION) == commands == set(COMMAND_ARGS)


@pytest.mark.parametrize("command", sorted(BAD_OPTION))
def test_click_errors_still_print_one_json_object(cli, source: Path, command: str) -> None:
    args = [str(source) if arg == "DIR" else arg for arg in BAD_OPTION[command]]
    result = cli.subprocess(command, "--json", *args)
    assert result.exit_code == 2, result.stderr
    document = one_json_object(result.stdout)
    assert document["exit_code"] == 2 and document["error"], document
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.startswith("archup: error: ")  # a person gets the one line every error has


def test_missing_argument_prints_one_json_object(cli) -> None:
    result = cli.subprocess("status", "--json")
    assert result.exit_code == 2, result.stderr
    assert "BATCH" in one_json_object(result.stdout)["error"]


@pytest.mark.parametrize("group_args", [["--config", "/nonexistent/archup.toml"],
                                        ["--log-file", "/nonexistent/dir/archup.log"]])
def test_errors_before_the_command_print_one_json_object(tmp_path: Path, group_args: list[str]) -> None:
    result = archup(*group_args, "list", "--journal", str(tmp_path / "journal.db"), "--json")
    assert result.returncode == 2, result.stderr
    document = one_json_object(result.stdout)
    assert document["exit_code"] == 2 and "/nonexistent/" in document["error"]
    assert result.stderr.count("archup: error: ") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", sorted(COMMAND_ARGS))
def test_every_command_reports_a_config_error_and_does_nothing(source: Path, tmp_path: Path,
                                                               command: str) -> None:
    journal = tmp_path / "journal.db"
    args = [str(source) if arg == "DIR" else arg for arg in COMMAND_ARGS[command]]
    where = [] if command == "version" else ["--journal", str(journal)]  # version has no journal
    result = upload_in_process("--config", str(tmp_path / "absent.toml"), command, *where, "--json", *args)
    assert result.exit_code == 2, result.stderr
    assert "absent.toml does not exist" in one_json_object(result.stdout)["error"]
    assert not journal.exists()


def test_archup_errors_with_json_still_print_exactly_one_object(cli, tmp_path: Path) -> None:
    result = cli.subprocess("upload", "--json", str(tmp_path / "no-such-dir"))
    assert result.exit_code == 2, result.stderr
    assert one_json_object(result.stdout)["exit_code"] == 2


BOOM = """
import sys
import archup.journal

def boom(*args, **kwargs):
    raise RuntimeError("boom from the test")

archup.journal.SQLiteJournal.list_batches = boom
from archup.cli import main
sys.argv = ["archup", *sys.argv[1:]]
main()
"""


def test_unexpected_exception_is_exit_1_one_line_and_one_json_object(tmp_path: Path) -> None:
    journal = str(tmp_path / "journal.db")
    SQLiteJournal(journal).close()  # list reads an existing journal (a missing one it does not open)
    result = subprocess.run([sys.executable, "-c", BOOM, "list", "--journal", journal, "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    document = one_json_object(result.stdout)
    assert document["exit_code"] == 1 and "boom from the test" in document["error"]
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("archup: error: ") and "RuntimeError" in lines[0]

    # With -vv the traceback is in the log, for whoever debugs it.
    log_file = tmp_path / "archup.log"
    loud = subprocess.run([sys.executable, "-c", BOOM, "-vv", "--log-file", str(log_file), "list",
                           "--journal", journal], capture_output=True, text=True, timeout=60)
    assert loud.returncode == 1, loud.stderr
    assert "Traceback" in log_file.read_text(encoding="utf-8")


def test_help_and_exit_codes_still_go_through_main(cli, tmp_path: Path) -> None:
    for args in (["--help"], ["upload", "--help"]):
        result = archup(*args)
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout and result.stderr == ""
    bare = archup()  # no command: help on stderr, exit 2, as click does it
    assert bare.returncode == 2 and "Usage:" in bare.stderr and bare.stdout == ""
    unknown = archup("status", "--journal", str(tmp_path / "journal.db"), WELL_FORMED_UNKNOWN)
    assert unknown.returncode == 2 and unknown.stderr.startswith("archup: error: ")
