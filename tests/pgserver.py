"""A throwaway PostgreSQL server for the tests of the PostgreSQL journal.

Each pytest worker starts one of its own (``conftest.pg_server``) in a temporary directory, on a
free 127.0.0.1 port, and gives every test a fresh database (``conftest.pg_url``): a real server,
because the journal's guarantees are its transactions, locks and connection failures, which no
fake has. It trades durability for speed (``fsync=off`` and friends): a test may kill the
server, never the machine, so nothing it checks depends on the disk.

initdb and postgres refuse to run as root, and CI runs as root: then the data directory belongs
to the ``postgres`` user and every server program runs as that user.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPERUSER = "archup"
# Throwaway data: no fsync, no full-page images; they only protect against the machine's crash.
# synchronous_commit stays on: with it off, a commit is acknowledged before its WAL leaves
# PostgreSQL's memory, so crash() (a process crash) loses the last ones, and a durability test of
# the journal would fail or, worse, pass on luck; with fsync off it costs nothing measurable.
# max_connections leaves room for tests that open a pool per thread or per process;
# shared_buffers stays small because every xdist worker runs a server.
SERVER_SETTINGS: tuple[tuple[str, str], ...] = (
    ("fsync", "off"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "off"),
    ("max_connections", "300"),
    ("shared_buffers", "64MB"),
)
PG_CTL_WAIT_SECONDS = 60
SHUTDOWN_SECONDS = 30.0  # a fast shutdown of a test server takes well under a second
KILL_SECONDS = 10.0
PORT_ATTEMPTS = 5  # a free port can be taken by someone else between our probe and postgres's bind
_DEBIAN_BINDIRS = Path("/usr/lib/postgresql")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server programs are missing, or cannot run here (root without a postgres user)."""


class PostgresServerError(RuntimeError):
    """initdb or pg_ctl failed; the message carries their output and the server log's tail."""


def find_bindir() -> Path | None:
    """The directory of initdb and pg_ctl: on PATH, from ``pg_config --bindir``, or the newest of
    Debian's /usr/lib/postgresql/<version>/bin (Debian puts only the client programs on PATH)."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        # /usr/local/bin/initdb may be a symlink; pg_ctl and postgres live beside its target.
        candidates.append(Path(os.path.realpath(on_path)).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            answer = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            answer = None
        if answer is not None and answer.returncode == 0 and answer.stdout.strip():
            candidates.append(Path(answer.stdout.strip()))
    candidates += sorted(_DEBIAN_BINDIRS.glob("*/bin"), key=lambda path: _version_key(path.parent.name), reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / program, os.X_OK) for program in ("initdb", "pg_ctl")):
            return bindir
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


@dataclass(frozen=True)
class _RunAs:
    """Whom the server programs run as: ourselves, or (when we are root) the postgres user."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_this_process(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls()
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable(
                "running as root, and PostgreSQL refuses to: there is no 'postgres' user to run it as; "
                "run scripts/ensure-postgres.sh (creates one) or run the tests as another user"
            ) from None
        return cls(entry.pw_uid, entry.pw_gid)

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        # extra_groups=[]: drop root's supplementary groups too.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


