"""Finalize: seal a batch by writing its manifest, once, after checking the bucket.

Order: refuse unless the scan is complete and every file is uploaded; mark the
batch finalizing; read the bucket back (a listing sweep of the batch's files)
so that an object gone missing blocks the seal; write the entries; write the
summary with ``If-None-Match: *``; only then mark the batch enqueued in the
journal. A crash anywhere before the last step leaves a batch that finalize
can simply run again.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from . import manifest
from .checksums import CRC_ALGORITHMS, crc_of
from .clock import isoformat, utcnow
from .crashpoints import crash_point
from .errors import ArchupError, BatchClosed, BatchIncomplete, ManifestConflict, TransferError
from .journal import BatchRecord, FileRecord, Journal, PartRecord, ShardRecord
from .journal.records import SHARDS_DIR
from .locations import resume_command
from .manifest import reader
from .multipart import MAX_PARTS, full_crc
from .reconcile import abort_leftover_uploads
from .scan import FILES_DIR, LISTED_BUT_MISSING, UNREADABLE_REASONS, display_path
from .select import Selector
from .states import BatchState, FileState, ShardState
from .store import CHECKSUM_REFUSED, SHA256_METADATA, ObjectInfo, ObjectStore, UploadedPart

log = logging.getLogger("archup.finalize")

SHOW_AT_MOST = 20
MAX_SINGLE_PUT = 5 * 1024 ** 3  # S3's largest PutObject


@dataclass(frozen=True)
class FinalizeSummary:
    """The contract with the original design (PRODUCT.md)."""

    batch_id: str
    status: str
    files_uploaded: int
    total_bytes: int
    prefix: str
    manifest_key: str
    bucket: str
    files_skipped: int
    finalized_at: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _name_files(files: list[tuple[str, str]], total: int) -> str:
    shown = "; ".join(f"{display_path(path)} ({reason})" for path, reason in files[:SHOW_AT_MOST])
    more = f"; and {total - SHOW_AT_MOST} more" if total > SHOW_AT_MOST else ""
    return shown + more


def _summary_from_journal(journal: Journal, batch: BatchRecord) -> FinalizeSummary:
    state = journal.get_state(batch.batch_id)
    assert batch.manifest_key is not None and batch.finalized_at is not None
    return FinalizeSummary(
        batch_id=batch.batch_id, status=batch.state.value,
        files_uploaded=state.counts[FileState.UPLOADED],
        total_bytes=state.bytes_by_state[FileState.UPLOADED],
        prefix=batch.batch_prefix, manifest_key=batch.manifest_key, bucket=batch.bucket,
        files_skipped=state.counts[FileState.SKIPPED], finalized_at=batch.finalized_at)


def _resume(journal: Journal, batch: BatchRecord) -> str:
    # The endpoint finalize was let through to (run.endpoint_for) is the batch's own: name it,
    # so the command runs as printed wherever no endpoint is configured.
    return resume_command(batch.batch_id, journal.location, endpoint_url=batch.endpoint_url)


def check_complete(journal: Journal, batch: BatchRecord) -> None:
    """Raise BatchIncomplete naming the files that keep this batch from being sealed."""
    if not batch.scan_complete:
        raise BatchIncomplete(f"batch {batch.batch_id}: the scan of {batch.source_root} never completed; "
                              f"run '{_resume(journal, batch)}' to resume")
    state = journal.get_state(batch.batch_id)
    not_done = [FileState.PENDING, FileState.UPLOADING, FileState.FAILED]
    count = sum(state.counts[s] for s in not_done)
    if count:
        named: list[tuple[str, str]] = []
        for record in journal.iter_files(batch.batch_id, not_done):
            named.append((record.rel_path, f"{record.state.value}: {record.error}" if record.error
                          else record.state.value))
            if len(named) >= SHOW_AT_MOST:
                break
        raise BatchIncomplete(
            f"batch {batch.batch_id} has {count} file(s) not uploaded: {_name_files(named, count)}; "
            f"run '{_resume(journal, batch)}' to resume")


def _read_back(journal: Journal, store: ObjectStore, batch: BatchRecord) -> list[tuple[FileRecord, str]]:
    """Merge the bucket's listing of files/ with the journal's uploaded files of their own
    (a packed file is read back with its shard); both come in key order."""
    return _compare(journal.iter_files(batch.batch_id, [FileState.UPLOADED], packed=False),
                    lambda: store.list_objects(batch.batch_prefix + FILES_DIR), "object")


def _read_back_shards(journal: Journal, store: ObjectStore, batch: BatchRecord) -> list[tuple[ShardRecord, str]]:
    """The same for a packed batch's shards (their key order is their number order)."""
    return _compare(journal.iter_shards(batch.batch_id, [ShardState.UPLOADED]),
                    lambda: store.list_objects(batch.batch_prefix + SHARDS_DIR), "shard")


Stored = TypeVar("Stored", FileRecord, ShardRecord)


