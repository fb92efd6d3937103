"""A batch's recorded endpoint never decides alone where requests go.

On a shared journal anyone who can write its rows could point a batch at a listener of
their own, and every host resuming or cleaning it would send there, signed with its own
credentials. A recorded endpoint other than this host's configuration is refused (exit 2,
naming both) unless --trust-recorded-endpoint confirms it.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from archup.cli import app
from archup.errors import ExitCode


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """Where whoever edits the row wants the requests: a socket that listens, never answers,
    and keeps any connection made to it (the kernel accepts into the backlog)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


def nobody_connected(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        connection, _ = sock.accept()
    except BlockingIOError:
        return True
    connection.close()
    return False


def redirect(journal: Path, batch_id: str, endpoint: str) -> None:
    """Edit the batch's row as someone with write access to the journal could."""
    with closing(sqlite3.connect(journal)) as conn:
        conn.execute("UPDATE batches SET endpoint_url = ? WHERE batch_id = ?", (endpoint, batch_id))
        conn.commit()


@pytest.fixture
def unfinalized(cli: Any, tmp_path: Path) -> tuple[str, Path]:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(3):
        (source / f"f{index}.txt").write_bytes(b"x" * (index + 1))
    uploaded = cli("upload", "--no-finalize", "--json", str(source))
    assert uploaded.exit_code == 0, uploaded.stderr
    return json.loads(uploaded.stdout)["batch_id"], source


def test_a_recorded_endpoint_other_than_this_hosts_is_refused_unless_trusted(
        cli: Any, unfinalized: tuple[str, Path], listener: socket.socket) -> None:
    batch_id, source = unfinalized
    elsewhere = "http://127.0.0.1:{}".format(listener.getsockname()[1])
    redirect(cli.journal, batch_id, elsewhere)

    for command in (("upload", "--batch", batch_id, str(source)), ("resume", batch_id), ("gc",),
                    ("finalize", batch_id), ("abort", batch_id), ("verify", batch_id)):
        refused = cli(*command)
        assert refused.exit_code == ExitCode.USAGE, (command, refused.stdout, refused.stderr)
        assert elsewhere in refused.stderr and cli.endpoint in refused.stderr, command
        assert "--trust-recorded-endpoint" in refused.stderr
    # No endpoint configured at all counts as AWS's, which the row's is not either.
    unconfigured = CliRunner().invoke(app, ["gc", "--journal", str(cli.journal)], catch_exceptions=False)
    assert unconfigured.exit_code == ExitCode.USAGE, unconfigured.stderr
    assert elsewhere in unconfigured.stderr and "AWS" in unconfigured.stderr
    assert nobody_connected(listener)
    assert json.loads(cli("status", batch_id, "--json").stdout)["status"] == "uploading"  # untouched

    # Confirmed: the batch is accepted, and its requests go to this host's endpoint.
    trusted = cli("upload", "--batch", batch_id, "--trust-recorded-endpoint", "--json", str(source))
    assert trusted.exit_code == 0, trusted.stderr
    assert json.loads(trusted.stdout)["status"] == "enqueued"
    assert cli("gc", "--trust-recorded-endpoint").exit_code == 0
    assert nobody_connected(listener)


def test_restore_refuses_a_recorded_endpoint_other_than_this_hosts(cli: Any, tmp_path: Path,
                                                                    listener: socket.socket) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_bytes(b"a")
    sealed = cli("upload", "--json", str(source))
    assert sealed.exit_code == 0, sealed.stderr
    batch_id = json.loads(sealed.stdout)["batch_id"]
    elsewhere = "http://127.0.0.1:{}".format(listener.getsockname()[1])
    redirect(cli.journal, batch_id, elsewhere)

    refused = cli("restore", batch_id, str(tmp_path / "out"))
    assert refused.exit_code == ExitCode.USAGE, refused.stderr
    assert elsewhere in refused.stderr and cli.endpoint in refused.stderr
    assert not (tmp_path / "out").exists() and nobody_connected(listener)

    trusted = cli("restore", batch_id, str(tmp_path / "out"), "--trust-recorded-endpoint")
    assert trusted.exit_code == 0, trusted.stderr
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"a"
