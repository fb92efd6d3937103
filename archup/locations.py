"""Where archup keeps its state on this host, and the command that finds it again."""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Mapping
from pathlib import Path

from .errors import UnsafeJournalPath


def default_journal_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$ARCHUP_JOURNAL``, else ``$XDG_STATE_HOME/archup/journal.db`` (``environ``: os.environ)."""
    environ = os.environ if environ is None else environ
    explicit = environ.get("ARCHUP_JOURNAL")
    if explicit:
        return Path(explicit).expanduser()
    state_home = environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state_home) / "archup" / "journal.db"


def journal_location(explicit: str | os.PathLike[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> str:
    """--journal, else ``$ARCHUP_JOURNAL``, else the default file: a path, or a ``postgresql://`` URL
    (kept as written: a URL is not a path, and ``Path`` would fold its ``//``)."""
    environ = os.environ if environ is None else environ
    given = os.fspath(explicit) if explicit else environ.get("ARCHUP_JOURNAL")
    if given and given.startswith(("postgresql://", "postgres://")):
        return given
    return str(Path(given).expanduser()) if given else str(default_journal_path(environ))


def resume_command(batch_id: str, journal_location: str, profile: str | None = None,
                   endpoint_url: str | None = None, *, trust_recorded_endpoint: bool = False) -> str:
    """The command that finishes a batch, runnable as printed: the journal records the
    source, the destination and the batch's options; where the journal is, an AWS
    profile, and the endpoint (a recorded one alone is never used: this run's is named,
    with ``trust_recorded_endpoint`` if it is not the recorded one), it cannot. A shared
    journal's URL is printed without its password (libpq finds it in PGPASSWORD or
    ~/.pgpass), so the command works from any host."""
    words = ["archup", "resume", batch_id]
    if journal_location != str(default_journal_path(environ={})):
        words += ["--journal", journal_location]
    if profile:
        words += ["--profile", profile]
    if endpoint_url:
        words += ["--endpoint-url", endpoint_url]
    if trust_recorded_endpoint:
        words += ["--trust-recorded-endpoint"]
    return shlex.join(words)


def check_private(path: str | os.PathLike[str], what: str) -> None:
    """Refuse a journal file or directory (or its locks/) that another user could have planted
    or could change: a symlink, one owned by someone else, or one writable by group or others.

    Whoever can write there can swap the journal, or plant a symlink where archup writes a
    lock, and have this user (root, say) overwrite a file of its choosing. A path that does
    not exist yet is fine: archup creates it private (0700, 0600)."""
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there yet (or a file on the way: opening the journal says so)
    except OSError as error:
        raise UnsafeJournalPath(f"cannot check {what} {path}: {error.strerror or error}") from None
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeJournalPath(f"{what} {path} is a symlink; archup does not follow one there: "
                                "give the real path")
    if info.st_uid != os.geteuid():
        raise UnsafeJournalPath(f"{what} {path} belongs to uid {info.st_uid}, not to this user "
                                f"(uid {os.geteuid()}); use a journal directory of your own")
    if info.st_mode & 0o022:
        raise UnsafeJournalPath(f"{what} {path} is writable by group or others "
                                f"(mode {stat.S_IMODE(info.st_mode):04o}); "
                                f"run 'chmod go-w {shlex.quote(os.fspath(path))}' or use a directory of your own")


JOURNAL_COMPANIONS = ("-wal", "-shm")


def check_journal_path(journal_path: str | os.PathLike[str]) -> None:
    """The checks of :func:`check_private` on an SQLite journal's directory, its file (and
    SQLite's -wal and -shm files beside it) and its locks/ directory."""
    path = Path(journal_path)
    check_private(path.parent, "journal directory")
    check_private(path.parent / "locks", "lock directory")
    check_private(path, "journal")
    for suffix in JOURNAL_COMPANIONS:
        check_private(f"{path}{suffix}", "journal file")