def _compare(recorded: Iterable[Stored], listing: Callable[[], Iterator[ObjectInfo]],
             noun: str) -> list[tuple[Stored, str]]:
    """What the journal recorded stored, against the listing: missing, another size, replaced.
    With nothing recorded there is nothing to find, and the bucket is not listed (a batch
    without shards lists no shards/, a fully packed one no files/)."""
    problems: list[tuple[Stored, str]] = []
    items = iter(recorded)
    first = next(items, None)
    if first is None:
        return problems
    for paired in reader.merge_listing(itertools.chain((first,), items), lambda item: item.key, listing()):
        item, current = paired.item, paired.listed
        if item is None:
            continue  # an object the journal does not name: verify reports those
        if current is None:
            problems.append((item, f"{noun} missing from the bucket"))
        elif current.size != item.size:
            problems.append((item, f"{noun} has {current.size} bytes, expected {item.size}"))
        elif item.etag and current.etag and current.etag != item.etag:
            problems.append((item, f"{noun} was replaced (ETag {current.etag}, expected {item.etag})"))
    return problems


def put_list(store: ObjectStore, key: str, written: manifest.EntriesFile, part_size: int) -> None:
    """Store one of the manifest's lists from its temporary file, never held whole (a million
    entries are some 200 MB): one PUT of its bytes up to a part; past that one PUT streamed
    from the file (up to S3's 5 GiB); past that a multipart upload of part-size reads."""
    metadata = {SHA256_METADATA: written.sha256}
    if written.size <= part_size:
        store.put_object(key, written.handle.read(), metadata=metadata)
        return
    if written.size <= MAX_SINGLE_PUT:  # streamed from the file: one request, a part's memory
        store.put_file(key, written.handle, written.size, sha256_digest=bytes.fromhex(written.sha256),
                       metadata=metadata, content_type="application/jsonl")
        return
    part_size = max(part_size, -(-written.size // MAX_PARTS))
    checksum = store.multipart_checksum()
    try:
        upload_id = store.create_multipart(key, checksum, metadata=metadata, content_type="application/jsonl")
    except TransferError as error:
        if error.code != CHECKSUM_REFUSED:
            raise
        checksum = store.multipart_checksum()
        upload_id = store.create_multipart(key, checksum, metadata=metadata, content_type="application/jsonl")
    parts: list[PartRecord] = []
    try:
        while True:
            body = written.handle.read(part_size)
            if not body:
                break
            algorithm = checksum.algorithm
            crc = crc_of(algorithm, body) if algorithm in CRC_ALGORITHMS else None
            sent = store.upload_part(key, upload_id, len(parts) + 1, body, checksum, crc=crc)
            parts.append(PartRecord(len(parts) + 1, len(body), sent.etag, sent.checksum))
        store.complete_multipart(key, upload_id, [UploadedPart(p.part_number, p.etag, p.checksum) for p in parts],
                                 checksum, full_crc=full_crc(checksum, parts), size=written.size)
    except BaseException:
        try:
            store.abort_multipart(key, upload_id)
        except ArchupError:
            pass  # under the batch prefix: the next finalize's sweep aborts it
        raise


def _existing_summary(store: ObjectStore, key: str, batch_id: str) -> reader.Summary | None:
    """The summary already at ``key``, None if there is none; ManifestConflict if it is not
    a summary of this batch."""
    try:
        return reader.read_summary(store, key, batch_id)
    except reader.ManifestDefect as defect:
        if defect.kind == "missing":
            return None
        raise ManifestConflict(f"{key} already exists and describes other contents ({defect}); "
                               "archup will not overwrite a manifest (inspect it; to give the batch up, delete "
                               "that manifest yourself, then 'archup abort' the batch)") from None


def finalize(journal: Journal, store: ObjectStore, batch_id: str) -> FinalizeSummary:
    batch = journal.get_batch(batch_id)
    if batch.state is BatchState.ENQUEUED:
        return _summary_from_journal(journal, batch)  # idempotent: nothing is written again
    if batch.state in (BatchState.ABORTED, BatchState.EXPIRED):
        raise BatchClosed(f"batch {batch_id} is {batch.state.value}; it cannot be finalized")
    check_complete(journal, batch)
    journal.set_batch_state(batch_id, BatchState.FINALIZING)

    abort_leftover_uploads(store, batch)
    problems = _read_back(journal, store, batch)
    lost_shards = _read_back_shards(journal, store, batch)
    if problems or lost_shards:
        for record, reason in problems:
            journal.reset_file(batch_id, record.rel_path, reason)
        for shard, reason in lost_shards:
            journal.drop_shard(batch_id, shard.shard_no, reason, {})  # its members are packed again
        journal.set_batch_state(batch_id, BatchState.FAILED,
                                error=f"{len(problems) + len(lost_shards)} object(s) failed the read-back "
                                "before finalize")
        named = [(record.rel_path, reason) for record, reason in problems] + [
            (shard.key, f"{reason}; its {shard.members} file(s) go into a new shard") for shard, reason in lost_shards]
        raise BatchIncomplete(
            f"batch {batch_id}: {len(named)} uploaded object(s) failed the read-back: "
            f"{_name_files(named, len(problems))}; run '{_resume(journal, batch)}' "
            "to send them again")

    summary_key = manifest.summary_key(batch)
    entries = manifest.write_entries(journal.iter_files(batch_id, [FileState.UPLOADED]),
                                     line_of=manifest.entry_line_for(batch))
    skipped = manifest.write_entries(journal.iter_files(batch_id, [FileState.SKIPPED]), manifest.skipped_entry)
    shard_list = list(journal.iter_shards(batch_id, [ShardState.UPLOADED]))
    shards = manifest.write_entries(shard_list, manifest.shard_entry)
    with entries.handle, skipped.handle, shards.handle:
        existing = _existing_summary(store, summary_key, batch_id)
        if existing is None:
            # The summary does not exist yet, so overwriting the entries and skipped objects
            # is safe: nothing seals them until the summary below is written.
            put_list(store, manifest.entries_key(batch), entries, batch.part_size)
            put_list(store, manifest.skipped_key(batch), skipped, batch.part_size)
            if shards.count:
                put_list(store, manifest.shards_key(batch), shards, batch.part_size)
            crash_point("after-manifest-entries")
            finalized_at = isoformat(utcnow())
            body = manifest.encode_summary(
                manifest.summary(batch, entries, finalized_at=finalized_at, skipped=skipped, shards=shards,
                                 files_packed=sum(shard.members for shard in shard_list)))
            summary_sha256 = hashlib.sha256(body).hexdigest()
            if store.put_if_absent(summary_key, body) is None:
                existing = _existing_summary(store, summary_key, batch_id)
                if existing is None:
                    # 412 yet nothing there: never take a refusal for a seal.
                    raise TransferError(f"PutObject {summary_key}: the server refused the write (412 "
                                        "PreconditionFailed) but no manifest is there; run finalize again",
                                        "PreconditionFailed")
            crash_point("after-manifest-summary")
        if existing is not None:
            finalized_at = _adopt(existing.document, batch, entries, skipped, summary_key, shards)
            summary_sha256 = existing.sha256
    # The seal and the archived index, in one transaction.
    journal.seal_batch(batch_id, manifest_key=summary_key, finalized_at=finalized_at, summary_sha256=summary_sha256,
                       covers=walk_covers(journal, batch))
    return _summary_from_journal(journal, journal.get_batch(batch_id))


def walk_covers(journal: Journal, batch: BatchRecord) -> Callable[[str], bool] | None:
    """Which paths of the source the batch's complete walk would have found, had they been
    there: its selection takes them, and the batch did not skip them as present but unread
    (a file or a directory it could not read is still in the source). None: every path.
    The archived index drops the covered paths the walk did not find."""
    settings = batch.settings
    select = Selector(settings.includes, settings.excludes) if settings is not None else None
    listed = set(settings.files_from) if settings is not None and settings.files_from is not None else None
    present: set[str] = set()
    unread_dirs: list[str] = []
    for record in journal.iter_files(batch.batch_id, [FileState.SKIPPED]):
        if record.error == LISTED_BUT_MISSING:
            continue
        present.add(record.rel_path)
        if (record.error or "").startswith(UNREADABLE_REASONS[0]):
            unread_dirs.append(record.rel_path + "/")
    if (select is None or not select.active) and listed is None and not present:
        return None
    under_unread = tuple(unread_dirs)

    def covers(rel_path: str) -> bool:
        return ((listed is None or rel_path in listed) and (select is None or select(rel_path))
                and rel_path not in present and not rel_path.startswith(under_unread))

    return covers


def _adopt(existing: dict[str, Any], batch: BatchRecord, entries: manifest.EntriesFile,
           skipped: manifest.EntriesFile, key: str, shards: manifest.EntriesFile) -> str:
    """A summary is already there: accept it only if it seals exactly these entries (and
    skipped list, and shard list)."""
    sealed, sealed_skipped = existing.get("entries"), existing.get("skipped")
    sealed_shards = existing.get("shards")
    if (sealed_shards.get("sha256") if isinstance(sealed_shards, dict) else None) != (
            shards.sha256 if shards.count else None):
        raise ManifestConflict(f"{key} already exists and describes other contents; "
                               "archup will not overwrite a manifest (inspect it; to give the batch up, delete "
                               "that manifest yourself, then 'archup abort' the batch)")
    same = (existing.get("batch_id") == batch.batch_id
            and isinstance(sealed, dict) and sealed.get("sha256") == entries.sha256
            # A summary from before the skipped list has none to compare.
            and (sealed_skipped is None
                 or (isinstance(sealed_skipped, dict) and sealed_skipped.get("sha256") == skipped.sha256)))
    if not same:
        raise ManifestConflict(f"{key} already exists and describes other contents; "
                               "archup will not overwrite a manifest (inspect it; to give the batch up, delete "
                               "that manifest yourself, then 'archup abort' the batch)")
    # An earlier finalize wrote it and died before the journal's commit.
    return str(existing.get("finalized_at"))
