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


def resume_command(batch_id: str, journal_path: Path, profile: str | None = None) -> str:
    """The command that finishes a batch, runnable as printed: the journal records the
    source, the destination and the batch's options; where the journal is, and an AWS
    profile, it cannot."""
    words = ["archup", "resume", batch_id]
    if journal_path != default_journal_path(environ={}):
        words += ["--journal", str(journal_path)]
    if profile:
        words += ["--profile", profile]
    return shlex.join(words)
