"""The batch journal: the single authority on what a batch holds.

- :mod:`.records`: the frozen records the rest of archup reads;
- :mod:`.interface`: :class:`Journal`, the operations the rest of archup may call;
- :mod:`.database`: SQLite connections, transactions and migrations;
- :mod:`.sqlite`: :class:`SQLiteJournal`, the operations on SQLite (the embedded default);
- :mod:`.pgdatabase` and :mod:`.postgres`: :class:`PostgresJournal`, the journal that several
  hosts share (loaded only for a ``postgresql://`` location: psycopg is not light).
"""

from __future__ import annotations

import os

from .database import DEFAULT_BUSY_TIMEOUT, SCHEMA_VERSION
from .interface import Claims, Journal
from .records import (
    BATCH_TTL,
    DEFAULT_LEASE,
    ArchivedFile,
    BatchRecord,
    BatchSettings,
    BatchSummary,
    Claim,
    Destination,
    EncodedFiles,
    FileRecord,
    NewFile,
    PartRecord,
    ShardRecord,
    WorkerRecord,
    WorkLeft,
    encode_files,
    shard_key,
)
from .sqlite import SQLiteJournal


def is_shared_location(location: str | os.PathLike[str]) -> bool:
    """A ``postgresql://`` (or ``postgres://``) URL, rather than a journal file's path."""
    return os.fspath(location).startswith(("postgresql://", "postgres://"))


def open_journal_at(location: str | os.PathLike[str]) -> Journal:
    """The journal at a path (SQLite) or a ``postgresql://`` URL (PostgreSQL)."""
    if is_shared_location(location):
        from .postgres import PostgresJournal

        return PostgresJournal(os.fspath(location))
    return SQLiteJournal(location)

__all__ = [
    "BATCH_TTL",
    "DEFAULT_LEASE",
    "DEFAULT_BUSY_TIMEOUT",
    "SCHEMA_VERSION",
    "ArchivedFile",
    "BatchRecord",
    "BatchSettings",
    "BatchSummary",
    "Claim",
    "Claims",
    "Destination",
    "EncodedFiles",
    "FileRecord",
    "Journal",
    "NewFile",
    "PartRecord",
    "SQLiteJournal",
    "ShardRecord",
    "WorkLeft",
    "WorkerRecord",
    "encode_files",
    "is_shared_location",
    "shard_key",
    "open_journal_at",
]
