"""The journal's rule book, written once for every backend: what a row means and which
moves are legal, with the errors that say so. A backend (:mod:`.sqlite`, :mod:`.postgres`)
reads and locks the rows in its own SQL, then asks these rules; it never words an error
or maps a column itself. (River keeps its rules above its drivers the same way.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import BatchClosed, BatchExists, BatchNotFound, FileAlreadyUploaded, IllegalTransition
from ..states import BatchState, FileState, ShardState, batch_can_move, file_can_move
from .records import BatchRecord, BatchSettings, EncodedFiles, FileRecord, NewFile, ShardRecord, encode_files

# The columns of a batch and of a file row, in the order of their records' fields.
BATCH_FIELDS: tuple[str, ...] = (
    "batch_id", "state", "source_root", "bucket", "prefix", "endpoint_url", "region", "part_size",
    "scan_complete", "manifest_key", "error", "created_at", "updated_at", "expires_at", "finalized_at",
    "settings", "files_archived", "forgotten_at", "summary_sha256")
FILE_FIELDS: tuple[str, ...] = (
    "batch_id", "rel_path", "key", "size", "mtime_ns", "state", "part_size", "upload_id", "sha256", "etag",
    "error", "attempts", "updated_at", "identity", "checksum_kind", "shard_no", "shard_offset")
SHARD_FIELDS: tuple[str, ...] = (
    "batch_id", "shard_no", "key", "size", "members", "state", "upload_id", "part_size", "checksum_kind",
    "sha256", "etag", "error", "updated_at")
BATCH_COLUMNS = ", ".join(BATCH_FIELDS)
FILE_COLUMNS = ", ".join(FILE_FIELDS)
SHARD_COLUMNS = ", ".join(SHARD_FIELDS)


# -- what a row means ------------------------------------------------------------------

def batch_from_row(row: Mapping[str, Any]) -> BatchRecord:
    """A batch row (any mapping by column name: sqlite3.Row, a psycopg dict row) as its record."""
    values = {name: row[name] for name in BATCH_FIELDS}
    values["state"] = BatchState(values["state"])
    values["scan_complete"] = bool(values["scan_complete"])
    values["settings"] = BatchSettings.from_json(values["settings"])
    return BatchRecord(**values)


_STATE_AT = FILE_FIELDS.index("state")


def file_from_row(row: Mapping[str, Any]) -> FileRecord:
    """A file row: by name (a psycopg dict row), or by position (an sqlite3.Row of
    FILE_COLUMNS, whose order is the record's: a third of the cost, for a million rows)."""
    if isinstance(row, dict):
        values = {name: row[name] for name in FILE_FIELDS}
        values["state"] = FileState(values["state"])
        return FileRecord(**values)
    fields = tuple(row)  # type: ignore[arg-type]
    return FileRecord(*fields[:_STATE_AT], FileState(fields[_STATE_AT]), *fields[_STATE_AT + 1:])


def shard_from_row(row: Mapping[str, Any]) -> ShardRecord:
    values = {name: row[name] for name in SHARD_FIELDS}
    values["state"] = ShardState(values["state"])
    return ShardRecord(**values)


def members_not_plannable(batch_id: str, shard_no: int, wanted: int, moved: int) -> IllegalTransition:
    return IllegalTransition(f"batch {batch_id}: shard {shard_no} plans {wanted} member(s), but only {moved} "
                             "are pending or failed and in no shard; nothing was planned")


def shard_not_uploading(batch_id: str, shard_no: int, state: ShardState | None) -> IllegalTransition:
    return IllegalTransition(f"batch {batch_id}: shard {shard_no} is "
                             f"{'unknown' if state is None else state.value}; only an uploading shard can change")


def members_mismatch(batch_id: str, shard_no: int, expected: int, got: int) -> IllegalTransition:
    return IllegalTransition(f"batch {batch_id}: shard {shard_no} has {expected} member(s) uploading, "
                             f"and {got} were given; nothing was recorded")


# -- batches -----------------------------------------------------------------------------

def batch_not_found(batch_id: str, location: str, *, hint: bool = True) -> BatchNotFound:
    return BatchNotFound(f"no batch {batch_id} in journal {location}"
                         + ("; 'archup list' shows the batches" if hint else ""))


def batch_exists(batch_id: str, location: str) -> BatchExists:
    return BatchExists(f"batch {batch_id} exists already in journal {location}", batch_id)


def unfinished_exists(found: str, source_root: str) -> BatchExists:
    """A plain upload's new batch refused: ``found`` of the same source and destination is unfinished."""
    return BatchExists(f"batch {found} of {source_root} is unfinished", found)


def check_batch_move(batch_id: str, current: BatchState, target: BatchState) -> None:
    """Raises IllegalTransition for a move the batch state machine forbids."""
    if not batch_can_move(current, target):
        raise IllegalTransition(f"batch {batch_id} is {current.value}; it cannot become {target.value}")


def check_accepts_files(batch_id: str, state: BatchState) -> None:
    if not state.accepts_files:
        raise BatchClosed(f"batch {batch_id} is {state.value}; no file can be added to it")


# -- files -------------------------------------------------------------------------------

def check_file_move(batch_id: str, rel_path: str, current: FileState, target: FileState,
                    batch_state: BatchState) -> None:
    """Raises for a file move the file state machine forbids (FileAlreadyUploaded for a second
    completion), or for any move of a file of a terminal batch (BatchClosed)."""
    if current is FileState.UPLOADED and target is FileState.UPLOADED:
        raise FileAlreadyUploaded(batch_id, rel_path)
    if not file_can_move(current, target):
        raise IllegalTransition(
            f"batch {batch_id}: file {rel_path!r} is {current.value}; it cannot become {target.value}")
    check_files_open(batch_id, batch_state)


def check_files_open(batch_id: str, batch_state: BatchState) -> None:
    """A terminal batch's files never change again."""
    if batch_state.terminal:
        raise BatchClosed(f"batch {batch_id} is {batch_state.value}; its files can no longer change")


def check_uploading(batch_id: str, rel_path: str, current: FileState) -> None:
    """An upload id or a part is recorded only on a file being uploaded."""
    if current is not FileState.UPLOADING:
        raise IllegalTransition(f"batch {batch_id}: file {rel_path!r} is {current.value}, not uploading")


def check_rescannable(batch_id: str, rel_path: str, current: FileState, upload_id: str | None) -> None:
    """Only a pending or failed file with no upload under way takes a new size and mtime."""
    if current not in (FileState.PENDING, FileState.FAILED) or upload_id is not None:
        raise IllegalTransition(f"batch {batch_id}: file {rel_path!r} is {current.value}; "
                                "only a pending or failed file can be re-scanned")


def file_exists(batch_id: str, rel_path: str) -> IllegalTransition:
    return IllegalTransition(f"batch {batch_id} already has file {rel_path!r}")


class CommonOperations:
    """The operations every backend answers alike, from its own ``get_batch`` and ``add_files``."""

    def get_batch(self, batch_id: str) -> BatchRecord:
        raise NotImplementedError

    def add_files(self, batch_id: str, new_files: Iterable[NewFile] | EncodedFiles, *,
                  durable: bool = True, seen_archived: Sequence[str] = ()) -> int:
        raise NotImplementedError

    def find_batch(self, batch_id: str) -> BatchRecord | None:
        try:
            return self.get_batch(batch_id)
        except BatchNotFound:
            return None

    def add_file(self, batch_id: str, new_file: NewFile) -> None:
        """Add one file; an existing file of the same path is an error."""
        if self.add_files(batch_id, [new_file]) != 1:
            raise file_exists(batch_id, new_file.rel_path)

    @staticmethod
    def encode_files(new_files: Iterable[NewFile]) -> EncodedFiles:
        """See :func:`archup.journal.records.encode_files`."""
        return encode_files(new_files)
