"""The test infrastructure of the PostgreSQL journal: the throwaway server (tests/pgserver.py), its
fixtures (pg_server, pg_url) and the partition proxy (tests/tcpproxy.py). The journal's own tests
build on these, so they must do what they say: a server that really stops, databases that really
are separate, a cut that really holds bytes back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from pgserver import PostgresServer
from tcpproxy import TcpProxy

T = TypeVar("T")

HELD = 0.5  # how long a held query must stay unanswered for the test to call it held
ANSWER = 10.0  # the bound for anything that should happen now


class InThread(Generic[T]):
    """Runs a call in a daemon thread; ``done`` is set when it returned or raised."""

    def __init__(self, call: Callable[[], T]) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self._call = call
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as exc:  # handed to the test, which asserts on it
            self.error = exc
        finally:
            self.done.set()


def through(proxy: TcpProxy, url: str) -> str:
    """The same database URL, but to the proxy's port."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    netloc = f"{parts.username}@{parts.hostname}:{proxy.port}" if parts.username else f"{parts.hostname}:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def proxy(pg_server: PostgresServer) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", pg_server.port) as started:
        yield started


def _postmaster_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (the postmaster is not our child, and PID 1 here may
    not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_server_answers_select_1(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_user").fetchone() == ("archup",)


def test_each_database_is_fresh_and_separate(pg_server: PostgresServer, pg_url: str) -> None:
    other = pg_server.create_database()
    try:
        assert other != pg_url
        with psycopg.connect(pg_url) as conn:
            conn.execute("CREATE TABLE marker (id int)")
        with psycopg.connect(other) as conn:
            tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'marker'").fetchone()
        assert tables == (0,)
    finally:
        pg_server.drop_database(other)
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert pg_url.rsplit("/", 1)[1] in names
    assert other.rsplit("/", 1)[1] not in names


def test_restart_keeps_data_and_port(pg_server: PostgresServer, pg_url: str) -> None:
    port, pid = pg_server.port, pg_server.pid
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE kept (id int)")
        conn.execute("INSERT INTO kept VALUES (1), (2)")
    before = psycopg.connect(pg_url)
    try:
        pg_server.restart()
        # A fast restart ends every session: the old connection is dead.
        with pytest.raises(psycopg.OperationalError):
            before.execute("SELECT 1")
    finally:
        before.close()
    assert pg_server.port == port
    assert pg_server.pid not in (None, pid)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (2,)


def test_crash_then_restart_recovers_committed_data(pg_server: PostgresServer, pg_url: str) -> None:
    port = pg_server.port
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE kept (id int)")
        conn.execute("INSERT INTO kept VALUES (1)")
    held = psycopg.connect(pg_url)
    try:
        pid = pg_server.pid
        assert pid is not None
        pg_server.crash()
        assert _postmaster_gone(pid)
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
    finally:
        held.close()
    pg_server.restart()
    assert pg_server.port == port
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1,)


def test_stop_ends_the_postmaster_and_removes_its_directory() -> None:
    server = PostgresServer().start()
    base, pid = server.base_dir, server.pid
    assert pid is not None and base.is_dir()
    with psycopg.connect(server.create_database()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        server.stop()
        assert _postmaster_gone(pid)
        assert not base.exists()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    server.stop()  # idempotent
    assert server.pid is None


def test_proxy_forwards_both_ways(proxy: TcpProxy, pg_url: str) -> None:
    payload = "x" * 3_000_000  # more than the proxy's per-direction buffer, both ways
    with psycopg.connect(through(proxy, pg_url)) as conn:
        assert conn.execute("SELECT length(%s::text)", (payload,)).fetchone() == (len(payload),)
        assert conn.execute("SELECT repeat('y', 3000000)").fetchone() == ("y" * 3_000_000,)


def test_cut_holds_a_query_and_heal_delivers_it(proxy: TcpProxy, pg_url: str) -> None:
    with psycopg.connect(through(proxy, pg_url), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.cut()
        try:
            query = InThread(lambda: conn.execute("SELECT 42").fetchone())
            assert not query.done.wait(HELD), "a query went through a cut proxy"
        finally:
            proxy.heal()
        # Bytes held during the cut are delivered after it, in order: the query completes.
        assert query.done.wait(ANSWER)
        assert query.error is None and query.result == (42,)


def test_cut_times_out_a_new_connection_and_heal_lets_a_new_one_work(proxy: TcpProxy, pg_url: str) -> None:
    url = through(proxy, pg_url)
    proxy.cut()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        # libpq's (and psycopg's) smallest connect_timeout is 2 s.
        psycopg.connect(url, connect_timeout=2)
    assert time.monotonic() - started < ANSWER
    proxy.heal()
    with psycopg.connect(url, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reset_all_ends_a_query_held_by_a_cut(proxy: TcpProxy, pg_url: str) -> None:
    with psycopg.connect(through(proxy, pg_url), autocommit=True) as conn:
        conn.execute("SELECT 1")
        proxy.cut()
        query = InThread(lambda: conn.execute("SELECT 1").fetchone())
        assert not query.done.wait(HELD)
        proxy.reset_all()
        assert query.done.wait(ANSWER)
        assert isinstance(query.error, psycopg.OperationalError)
    assert proxy.connection_count == 0
    proxy.heal()
    with psycopg.connect(through(proxy, pg_url)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_proxy_close_stops_its_threads(pg_server: PostgresServer) -> None:
    proxy = TcpProxy("127.0.0.1", pg_server.port).start()
    port = proxy.port
    conn = psycopg.connect(pg_server.url(), port=port)
    try:
        proxy.close()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    assert proxy.connection_count == 0
    assert not [thread for thread in threading.enumerate() if thread.name.startswith(f"tcpproxy-{port}")]