class PostgresServer:
    """One PostgreSQL server in a temporary directory, reachable only on 127.0.0.1 with trust auth
    as the superuser ``archup``. ``start()`` it, ``create_database()`` per test, ``stop()`` at the end
    (stop is idempotent and also runs at interpreter exit, so a worker that dies leaves no server)."""

    def __init__(self, bindir: Path | None = None,
                 settings: tuple[tuple[str, str], ...] = SERVER_SETTINGS) -> None:
        """``settings``: the server's -c options (the tests' own by default; a benchmark passes
        durable ones)."""
        self.settings = settings
        found = bindir or find_bindir()
        if found is None:
            raise PostgresUnavailable(
                "PostgreSQL's server programs (initdb, pg_ctl) were not found on PATH, in `pg_config --bindir` "
                f"or in {_DEBIAN_BINDIRS}/*/bin; run scripts/ensure-postgres.sh (installs Debian's postgresql)"
            )
        self.bindir = found
        self._run_as = _RunAs.for_this_process()
        self._base: Path | None = None
        self._port: int | None = None

    # -- where it is --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the PostgreSQL server is not started")
        return self._port

    @property
    def base_dir(self) -> Path:
        """The temporary directory: ``data/`` (the cluster), the Unix socket and ``server.log``."""
        if self._base is None:
            raise RuntimeError("the PostgreSQL server is not started")
        return self._base

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (first line of postmaster.pid), or None when it is not running."""
        if self._base is None:
            return None
        return _read_postmaster_pid(self.data_dir)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        if self._base is not None:
            raise RuntimeError("the PostgreSQL server is already started")
        # Directly under the system temp dir, not pytest's tmp_path: the postgres user must be able
        # to reach it (pytest's is under a 0700 directory of root's), and the socket path must stay
        # under the 107 bytes a Unix socket address allows.
        self._base = Path(tempfile.mkdtemp(prefix="archup-pg-"))
        atexit.register(self.stop)
        try:
            if self._run_as.uid is not None:
                os.chown(self._base, self._run_as.uid, self._run_as.gid or -1)
            self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--no-sync",
                      "-E", "UTF8", "--locale=C")
            for attempt in range(1, PORT_ATTEMPTS + 1):
                self._port = _free_port()
                log_offset = self._log_size()
                try:
                    self._pg_ctl("start")
                    break
                except PostgresServerError:
                    if attempt == PORT_ATTEMPTS or "Address already in use" not in self._log_since(log_offset):
                        raise
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self) -> None:
        """A fast restart on the same port and data: sessions are cut, committed data stays.
        After crash(), a start, which runs crash recovery."""
        if self.pid is None:
            self._pg_ctl("start")
        else:
            self._pg_ctl("restart", "-m", "fast")

    def crash(self) -> None:
        """SIGKILL the postmaster and its backends, as a crash would: no shutdown, no checkpoint;
        restart() then recovers from the WAL. Returns when all of them are gone.

        Each backend is a process group of its own (PostgreSQL makes them so), hence the kill of
        the postmaster's children one by one rather than of a group. Then it removes the lock
        files (postmaster.pid, the socket's .lock), which a real crash leaves behind: where PID 1
        does not reap orphans (this machine's does not), the killed postmaster stays a zombie,
        and PostgreSQL takes a zombie's pid in a lock file for a live server and refuses to start."""
        pid = self.pid
        if pid is None:
            return
        # pidfds first: from then on no signal can reach a process that reused one of these pids.
        pidfds = [fd for fd in (_pidfd(member) for member in (pid, *_children(pid))) if fd is not None]
        try:
            for pidfd in pidfds:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + KILL_SECONDS
            for pidfd in pidfds:
                if not select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise PostgresServerError(f"a PostgreSQL process outlived SIGKILL by {KILL_SECONDS} s")
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.base_dir.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)

    def stop(self) -> None:
        """Fast shutdown (SIGINT) of the postmaster by its pid, SIGKILL if it is not gone in
        SHUTDOWN_SECONDS, then remove the whole directory. Safe to call twice."""
        base, self._base = self._base, None
        if base is None:
            return
        atexit.unregister(self.stop)
        try:
            pid = _read_postmaster_pid(base / "data")
            if pid is not None:
                _terminate(pid, base / "data")
        finally:
            shutil.rmtree(base, ignore_errors=True)
            self._port = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------------------

    def create_database(self) -> str:
        """A new, empty, uniquely named database; its URL. template0, so nothing a test left in
        template1 leaks into the next one."""
        import psycopg
        from psycopg import sql

        name = f"archup_{uuid.uuid4().hex[:16]}"
        # CREATE DATABASE cannot run inside a transaction block: autocommit.
        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url_or_name: str) -> None:
        """Drop a database, ending whatever sessions a test left open on it (WITH (FORCE))."""
        import psycopg
        from psycopg import sql

        name = url_or_name.rsplit("/", 1)[-1].split("?", 1)[0]
        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- helpers ------------------------------------------------------------------------------

    def _server_options(self) -> str:
        options = ["-c", "listen_addresses=127.0.0.1", "-k", str(self.base_dir), "-p", str(self.port)]
        for name, value in self.settings:
            options += ["-c", f"{name}={value}"]
        # pg_ctl hands -o to /bin/sh: quote.
        return " ".join(shlex.quote(option) for option in options)

    def _pg_ctl(self, command: str, *extra: str) -> None:
        # -l: the postmaster's output goes to a file. Without it the postmaster would inherit our
        # pipes and keep them open, and waiting for pg_ctl's output would wait for the server's end.
        self._run("pg_ctl", command, "-D", str(self.data_dir), "-w", "-t", str(PG_CTL_WAIT_SECONDS),
                  "-l", str(self.log_path), "-o", self._server_options(), *extra)

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bindir / program), *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  cwd=self.base_dir, env=_server_env(), timeout=PG_CTL_WAIT_SECONDS + 30,
                                  check=False, **self._run_as.popen_kwargs())
        except subprocess.TimeoutExpired as exc:
            raise PostgresServerError(f"{program} {args[0]} did not finish in {exc.timeout} s"
                                      f"{self._log_tail()}") from None
        if done.returncode != 0:
            raise PostgresServerError(f"{program} {' '.join(args[:1])} failed (exit {done.returncode}): "
                                      f"{(done.stderr or done.stdout).strip()}{self._log_tail()}")

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 20) -> str:
        tail = self._log_since(0).splitlines()[-lines:] if self._base is not None else []
        return ("\nserver log (last lines):\n" + "\n".join(tail)) if tail else ""


