"""Shared fixtures: a moto S3 server over HTTP on 127.0.0.1, fresh buckets, the CLI, and a
PostgreSQL server with a fresh database per test."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from typer.testing import CliRunner

from archup.cli import app
from archup.store import DEFAULT_TRANSPORT, TransportKind

if TYPE_CHECKING:
    from faultstore import Faults
    from pgserver import PostgresServer

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# The integration tests' S3 server. moto (the default) starts in each pytest process. With
# ARCHUP_TEST_S3=localstack they talk to the LocalStack S3 at ARCHUP_TEST_ENDPOINT instead
# (scripts/localstack.sh starts one), which checks what S3 checks: request checksums,
# Content-MD5, the full-object CRC64NVME and the size at completion. Only the tests marked
# `localstack` are meant for it (.ci/run: -m localstack); the others may rely on moto's ways.
# Read now, as aws_env clears ARCHUP_* for each test.
TEST_S3 = os.environ.get("ARCHUP_TEST_S3", "moto")
TEST_ENDPOINT = os.environ.get("ARCHUP_TEST_ENDPOINT", "")
if TEST_S3 not in ("moto", "localstack"):
    raise pytest.UsageError(f"ARCHUP_TEST_S3={TEST_S3!r}: moto or localstack")
if TEST_S3 == "localstack" and not TEST_ENDPOINT.startswith("http"):
    raise pytest.UsageError("ARCHUP_TEST_S3=localstack needs ARCHUP_TEST_ENDPOINT=http://127.0.0.1:PORT "
                            "(scripts/localstack.sh start DIR prints it)")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """The test S3 server, spoken to over real HTTP through the boto3 stack: a moto server in
    server mode, or the LocalStack that ARCHUP_TEST_S3=localstack names (the fixture keeps its
    name: every integration test asks for it)."""
    if TEST_S3 == "localstack":
        yield TEST_ENDPOINT.rstrip("/")
        return
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def quiet_server_logs() -> Iterator[None]:
    """The in-process moto server logs each request; keep that out of the CLI's captured stderr,
    and give back whatever handlers a CLI run installed on the root logger."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# What sends the source files' PutObject in this run (--transport): the default, or what
# ARCHUP_TEST_TRANSPORT says (CI runs the whole suite once more on the other transport).
TEST_TRANSPORT = os.environ.get("ARCHUP_TEST_TRANSPORT", DEFAULT_TRANSPORT.value)
TRANSPORTS = [kind.value for kind in TransportKind]
# For the tests of behaviour that each transport must keep (retries, slow-down, timeouts,
# faults, credential errors, crash points, scrubbing): run them on both in every run.
both_transports = pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `transport` every test whose archup runs send files to a server on this run's
    transport (ARCHUP_TEST_TRANSPORT): it reaches the S3 server, and is not parametrized over
    the transport itself (those run on both in every run). The second CI pass, on the other
    transport, runs only these."""
    for item in items:
        if "moto_endpoint" not in getattr(item, "fixturenames", ()):
            continue
        pinned = any("transport" in _argnames(mark) for mark in item.iter_markers("parametrize"))
        if not pinned:
            item.add_marker(pytest.mark.transport)


def _argnames(mark: pytest.Mark) -> list[str]:
    names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
    if isinstance(names, str):
        return [name.strip() for name in names.split(",")]
    return list(names)


@pytest.fixture
def transport(request: pytest.FixtureRequest) -> str:
    """The transport of this test's archup runs: ARCHUP_TRANSPORT in their environment."""
    return str(getattr(request, "param", TEST_TRANSPORT))


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, transport: str) -> None:
    """No test ever sees the developer's real credentials, config or journal."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "ARCHUP_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ARCHUP_TRANSPORT", transport)
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def s3(moto_endpoint: str):  # type: ignore[no-untyped-def]
    """A separate boto3 client, for checking what really landed in the bucket."""
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3) -> str:  # type: ignore[no-untyped-def]
    name = f"archup-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def store_faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    """Faults for every store the CLI's commands open in this process (tests/faultstore.py):
    each store archup.run opens is wrapped in a FaultStore following this script. The one
    place a test reaches inside archup for its stores: run.py opens them itself."""
    from faultstore import Faults

    import archup.run

    faults = Faults()
    real_open_store = archup.run.open_store
    monkeypatch.setattr(archup.run, "open_store", lambda config: faults.wrap(real_open_store(config)))
    return faults


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "journal" / "journal.db"


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


class Cli:
    """Runs archup in-process (fast) or as a real subprocess (exit codes, tracebacks, signals)."""

    def __init__(self, endpoint: str, bucket: str, journal: Path) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.journal = journal

    # The commands that reach a recorded batch's bucket: this host is configured for its endpoint
    # (a journal row alone never names where requests go: archup.run.endpoint_for).
    TO_RECORDED_BATCH = ("resume", "finalize", "abort", "gc", "verify", "restore")

    def common(self, command: str) -> list[str]:
        args = ["--journal", str(self.journal)]
        if command in ("upload",):
            args += ["--bucket", self.bucket, "--endpoint-url", self.endpoint]
        elif command in self.TO_RECORDED_BATCH:
            args += ["--endpoint-url", self.endpoint]
        return args

    def __call__(self, *args: str) -> CliResult:
        full = [args[0], *self.common(args[0]), *args[1:]]
        result = CliRunner().invoke(app, full, catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    def subprocess(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
        full = [sys.executable, "-m", "archup", args[0], *self.common(args[0]), *args[1:]]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(moto_endpoint: str, bucket: str, journal_path: Path) -> Cli:
    return Cli(moto_endpoint, bucket, journal_path)


# ARCHUP_TEST_POSTGRES=skip: where PostgreSQL cannot be found, skip the tests that need it.
# Otherwise they fail: a machine without it must not pass them by skipping. Read now, as aws_env
# clears ARCHUP_* for each test.
POSTGRES_MISSING_SKIPS = os.environ.get("ARCHUP_TEST_POSTGRES", "") == "skip"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this pytest process's own (one per xdist worker): started when the
    first test that needs one runs, stopped at the end of the session. tests/pgserver.py."""
    from pgserver import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        missing = str(exc)  # skip or fail outside the except: no "during handling" chain in the report
    else:
        missing = ""
    if missing:
        if POSTGRES_MISSING_SKIPS:
            pytest.skip(f"ARCHUP_TEST_POSTGRES=skip: {missing}")
        pytest.fail(f"{missing} (or set ARCHUP_TEST_POSTGRES=skip to skip the PostgreSQL tests)", pytrace=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on pg_server: its postgresql:// URL (superuser archup, trust auth).
    Dropped afterwards, with any session the test left open on it."""
    if pg_server.pid is None:  # an earlier test crash()ed the server and left it down
        pg_server.restart()
    url = pg_server.create_database()
    yield url
    if pg_server.pid is not None:
        pg_server.drop_database(url)
