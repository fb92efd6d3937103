"""Batch lifecycle beyond uploading: find one to resume, abort, expire, find orphans."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from . import manifest
from .clock import isoformat, utcnow
from .errors import ArchupError, BatchBusy, BatchClosed, DestinationError, TransferError
from .journal import BatchRecord, Journal
from .reconcile import abort_uploads
from .states import UNFINISHED, BatchState
from .store import ChecksumMode, ObjectStore

log = logging.getLogger("archup.batches")

StoreFactory = Callable[[BatchRecord], ObjectStore]

_RESUMABLE = UNFINISHED


def find_resumable(journal: Journal, source_root: str, bucket: str, prefix: str,
                   endpoint_url: str | None) -> BatchRecord | None:
    """The newest unfinished, unexpired batch of this source to this destination, if any."""
    now = isoformat(utcnow())
    candidates = [batch for batch in journal.list_batches()
                  if batch.state in _RESUMABLE and batch.source_root == source_root
                  and batch.bucket == bucket and batch.prefix == prefix
                  and batch.endpoint_url == endpoint_url and batch.expires_at > now]
    # ULIDs sort by creation time.
    return max(candidates, key=lambda batch: batch.batch_id, default=None)


MARKER_NAME = "batch.json"


def write_marker(store: ObjectStore, batch: BatchRecord) -> str:
    """Preflight and record in one: write ``<batch prefix>batch.json`` before any file is read.

    It proves the credentials, the bucket, write permission and the checksum
    mode all work (exit 5 otherwise), and marks the batch in the bucket. Its
    content depends only on the journal, so a resumed run writes the same bytes.
    """
    key = f"{batch.batch_prefix}{MARKER_NAME}"
    body = json.dumps({"format": "archup-batch", "batch_id": batch.batch_id, "created_at": batch.created_at,
                       "source_root": batch.source_root}, ensure_ascii=False, sort_keys=True).encode("utf-8")
    try:
        store.put_object(key, body, metadata={"archup-batch": batch.batch_id}, content_type="application/json")
    except TransferError as error:
        hint = "" if store.checksum_mode is ChecksumMode.NONE else (
            "; if this endpoint rejects checksum headers, try --checksum md5 or --checksum none")
        raise DestinationError(f"preflight: cannot write s3://{store.bucket}/{key}: {error}{hint}") from None
    return key


@dataclass
class AbortReport:
    batch_id: str
    state: str
    uploads_aborted: int = 0
    objects_deleted: int = 0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def sealed_manifest(store: ObjectStore, batch: BatchRecord) -> str | None:
    """The key of the batch's manifest.json if it is in the bucket: the batch is sealed there,
    whatever the journal says (a finalize that died between the PUT and its commit)."""
    key = manifest.summary_key(batch)
    return key if store.head(key) is not None else None


def abort_batch(journal: Journal, store_for: StoreFactory, batch_id: str, *, purge: bool = False) -> AbortReport:
    """Abort a batch's multipart uploads and mark it aborted; with purge, delete its staged objects too.

    A batch sealed in the bucket (its manifest.json written) is refused like a finalized
    one, whatever state the journal records: abort never destroys an archived batch.
    """
    with journal.batch_lock(batch_id):
        # Read under the lock: a finalize that ended just before it was taken has sealed the batch.
        batch = journal.get_batch(batch_id)
        store = store_for(batch)
        if batch.state is BatchState.ENQUEUED:
            raise BatchClosed(f"batch {batch_id} is finalized (enqueued); archup will not abort an archived batch")
        sealed = sealed_manifest(store, batch)
        if sealed is not None:
            next_step = (f"run 'archup finalize {batch_id}' to record the seal in the journal"
                         if not batch.state.terminal else "delete the manifest yourself first if you mean it")
            raise BatchClosed(
                f"batch {batch_id} is sealed: s3://{store.bucket}/{sealed} exists although the journal says "
                f"{batch.state.value}; archup will not abort a finalized batch; {next_step}")
        report = AbortReport(batch_id, batch.state.value)
        report.uploads_aborted = abort_uploads(journal, store, batch, "multipart upload aborted by 'archup abort'")
        if purge:
            report.objects_deleted = store.delete_prefix(batch.batch_prefix)
        if batch.state is not BatchState.ABORTED:
            report.state = journal.set_batch_state(batch_id, BatchState.ABORTED, error="aborted by the user").state.value
        return report


@dataclass
class GcReport:
    expired: list[AbortReport] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    # Stale batches left alone because their manifest.json is in the bucket: sealed there,
    # only the journal's commit is missing; 'archup finalize' records it.
    sealed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    orphan_uploads: list[dict[str, str]] = field(default_factory=list)
    orphans_aborted: int = 0
    # Orphans not aborted although asked: their batch is too young (or of no age archup can
    # read), so another host's run, with a journal of its own, may be sending them now.
    orphans_kept: list[dict[str, str]] = field(default_factory=list)
    # Terminal batches whose file and part rows were forgotten (--forget-after), and the
    # journal's size on disk before and after giving the space back.
    forgotten: list[str] = field(default_factory=list)
    # Claims on shared batches whose host's lease ran out, given back for any host to take.
    claims_expired: int = 0
    journal_bytes_before: int = 0
    journal_bytes_after: int = 0

    @property
    def bytes_freed(self) -> int:
        return max(0, self.journal_bytes_before - self.journal_bytes_after)

    def as_dict(self) -> dict[str, object]:
        return {"expired": [report.as_dict() for report in self.expired], "busy": self.busy,
                "sealed": self.sealed, "errors": self.errors, "orphan_uploads": self.orphan_uploads,
                "orphans_aborted": self.orphans_aborted, "orphans_kept": self.orphans_kept,
                "forgotten": self.forgotten,
                "claims_expired": self.claims_expired,
                "journal_bytes_before": self.journal_bytes_before, "journal_bytes_after": self.journal_bytes_after,
                "bytes_freed": self.bytes_freed}


# gc --abort-orphans aborts an orphan upload only when its batch began longer ago than this
# (or --older-than): a host with a journal of its own may be sending a younger one right now.
# rclone's cleanup of multipart uploads waits 24 hours too.
ORPHAN_AGE = timedelta(hours=24)

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def batch_began(batch_id: str) -> datetime | None:
    """When a batch began, read from its id (a ULID's first 10 characters are its creation time
    in milliseconds); None for a name that is not a ULID."""
    if len(batch_id) != 26 or any(char not in _CROCKFORD for char in batch_id.upper()):
        return None
    millis = 0
    for char in batch_id[:10].upper():
        millis = millis * 32 + _CROCKFORD.index(char)
    try:
        return datetime.fromtimestamp(millis / 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


# What gc forgets by default: terminal batches that ended more than this long ago.
FORGET_AFTER = timedelta(days=30)


def forget_ended(journal: Journal, report: GcReport, forget_after: timedelta, now: datetime) -> None:
    """Forget the file and part rows of the terminal batches that ended (their last change)
    before ``now - forget_after``, each under its batch lock (a busy one is left for the
    next gc), then give the space back."""
    deadline = isoformat(now - forget_after)
    report.journal_bytes_before = report.journal_bytes_after = journal.size_on_disk()
    for batch in journal.list_batches():
        if not batch.state.terminal or batch.forgotten_at is not None or batch.updated_at >= deadline:
            continue
        try:
            with journal.batch_lock(batch.batch_id):
                if journal.forget_batch(batch.batch_id):
                    report.forgotten.append(batch.batch_id)
        except BatchBusy:
            report.busy.append(batch.batch_id)
    if report.forgotten:
        journal.compact()
        report.journal_bytes_after = journal.size_on_disk()


def _duration(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    for unit, size in (("h", 3600), ("m", 60)):  # 24h, as rclone and the README say it
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def collect_garbage(journal: Journal, store_for: StoreFactory, *, older_than: timedelta | None = None,
                    now: datetime | None = None, abort_orphans: bool = False,
                    forget_after: timedelta | None = None) -> GcReport:
    """Expire unfinalized batches past their time to live; report (and optionally abort)
    multipart uploads under a known staging prefix that no batch in the journal owns; with
    ``forget_after``, forget the terminal batches that ended longer ago than that.

    An orphan is aborted only when the batch its key names began longer ago than
    ``older_than`` (default :data:`ORPHAN_AGE`): hosts with journals of their own on one
    bucket see each other's uploads as orphans, and one in flight must not be aborted."""
    now = now or utcnow()
    report = GcReport()
    batches = journal.list_batches()
    deadline = isoformat(now - older_than) if older_than is not None else None
    for batch in batches:
        if batch.state.terminal:
            continue
        report.claims_expired += journal.expire_claims(batch.batch_id)
        stale = batch.created_at < deadline if deadline else batch.expires_at <= isoformat(now)
        if not stale:
            continue
        if any(worker.live for worker in journal.list_workers(batch.batch_id)):
            report.busy.append(batch.batch_id)  # a shared batch's hosts still renew their leases
            continue
        try:
            with journal.batch_lock(batch.batch_id):
                current = journal.get_batch(batch.batch_id)  # as it is now that no other archup can change it
                if current.state.terminal:
                    continue
                store = store_for(current)
                if sealed_manifest(store, current) is not None:
                    report.sealed.append(batch.batch_id)
                    continue
                aborted = abort_uploads(journal, store, current, "multipart upload aborted: the batch expired")
                journal.set_batch_state(batch.batch_id, BatchState.EXPIRED, error="expired: not finalized in time")
            report.expired.append(AbortReport(batch.batch_id, BatchState.EXPIRED.value, aborted))
        except BatchBusy:
            report.busy.append(batch.batch_id)
        except ArchupError as error:
            report.errors.append(f"{batch.batch_id}: {error}")

    orphan_age = older_than if older_than is not None else ORPHAN_AGE
    known_uploads = {upload_id for batch in batches for upload_id in journal.upload_ids(batch.batch_id)}
    seen_destinations: set[tuple[str, str | None, str]] = set()
    for batch in batches:
        destination = (batch.bucket, batch.endpoint_url, batch.prefix)
        if destination in seen_destinations:
            continue
        seen_destinations.add(destination)
        store = store_for(batch)
        try:
            for key, upload_id in store.list_multipart_uploads(batch.prefix):
                if upload_id in known_uploads:
                    continue
                owner = key[len(batch.prefix):].split("/", 1)[0]
                # Looked up now, not in the list read at the start: a batch begun since then
                # (an upload running beside gc) owns its uploads too.
                owner_batch = journal.find_batch(owner)
                if owner_batch is not None and not owner_batch.state.terminal:
                    continue  # a live batch's own upload, in flight right now or swept on its resume
                report.orphan_uploads.append({"bucket": batch.bucket, "key": key, "upload_id": upload_id})
                if not abort_orphans:
                    continue
                began = batch_began(owner)
                if began is None or began > now - orphan_age:
                    report.orphans_kept.append({
                        "bucket": batch.bucket, "key": key, "upload_id": upload_id,
                        "reason": "its batch began less than " + _duration(orphan_age) + " ago" if began is not None
                        else "its key names no batch archup can date"})
                    continue
                store.abort_multipart(key, upload_id)
                report.orphans_aborted += 1
        except ArchupError as error:
            report.errors.append(f"listing uploads under s3://{batch.bucket}/{batch.prefix}: {error}")
    if forget_after is not None:
        forget_ended(journal, report, forget_after, now)
    return report