def _server_env() -> dict[str, str]:
    """Our environment without libpq's PG* variables (a developer's PGDATA or PGPORT must not steer
    pg_ctl), in the C locale the cluster is made with."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _read_postmaster_pid(data_dir: Path) -> int | None:
    try:
        first_line = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(first_line) if first_line.strip().isdigit() else None


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid: a postmaster's backends and auxiliary processes."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _terminate(pid: int, data_dir: Path) -> None:
    """SIGINT (PostgreSQL's fast shutdown) to the postmaster, then SIGKILL if it outlives
    SHUTDOWN_SECONDS. Through a pidfd, so a pid reused since postmaster.pid was written is never
    signalled, and so the wait ends when the process does (a poll, no sleep loop) even though the
    postmaster is not our child and, with no reaping init, may linger as a zombie."""
    if not hasattr(os, "pidfd_open"):  # not Linux
        _terminate_without_pidfd(pid)
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone (a stale postmaster.pid)
    try:
        if not _is_postmaster_of(pid, data_dir):
            return
        for signum, seconds in ((signal.SIGINT, SHUTDOWN_SECONDS), (signal.SIGKILL, KILL_SECONDS)):
            try:
                signal.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                return
            readable, _, _ = select.select([pidfd], [], [], seconds)
            if readable:
                return
        raise PostgresServerError(f"postmaster {pid} outlived SIGKILL by {KILL_SECONDS} s")
    finally:
        os.close(pidfd)


def _terminate_without_pidfd(pid: int) -> None:
    """Where there are no pidfds: the same signals by plain pid, and a bounded poll at short
    intervals for the process to go."""
    for signum, seconds in ((signal.SIGINT, SHUTDOWN_SECONDS), (signal.SIGKILL, KILL_SECONDS)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
    raise PostgresServerError(f"postmaster {pid} outlived SIGKILL by {KILL_SECONDS} s")


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """The postmaster works in its data directory (it chdirs there at start): compare /proc/<pid>/cwd
    with ours. Its command line will not do: after ``pg_ctl restart`` it carries no ``-D``."""
    try:
        cwd = os.stat(f"/proc/{pid}/cwd")
        ours = os.stat(data_dir)
    except FileNotFoundError:
        return False
    return (cwd.st_dev, cwd.st_ino) == (ours.st_dev, ours.st_ino)
