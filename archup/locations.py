"""Where archup keeps its state on this host, and the command that finds it again."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path


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
