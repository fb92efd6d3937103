"""Batch and file states, and the transitions between them.

The journal refuses any transition not listed here, so a finished file cannot
be completed twice and a finalized batch cannot grow.
"""

from __future__ import annotations

from enum import Enum


class BatchState(str, Enum):
    OPEN = "open"
    UPLOADING = "uploading"
    FINALIZING = "finalizing"
    ENQUEUED = "enqueued"
    FAILED = "failed"
    ABORTED = "aborted"
    EXPIRED = "expired"

    @property
    def accepts_files(self) -> bool:
        return self in (BatchState.OPEN, BatchState.UPLOADING, BatchState.FAILED)

    @property
    def terminal(self) -> bool:
        return self in (BatchState.ENQUEUED, BatchState.ABORTED, BatchState.EXPIRED)


class FileState(str, Enum):
    PENDING = "pending"
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    FAILED = "failed"
    SKIPPED = "skipped"


class ShardState(str, Enum):
    """A packed shard's life: planned with its members fixed (uploading), stored (uploaded),
    or given up (dropped: a member changed or could not be read; the others were re-planned)."""

    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    DROPPED = "dropped"


# A batch a plain upload of its source and destination resumes (unless it expired).
UNFINISHED = (BatchState.OPEN, BatchState.UPLOADING, BatchState.FAILED, BatchState.FINALIZING)

_BATCH_TRANSITIONS: dict[BatchState, frozenset[BatchState]] = {
    BatchState.OPEN: frozenset({BatchState.UPLOADING, BatchState.FINALIZING, BatchState.FAILED,
                                BatchState.ABORTED, BatchState.EXPIRED}),
    BatchState.UPLOADING: frozenset({BatchState.FINALIZING, BatchState.FAILED,
                                     BatchState.ABORTED, BatchState.EXPIRED}),
    # A failed run is resumable: the next run moves the batch back to uploading.
    BatchState.FAILED: frozenset({BatchState.UPLOADING, BatchState.FINALIZING,
                                  BatchState.ABORTED, BatchState.EXPIRED}),
    # Finalize can find a problem (an object missing on read-back) and hand the
    # batch back for another upload pass. A finalize that died and was never run
    # again expires like any unfinished batch; gc first checks that no manifest
    # was written, which would make the batch sealed in the bucket.
    BatchState.FINALIZING: frozenset({BatchState.ENQUEUED, BatchState.UPLOADING,
                                      BatchState.FAILED, BatchState.ABORTED, BatchState.EXPIRED}),
    BatchState.ENQUEUED: frozenset(),
    BatchState.ABORTED: frozenset(),
    BatchState.EXPIRED: frozenset(),
}

_FILE_TRANSITIONS: dict[FileState, frozenset[FileState]] = {
    # pending -> uploaded directly: a single PutObject has no intermediate state
    # worth a commit; a crash before it returns leaves the file pending and the
    # resumer sends it again (a PUT of the same bytes is idempotent).
    FileState.PENDING: frozenset({FileState.UPLOADING, FileState.UPLOADED,
                                  FileState.FAILED, FileState.SKIPPED}),
    # -> skipped: the file cannot be opened for good (permission denied, ...), archup.unreadable.
    FileState.UPLOADING: frozenset({FileState.UPLOADED, FileState.FAILED, FileState.PENDING, FileState.SKIPPED}),
    # failed -> failed: a retry that fails again records its newer reason.
    FileState.FAILED: frozenset({FileState.PENDING, FileState.UPLOADING, FileState.UPLOADED,
                                 FileState.FAILED, FileState.SKIPPED}),
    # Only finalize's read-back moves an uploaded file back, when its object is gone.
    FileState.UPLOADED: frozenset({FileState.PENDING}),
    FileState.SKIPPED: frozenset(),
}


def batch_can_move(current: BatchState, target: BatchState) -> bool:
    return current == target or target in _BATCH_TRANSITIONS[current]


def file_can_move(current: FileState, target: FileState) -> bool:
    return target in _FILE_TRANSITIONS[current]
