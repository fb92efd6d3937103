"""The batch journal: the single authority on what a batch holds.

- :mod:`.records`: the frozen records the rest of archup reads;
- :mod:`.interface`: :class:`Journal`, the operations the rest of archup may call;
- :mod:`.database`: SQLite connections, transactions and migrations;
- :mod:`.sqlite`: :class:`SQLiteJournal`, the operations on SQLite (the embedded default).
"""

from __future__ import annotations

from .database import DEFAULT_BUSY_TIMEOUT, SCHEMA_VERSION
from .interface import Journal
from .records import (
    BATCH_TTL,
    ArchivedFile,
    BatchRecord,
    BatchSettings,
    BatchSummary,
    Destination,
    EncodedFiles,
    FileRecord,
    NewFile,
    PartRecord,
    encode_files,
)
from .sqlite import SQLiteJournal

__all__ = [
    "BATCH_TTL",
    "DEFAULT_BUSY_TIMEOUT",
    "SCHEMA_VERSION",
    "ArchivedFile",
    "BatchRecord",
    "BatchSettings",
    "BatchSummary",
    "Destination",
    "EncodedFiles",
    "FileRecord",
    "Journal",
    "NewFile",
    "PartRecord",
    "SQLiteJournal",
    "encode_files",
]
