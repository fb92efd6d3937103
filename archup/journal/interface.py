"""The journal's operations: everything archup outside ``archup/journal/`` may ask of it.

A backend implements these and passes ``tests/test_journal.py`` (its ``journal``
fixture is parametrized over the backends). Each method that changes state is
one transaction: it reads what it checks and writes what it changes under the
backend's write lock, so concurrent workers never lose an update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Protocol

from ..errors import IllegalTransition
from ..states import BatchState, FileState, ShardState
from .records import (
    BATCH_TTL,
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
)


class Claims(Protocol):
    """What a journal that several hosts share offers for claims, leases and elections
    (:meth:`Journal.claims`; docs/design.md, "Several hosts, one batch")."""

    def register_worker(self, batch_id: str, worker_id: str, lease: float) -> None: ...
    def heartbeat(self, batch_id: str, worker_id: str, lease: float, files_done: int, bytes_done: int) -> int: ...
    def end_worker(self, batch_id: str, worker_id: str, files_done: int, bytes_done: int) -> None: ...
    def claim_scan(self, batch_id: str, worker_id: str, lease: float) -> bool: ...
    def reopen_chunks(self, batch_id: str) -> int: ...
    def claim_chunk(self, batch_id: str, worker_id: str, lease: float) -> Claim | None: ...
    def chunk_files(self, batch_id: str, chunk_no: int) -> list[FileRecord]: ...
    def finish_chunk(self, batch_id: str, chunk_no: int, worker_id: str) -> bool: ...
    def work_left(self, batch_id: str) -> WorkLeft: ...
    def claim_finalize(self, batch_id: str, worker_id: str, lease: float) -> bool: ...
    def release_finalize(self, batch_id: str, worker_id: str) -> None: ...
    def get_batch(self, batch_id: str) -> BatchRecord: ...
    def iter_files(self, batch_id: str, states: Iterable[FileState] | None = None,
                   page_size: int = 2000) -> Iterator[FileRecord]: ...


class Journal(Protocol):
    """The batch-state authority. Safe to share between threads; closed once they are done."""

    location: str  # where it is, as archup prints it (a path, or a URL without its password)
    # Seconds a group commit of completions waits for more after the first: a commit is a
    # transaction and an fsync (across the network, a round trip too) however small the group.
    commit_linger: float

    def claims(self) -> Claims | None:
        """The claims, leases and elections by which several processes and hosts work on one
        batch; None for a journal whose batches have one owner at a time (OS locks)."""
        ...

    def batch_lock(self, batch_id: str) -> AbstractContextManager[object]:
        """Held by whoever changes a batch; a second holder fails BatchBusy. A shared journal
        hands out no lock: its leases let any number of processes work on one batch."""
        ...

    def source_lock(self, source_root: str, bucket: str, prefix: str,
                    endpoint_url: str | None) -> AbstractContextManager[object]:
        """Held by a plain upload while it picks or creates its batch."""
        ...

    def close(self) -> None: ...

    # -- batches --
    def init_batch(self, batch_id: str, *, source_root: str, bucket: str, prefix: str,
                   part_size: int, endpoint_url: str | None = None, region: str | None = None,
                   ttl: timedelta = BATCH_TTL, settings: BatchSettings | None = None,
                   unless_unfinished: bool = False) -> BatchRecord:
        """Raises BatchExists for an id in use, or (``unless_unfinished``) when this source and
        destination have an unfinished batch: the check and the insert are one transaction."""
        ...

    def get_batch(self, batch_id: str) -> BatchRecord:
        """Raises BatchNotFound."""
        ...

    def find_batch(self, batch_id: str) -> BatchRecord | None: ...

    def list_batches(self, state: BatchState | None = None) -> list[BatchRecord]: ...

    def set_batch_settings(self, batch_id: str, settings: BatchSettings) -> None:
        """Record the settings of a batch that has none; recorded ones never change."""
        ...

    def set_batch_state(self, batch_id: str, target: BatchState, *, error: str | None = None,
                        manifest_key: str | None = None, finalized_at: str | None = None) -> BatchRecord:
        """Raises IllegalTransition for a move the batch state machine forbids."""
        ...

    def mark_scan_complete(self, batch_id: str, files_archived: int = 0) -> None: ...

    def delete_batch(self, batch_id: str) -> None: ...

    # -- files --
    @staticmethod
    def encode_files(new_files: Iterable[NewFile]) -> EncodedFiles: ...

    def add_file(self, batch_id: str, new_file: NewFile) -> None: ...

    def add_files(self, batch_id: str, new_files: Iterable[NewFile] | EncodedFiles, *,
                  durable: bool = True, seen_archived: Sequence[str] = ()) -> int:
        """Returns how many were new; ``durable=False`` may defer the commit's sync to the next durable one.
        ``seen_archived``: paths the walk found archived unchanged, marked seen by this batch."""
        ...

    def count_skipped(self, batch_id: str, reasons: Iterable[str]) -> int: ...

    # -- the archived index: the latest archived version of each path, per destination --
    def find_archived(self, destination: Destination, candidates: Sequence[tuple[str, int, int]]) -> set[str]:
        """The rel_paths of these (rel_path, size, mtime_ns) whose latest archived version is the same."""
        ...

    def iter_archived(self, destination: Destination, page_size: int = 2000) -> Iterator[ArchivedFile]: ...

    def seal_batch(self, batch_id: str, *, manifest_key: str, finalized_at: str,
                   covers: Callable[[str], bool] | None = None, summary_sha256: str | None = None) -> BatchRecord:
        """-> enqueued with the archived index updated (uploaded files in, paths not found
        out), one transaction. ``covers``: the paths the batch's selection takes (None: all).
        ``summary_sha256``: the SHA-256 (hex) of the sealed manifest.json, recorded in the same
        transaction, so a summary re-sealed in the bucket later no longer matches the journal."""
        ...

    # -- forgetting --
    def forget_batch(self, batch_id: str) -> bool:
        """Forget a terminal batch's file and part rows (its counts kept); False if not terminal
        or forgotten already. An unfinalized batch is never forgotten."""
        ...

    def size_on_disk(self) -> int: ...

    def compact(self) -> None:
        """Give freed space back (the write lock held meanwhile)."""
        ...

    def get_file(self, batch_id: str, rel_path: str) -> FileRecord: ...

    def start_file(self, batch_id: str, rel_path: str) -> None: ...

    def record_upload_id(self, batch_id: str, rel_path: str, upload_id: str, part_size: int,
                         sha256: str | None = None, checksum_kind: str | None = None) -> None: ...

    def record_part(self, batch_id: str, rel_path: str, part: PartRecord) -> None: ...

    def upload_ids(self, batch_id: str) -> set[str]: ...

    def list_parts(self, batch_id: str, rel_path: str) -> list[PartRecord]: ...

    def complete_file(self, batch_id: str, rel_path: str, *, sha256: str, etag: str) -> None: ...

    def complete_files(self, batch_id: str, completions: list[tuple[str, str, str]]) -> list[tuple[str, IllegalTransition]]:
        """(rel_path, sha256, etag) -> uploaded in one transaction; returns the refused ones."""
        ...

    def fail_file(self, batch_id: str, rel_path: str, error: str) -> None: ...

    def skip_file(self, batch_id: str, rel_path: str, reason: str) -> None:
        """-> skipped with its reason, forgetting any upload: the file cannot be read, for good."""
        ...

    def reset_file(self, batch_id: str, rel_path: str, reason: str) -> None: ...

    def refresh_file(self, batch_id: str, rel_path: str, size: int, mtime_ns: int,
                     identity: str | None = None) -> FileRecord: ...

    def iter_files(self, batch_id: str, states: Iterable[FileState] | None = None,
                   page_size: int = 2000, *, packed: bool | None = None) -> Iterator[FileRecord]:
        """In key order; ``packed``: only files in shards (True) or only those of their own (False)."""
        ...

    def get_state(self, batch_id: str, problem_limit: int = 20) -> BatchSummary: ...

    # -- packed shards (docs/design.md, "Packed shards") --
    def plan_shard(self, batch_id: str, members: Sequence[tuple[str, int]], size: int) -> ShardRecord:
        """A new shard (the next number) of these (rel_path, data offset) members, in one
        transaction: each must be pending or failed and in no shard, and becomes uploading in
        it; else IllegalTransition and nothing is planned. ``size``: the whole tar's bytes."""
        ...

    def get_shard(self, batch_id: str, shard_no: int) -> ShardRecord: ...

    def iter_shards(self, batch_id: str, states: Iterable[ShardState] | None = None) -> Iterator[ShardRecord]:
        """The batch's shards in number order."""
        ...

    def shard_members(self, batch_id: str, shard_no: int) -> list[FileRecord]:
        """A shard's member files in offset order."""
        ...

    def record_shard_upload(self, batch_id: str, shard_no: int, upload_id: str, part_size: int,
                            checksum_kind: str | None) -> None: ...

    def record_shard_part(self, batch_id: str, shard_no: int, part: PartRecord) -> None: ...

    def list_shard_parts(self, batch_id: str, shard_no: int) -> list[PartRecord]: ...

    def complete_shard(self, batch_id: str, shard_no: int, *, sha256: str, etag: str,
                       digests: Sequence[tuple[str, str]]) -> None:
        """The shard stored: it and its members (rel_path, SHA-256) -> uploaded, one transaction;
        the digests must name exactly its members, else IllegalTransition."""
        ...

    def drop_shard(self, batch_id: str, shard_no: int, reason: str,
                   problems: Mapping[str, tuple[FileState, str]]) -> None:
        """Give a shard up (uploading, or uploaded and lost from the bucket): -> dropped, its members out of it; those in ``problems`` -> their
        state (failed or skipped) with their reason, the others -> pending for a new shard."""
        ...

    # -- several hosts (a shared journal; a single-owner one has no workers and no claims) --
    def list_workers(self, batch_id: str) -> list[WorkerRecord]:
        """The processes that joined the batch: host, pid, heartbeat, what each did."""
        ...

    def expire_claims(self, batch_id: str) -> int:
        """Free the claims whose lease ran out (their host died or lost the journal); how many."""
        ...

    def integrity_check(self) -> str:
        """"ok", or what the backend found damaged."""
        ...
