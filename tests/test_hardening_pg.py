"""Hardening, issue 29 item 9: the shared journal's password and login. A password in a
--journal URL on the command line is warned about (ps shows it); the password is masked in
every log line, psycopg_pool's included; a refused login is said at once (exit 5), not
retried for a minute and called unreachable."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from archup import logs
from archup.errors import JournalAuthenticationFailed
from archup.journal.pgdatabase import PgDatabase

PASSWORD = "s3cret-Journal-pw"


@pytest.fixture
def refusing_server() -> Iterator[int]:
    """A PostgreSQL server that refuses every login as a wrong password: its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                try:
                    while True:
                        length = struct.unpack("!I", conn.recv(4))[0]
                        code = struct.unpack("!I", conn.recv(length - 4)[:4])[0]
                        if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: not here
                            conn.sendall(b"N")
                            continue
                        fields = b'SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user "u"\0\0'
                        conn.sendall(b"E" + struct.pack("!I", len(fields) + 4) + fields)
                        break
                except (OSError, struct.error):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()


def test_a_refused_login_is_said_at_once_with_exit_5(refusing_server: int, tmp_path: Path) -> None:
    url = f"postgresql://u:{PASSWORD}@127.0.0.1:{refusing_server}/archup"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "archup", "list", "--journal", url], capture_output=True,
                            text=True, timeout=50, check=False, env={**os.environ, "PGCONNECT_TIMEOUT": "5"})
    assert result.returncode == 5, result.stderr
    assert time.monotonic() - started < 30  # not the minute of retries
    assert "authentication failed" in result.stderr and "unreachable" not in result.stderr, result.stderr
    assert "PGPASSWORD, ~/.pgpass or PGSERVICE" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout


def test_a_password_in_the_journal_url_on_the_command_line_is_warned_about(refusing_server: int) -> None:
    url = f"postgresql://u:{PASSWORD}@127.0.0.1:{refusing_server}/archup"
    on_line = subprocess.run([sys.executable, "-m", "archup", "list", "--journal", url], capture_output=True,
                             text=True, timeout=50, check=False)
    assert "the --journal URL carries a password, which other users of this host see in ps" in on_line.stderr
    assert PASSWORD not in on_line.stderr
    from_environment = subprocess.run([sys.executable, "-m", "archup", "list"], capture_output=True, text=True,
                                      timeout=50, check=False, env={**os.environ, "ARCHUP_JOURNAL": url})
    assert from_environment.returncode == 5, from_environment.stderr
    assert "see in ps" not in from_environment.stderr


def test_the_journal_password_is_masked_in_every_log_line(refusing_server: int, tmp_path: Path) -> None:
    log_file = tmp_path / "archup.log"
    logs.configure(0, log_file)
    with pytest.raises(JournalAuthenticationFailed):
        PgDatabase(f"postgresql://u:{PASSWORD}@127.0.0.1:{refusing_server}/archup", retry_for=1)
    # As psycopg_pool logs a connection failure: its logger, its own words.
    logging.getLogger("psycopg.pool").warning("error connecting in 'archup-journal': %s", f"password={PASSWORD}")
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = log_file.read_text()
    assert "error connecting" in text and PASSWORD not in text, text
