"""The library's entry points for the commands that change a batch: upload, resume, finalize.

Each one chooses (or creates) the batch, reconciles what the batch recorded with what
this run asks for, builds the store once from the batch's settings, takes the locks,
runs the steps in the order docs/design.md gives, and returns one outcome object.
The CLI parses, handles signals and renders; it never calls the journal's or the
store's operations for these commands. (abort and gc are in :mod:`archup.batches`.)

Order of one run (docs/design.md, "A run"): preflight (HeadBucket) -> source lock ->
choose or create the batch -> batch lock -> marker object -> on a resume, sweep orphan
uploads and settle lost PUTs -> scan into the journal -> send -> finalize.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .batches import find_resumable, write_marker
from .errors import (
    ArchupError,
    BatchClosed,
    BatchExists,
    BatchIncomplete,
    EndpointMismatch,
    Interrupted,
    JournalError,
    UsageError,
)
from .finalize import FinalizeSummary, finalize
from .journal import DEFAULT_LEASE, BatchRecord, BatchSettings, BatchSummary, Destination, FileRecord, Journal
from .locations import resume_command
from .outcomes import UploadObserver, UploadResult
from .packing import DEFAULT_SHARD_SIZE
from .scan import UNREADABLE_REASONS, display_path, object_key, scan, scan_list
from .select import Selector
from .shared import finalize_shared, run_shared
from .states import BatchState, FileState
from .store import ChecksumMode, Connection, ObjectStore, StoreConfig, connection_of, open_store
from .uploader import Uploader, UploadOptions

log = logging.getLogger("archup.run")

SHOW_AT_MOST = 20


@dataclass(frozen=True)
class Transport(Connection):
    """How this run reaches the destination: flags and environment, never recorded with a
    batch (the store's Connection settings, and two checksum flags). ``checksum`` and
    ``full_object_checksum`` left None take what the batch recorded (what its endpoint
    accepted when it began)."""

    checksum: ChecksumMode | None = None
    full_object_checksum: bool | None = None
    # --trust-recorded-endpoint: a batch whose recorded endpoint is not endpoint_url is accepted.
    trust_recorded_endpoint: bool = False


def endpoint_for(batch: BatchRecord, transport: Transport) -> str | None:
    """Where a recorded batch's requests go: this host's configured endpoint, or (none
    configured) the batch's recorded one. A journal row alone never redirects them (a shared
    journal's rows are written by every host that can reach its database): a recorded
    endpoint other than this host's (none configured: AWS) is refused, EndpointMismatch,
    unless the transport trusts it."""
    if batch.endpoint_url != transport.endpoint_url and not transport.trust_recorded_endpoint:
        raise EndpointMismatch(batch.batch_id, batch.endpoint_url, transport.endpoint_url)
    return transport.endpoint_url or batch.endpoint_url


def store_config(batch: BatchRecord, transport: Transport) -> StoreConfig:
    """The store a recorded batch goes to: its destination and archive options as recorded,
    the transport's flags over the endpoint (see :func:`endpoint_for`), region and checksum mode."""
    return _store_config(batch.bucket, endpoint_for(batch, transport), batch.region,
                         batch.settings or BatchSettings(), transport)


def _store_config(bucket: str, endpoint_url: str | None, region: str | None, settings: BatchSettings,
                  transport: Transport) -> StoreConfig:
    connection = {**connection_of(transport), "endpoint_url": transport.endpoint_url or endpoint_url,
                  "region": transport.region or region}
    return StoreConfig(
        **connection, bucket=bucket,
        checksum=transport.checksum or ChecksumMode(settings.checksum),
        full_object_checksum=(settings.full_object_checksum if transport.full_object_checksum is None
                              else transport.full_object_checksum),
        # Every object of the batch stored alike, whichever run sends it.
        storage_class=settings.storage_class, sse=settings.sse, sse_kms_key_id=settings.sse_kms_key_id,
        user_metadata=settings.metadata, tags=settings.tags)


def store_factory(transport: Transport) -> Callable[[BatchRecord], ObjectStore]:
    """For commands that meet several batches (abort, gc, finalize): a store per batch."""
    def factory(batch: BatchRecord) -> ObjectStore:
        return open_store(store_config(batch, transport))
    return factory


class RunListener(Protocol):
    """What a run tells its caller as it goes (the CLI prints it, or not)."""

    def resuming(self, batch: BatchRecord) -> None:
        """A plain upload found an unfinished batch of this source and destination."""

    def settings_unrecorded(self, batch: BatchRecord) -> None:
        """The batch was begun by an archup that did not record its options."""

    def options_kept(self, batch: BatchRecord, changed: list[str]) -> None:
        """This run asked for other options than the batch keeps."""

    def starting(self, batch: BatchRecord, parallel: int, resume_hint: str) -> None:
        """The batch is chosen and locked; sending begins."""

    def progress(self, files_todo: int, bytes_todo: int) -> AbstractContextManager[UploadObserver | None]:
        """Around the send: an observer for progress, or None."""

    def sent(self, skipped: SkippedFiles) -> None:
        """The send is over (whatever its end): what was not sent by policy or could not be read."""

    def archived_before(self, batch: BatchRecord, earlier: BatchRecord) -> None:
        """A new batch without --skip-archived, of a source this destination already holds."""


class QuietListener:
    def resuming(self, batch: BatchRecord) -> None:
        pass

    def settings_unrecorded(self, batch: BatchRecord) -> None:
        pass

    def options_kept(self, batch: BatchRecord, changed: list[str]) -> None:
        pass

    def starting(self, batch: BatchRecord, parallel: int, resume_hint: str) -> None:
        pass

    def progress(self, files_todo: int, bytes_todo: int) -> AbstractContextManager[UploadObserver | None]:
        return nullcontext(None)

    def sent(self, skipped: SkippedFiles) -> None:
        pass

    def archived_before(self, batch: BatchRecord, earlier: BatchRecord) -> None:
        pass


@dataclass(frozen=True)
class SkippedFiles:
    """The files skipped by policy or unreadable (the first SHOW_AT_MOST, and how many), and
    how many --skip-archived found archived already (only counted)."""

    batch_id: str
    count: int
    first: list[FileRecord]
    archived: int


@dataclass(frozen=True)
class UploadRequest:
    """What ``archup upload DIR`` asks for."""

    source_root: str
    bucket: str
    prefix: str
    part_size: int
    settings: BatchSettings            # this run's selection and archive options (a new batch records them)
    transport: Transport
    parallel: int = 5
    prehash: bool = False
    batch_id: str | None = None        # --batch: continue this one (or create it, if no batch has that id)
    new_batch: bool = False            # --new-batch: never resume
    no_finalize: bool = False
    local_root: str | None = None      # --source-root: where this host finds the source, if elsewhere
    lease: float = DEFAULT_LEASE       # --lease: seconds a shared journal's claims last unrenewed


@dataclass
class RunOutcome:
    """How a run ended. The caller renders ``report`` (if any), then raises ``error`` (if any)."""

    batch_id: str
    resume_hint: str
    result: UploadResult
    kind: str = "finalized"              # finalized | partial | uploaded (--no-finalize) | stopped
    report: dict[str, Any] | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[dict[str, str | None]] = field(default_factory=list)
    unreadable_count: int = 0
    error: ArchupError | None = None
    tally: BatchSummary | None = None    # the batch's counts at the end, when asked for (tally=True)


def upload(journal: Journal, request: UploadRequest, *, listener: RunListener | None = None,
           stop: threading.Event | None = None, tally: bool = False) -> RunOutcome:
    """``archup upload``: preflight, choose or create the batch, send it, finalize.

    ``tally``: also count the batch's files and bytes per state at the end (a monitoring
    file's numbers; one more read of the batch)."""
    started = time.monotonic()
    listener = listener or QuietListener()
    stop = stop or threading.Event()
    transport = replace(request.transport, checksum=request.transport.checksum or ChecksumMode(
        request.settings.checksum))
    with journal.source_lock(request.source_root, request.bucket, request.prefix, transport.endpoint_url):
        record = _choose_batch(journal, request, transport, listener)
        settings = _reconcile_settings(journal, record, request.settings, listener) if record else request.settings
        endpoint = endpoint_for(record, transport) if record else transport.endpoint_url
        store = open_store(_store_config(request.bucket, endpoint, transport.region, settings, transport))
        store.check_bucket()
        if record is None:
            record, resumed = _create_batch(journal, request, transport)
            earlier = None if resumed or settings.skip_archived else _latest_sealed(journal, record)
            if earlier is not None:
                listener.archived_before(record, earlier)
            if resumed:  # another host created it a moment ago: its settings are the batch's
                settings = _reconcile_settings(journal, record, request.settings, listener)
                endpoint = endpoint_for(record, transport)
                store = open_store(_store_config(request.bucket, endpoint, transport.region, settings, transport))
        else:
            resumed = True
            changed = settings.differences(request.settings) if settings is not request.settings else []
            if request.part_size != record.part_size:
                changed.append("part_size")
            if changed:
                listener.options_kept(record, changed)
        with journal.batch_lock(record.batch_id):
            return _timed(_run_batch(journal, store, journal.get_batch(record.batch_id), settings, resumed=resumed,
                                     parallel=request.parallel, prehash=request.prehash,
                                     no_finalize=request.no_finalize, profile=transport.profile,
                                     endpoint_url=endpoint, listener=listener,
                                     stop=stop, tally=tally, local_root=request.local_root,
                                     lease=request.lease), started)


def resume(journal: Journal, batch_id: str, transport: Transport, *, parallel: int | None = None,
           prehash: bool = False,
           no_finalize: bool = False, listener: RunListener | None = None,
           stop: threading.Event | None = None, tally: bool = False, local_root: str | None = None,
           lease: float = DEFAULT_LEASE) -> RunOutcome:
    """``archup resume BATCH``: continue a recorded batch from its journal, then finalize."""
    started = time.monotonic()
    listener = listener or QuietListener()
    stop = stop or threading.Event()
    record = journal.get_batch(batch_id)
    root = local_root or record.source_root
    if not os.path.isdir(root):
        raise UsageError(f"batch {batch_id} archives {record.source_root}, and {root} is not a directory on this "
                         "host now" + ("" if local_root else "; --source-root says where this host mounts it"))
    settings = _reconcile_settings(journal, record, None, listener)
    parallel = parallel or settings.parallel or 5  # None: as the batch was started
    transport = replace(transport, max_pool_connections=max(transport.max_pool_connections, parallel + 4))
    endpoint = endpoint_for(record, transport)
    store = open_store(_store_config(record.bucket, endpoint, record.region, settings, transport))
    store.check_bucket()
    with journal.batch_lock(batch_id):
        return _timed(_run_batch(journal, store, journal.get_batch(batch_id), settings, resumed=True,
                                 parallel=parallel, prehash=prehash, no_finalize=no_finalize,
                                 profile=transport.profile, endpoint_url=endpoint, listener=listener, stop=stop,
                                 tally=tally,
                                 local_root=local_root, lease=lease), started)


def _latest_sealed(journal: Journal, batch: BatchRecord) -> BatchRecord | None:
    """The newest finalized batch of this batch's source and destination, if any."""
    sealed = [other for other in journal.list_batches(BatchState.ENQUEUED)
              if other.destination == batch.destination and other.batch_id != batch.batch_id]
    return max(sealed, key=lambda other: other.finalized_at or "", default=None)


def _timed(outcome: RunOutcome, started: float) -> RunOutcome:
    """The report gets the run's wall time and its average rate (bytes sent per second)."""
    if outcome.report is not None:
        elapsed = max(time.monotonic() - started, 1e-6)
        outcome.report["elapsed_s"] = round(elapsed, 3)
        outcome.report["bytes_per_s"] = int(outcome.result.bytes_sent / elapsed)
    return outcome


def finalize_batch(journal: Journal, batch_id: str, store_for: Callable[[BatchRecord], ObjectStore]) -> FinalizeSummary:
    """``archup finalize BATCH``: seal it under its lock (idempotent). On a shared journal, it
    takes part in the finalize race like a host: it seals only if it wins."""
    with journal.batch_lock(batch_id):
        claims = journal.claims()
        if claims is not None:
            return finalize_shared(journal, claims, batch_id, store_for)
        return finalize(journal, store_for(journal.get_batch(batch_id)), batch_id)


# -- choosing the batch --------------------------------------------------------

def _choose_batch(journal: Journal, request: UploadRequest, transport: Transport,
                  listener: RunListener) -> BatchRecord | None:
    """The batch this upload continues (--batch, or an unfinished one of this source and
    destination), or None for a new one."""
    if request.batch_id:
        record = journal.find_batch(request.batch_id)
        if record is None:
            # A new id: this run creates the batch (the first host of several to arrive) -- unless
            # the source has an unfinished batch to this destination, which a mistyped id must
            # never silently start over.
            found = find_resumable(journal, request.source_root, request.bucket, request.prefix,
                                   transport.endpoint_url)
            if found is not None:
                raise UsageError(f"no batch {request.batch_id} in journal {journal.location}, and batch "
                                 f"{found.batch_id} of {request.source_root} to s3://{request.bucket}/"
                                 f"{request.prefix} is unfinished; continue it with --batch {found.batch_id}, "
                                 f"or end it first ('archup abort {found.batch_id}')")
            return None
        if record.source_root != request.source_root:
            raise UsageError(f"batch {record.batch_id} archives {record.source_root}, not {request.source_root}")
        if (record.bucket, record.prefix) == (request.bucket, request.prefix):
            endpoint_for(record, transport)  # another endpoint is refused, unless trusted
            return record
        raise UsageError(f"batch {record.batch_id} goes to s3://{record.bucket}/{record.prefix} at "
                         f"{record.endpoint_url or 'AWS'}, not s3://{request.bucket}/{request.prefix} at "
                         f"{transport.endpoint_url or 'AWS'}; 'archup resume {record.batch_id}' takes its own")
    if request.new_batch:
        return None
    found = find_resumable(journal, request.source_root, request.bucket, request.prefix, transport.endpoint_url)
    if found is not None:
        listener.resuming(found)
    return found


def _create_batch(journal: Journal, request: UploadRequest, transport: Transport) -> tuple[BatchRecord, bool]:
    """A new batch (the id --batch gave, or a new ULID); False: new. With a shared journal,
    several hosts may create one id at once: one insert wins, and the others join it (True)."""
    batch_id = request.batch_id
    if batch_id is None:
        from ulid import ULID  # here, not at the top: only a new batch needs it

        batch_id = str(ULID())
    try:
        return journal.init_batch(batch_id, source_root=request.source_root, bucket=request.bucket,
                                  prefix=request.prefix, part_size=request.part_size,
                                  endpoint_url=transport.endpoint_url, region=transport.region,
                                  settings=request.settings,
                                  unless_unfinished=request.batch_id is None and not request.new_batch), False
    except BatchExists as exists:
        # Another host created it (or, for a plain upload, a batch of this source) a moment ago.
        return journal.get_batch(exists.existing), True


def _reconcile_settings(journal: Journal, record: BatchRecord, wanted: BatchSettings | None,
                        listener: RunListener) -> BatchSettings:
    """The batch keeps the settings its first run chose; ``wanted`` (this run's flags) only
    becomes them for a batch begun before settings were recorded."""
    if record.settings is not None:
        return record.settings
    if wanted is not None:
        # Begun by an archup that did not record its options: this run's (the job's) become its own.
        journal.set_batch_settings(record.batch_id, wanted)
        return wanted
    if not record.state.terminal:
        listener.settings_unrecorded(record)
    return BatchSettings()


# -- one batch, locked ------------------------------------------------------------

def _run_batch(journal: Journal, store: ObjectStore, record: BatchRecord, settings: BatchSettings, *,
               resumed: bool, parallel: int, prehash: bool, no_finalize: bool, profile: str | None,
               listener: RunListener, stop: threading.Event, tally: bool = False, local_root: str | None = None,
               lease: float = DEFAULT_LEASE, endpoint_url: str | None = None) -> RunOutcome:
    """Send (or continue) one batch while holding its lock (or, on a shared journal, this
    host's part of it: :func:`run_shared`), then finalize it. ``endpoint_url``: where its
    requests go (the resume command printed names it)."""
    batch_id = record.batch_id
    hint = resume_command(batch_id, journal.location, profile, endpoint_url,
                          trust_recorded_endpoint=endpoint_url != record.endpoint_url)
    listener.starting(record, parallel, hint)
    outcome = RunOutcome(batch_id, hint, UploadResult(batch_id))
    claims = journal.claims()
    if claims is not None:
        if record.state.terminal and record.state is not BatchState.ENQUEUED:
            raise BatchClosed(f"batch {batch_id} is {record.state.value}; start a new batch")
        if stop.is_set():
            raise Interrupted(f"batch {batch_id} interrupted before it began; resume with '{hint}'")
        return run_shared(
            journal, claims, store, record, _upload_options(record, settings, parallel, prehash), stop=stop,
            lease=lease, local_root=local_root, no_finalize=no_finalize, progress=listener.progress,
            end=lambda result, partial: _ended(journal, store, replace(outcome, result=result),
                                               no_finalize=no_finalize, tally=tally, listener=listener,
                                               partial=partial))
    if record.state is BatchState.ENQUEUED:
        pass  # already sealed: finalize below just reports its summary again
    elif record.state.terminal:
        raise BatchClosed(f"batch {batch_id} is {record.state.value}; start a new batch")
    elif stop.is_set():
        raise Interrupted(f"batch {batch_id} interrupted before it began; resume with '{hint}'")
    else:
        write_marker(store, record)
        outcome.result = _scan_and_send(journal, store, batch_id, _upload_options(record, settings, parallel, prehash),
                                        resumed=resumed, listener=listener, stop=stop)
    return _ended(journal, store, outcome, no_finalize=no_finalize, tally=tally, listener=listener)


def _upload_options(record: BatchRecord, settings: BatchSettings, parallel: int, prehash: bool) -> UploadOptions:
    selector = Selector(settings.includes, settings.excludes)
    return UploadOptions(parallel=parallel, part_size=record.part_size, multipart_threshold=record.part_size,
                         select=selector if selector.active else None, files_from=settings.files_from,
                         skip_archived=settings.skip_archived, prehash=prehash,
                         follow_symlinks=settings.follow_symlinks, pack_under=settings.pack_under,
                         shard_size=settings.shard_size or DEFAULT_SHARD_SIZE)


def _ended(journal: Journal, store: ObjectStore, outcome: RunOutcome, *, no_finalize: bool, tally: bool,
           listener: RunListener, partial: bool = False) -> RunOutcome:
    """How the run ends, from what the send did: stopped, partial, uploaded, or finalized (or,
    sealed by another host, its seal reported). ``partial``: the batch has files not uploaded
    though this run failed none (another host's)."""
    batch_id, hint = outcome.batch_id, outcome.resume_hint
    listener.sent(_skipped_files(journal, batch_id))
    if tally:
        outcome.tally = journal.get_state(batch_id, problem_limit=0)
    result = outcome.result
    if result.fatal is not None:
        return replace(outcome, kind="stopped", error=result.fatal)
    if result.interrupted:
        return replace(outcome, kind="stopped", error=Interrupted(f"batch {batch_id} interrupted; resume with '{hint}'"))
    if result.files_failed or partial:
        failed = journal.get_state(batch_id, problem_limit=0).counts[FileState.FAILED] if partial else 0
        what = f"{result.files_failed} file(s) failed" if result.files_failed else \
            f"{failed} file(s) failed on the hosts sharing it" if failed else "some files are not uploaded"
        return replace(outcome, kind="partial", report=_partial_report(journal, batch_id, result, hint),
                       failures=result.failures[:SHOW_AT_MOST],
                       error=BatchIncomplete(f"batch {batch_id}: {what}; resume with '{hint}'"))
    if no_finalize:
        return replace(outcome, kind="uploaded", report=_partial_report(journal, batch_id, result, hint))
    return _finalized(journal, store, outcome)


def _scan_and_send(journal: Journal, store: ObjectStore, batch_id: str, options: UploadOptions, *, resumed: bool,
                   listener: RunListener, stop: threading.Event) -> UploadResult:
    uploader = Uploader(journal, store, batch_id, options, stop=stop)
    if resumed:
        uploader.sweep_orphan_uploads()
        uploader.settle_lost_puts()
    uploader.scan()
    state = journal.get_state(batch_id, problem_limit=0)
    done = (FileState.UPLOADED, FileState.SKIPPED)
    with listener.progress(state.files_total - sum(state.counts[s] for s in done),
                           state.bytes_total - sum(state.bytes_by_state[s] for s in done)) as observer:
        if observer is not None:
            uploader.observer = observer
        return uploader.send()


def _finalized(journal: Journal, store: ObjectStore, outcome: RunOutcome) -> RunOutcome:
    batch_id = outcome.batch_id
    summary = finalize(journal, store, batch_id).as_dict()
    summary["bytes_sent"] = outcome.result.bytes_sent
    unreadable = journal.count_skipped(batch_id, UNREADABLE_REASONS)
    summary["files_unreadable"] = unreadable
    summary["files_already_archived"] = journal.get_batch(batch_id).files_archived
    outcome = replace(outcome, report=summary, unreadable_count=unreadable,
                      unreadable=_unreadable(journal, batch_id) if unreadable else [])
    if unreadable:
        # Sealed with what could be read; the exit code still tells cron that something
        # that should be archived is not (as rclone and the AWS CLI do).
        outcome.error = BatchIncomplete(
            f"batch {batch_id} sealed without {unreadable} path(s) that could not be read (named above; "
            f"'archup status {batch_id} --all' lists them); make them readable and run again "
            "(--skip-archived sends only what is missing)")
    return outcome


def _partial_report(journal: Journal, batch_id: str, result: UploadResult, hint: str) -> dict[str, Any]:
    state = journal.get_state(batch_id)
    return {
        "batch_id": batch_id,
        "status": state.batch.state.value,
        "files_uploaded": state.counts[FileState.UPLOADED],
        "files_failed": state.counts[FileState.FAILED],
        "files_pending": state.counts[FileState.PENDING] + state.counts[FileState.UPLOADING],
        "files_skipped": state.counts[FileState.SKIPPED],
        "files_already_archived": state.batch.files_archived,
        "total_bytes": state.bytes_by_state[FileState.UPLOADED],
        "failures": [{"path": path, "error": error} for path, error in result.failures[:SHOW_AT_MOST]],
        "bytes_sent": result.bytes_sent,
        "resume": hint,
    }


def _skipped_files(journal: Journal, batch_id: str) -> SkippedFiles:
    state = journal.get_state(batch_id, problem_limit=SHOW_AT_MOST)
    return SkippedFiles(batch_id, state.counts[FileState.SKIPPED], state.skipped, state.batch.files_archived)


def _unreadable(journal: Journal, batch_id: str) -> list[dict[str, str | None]]:
    """The first paths that could not be read (a policy skip is not among them)."""
    found: list[dict[str, str | None]] = []
    for record in journal.iter_files(batch_id, [FileState.SKIPPED]):
        if record.error and record.error.startswith(UNREADABLE_REASONS):
            found.append({"path": record.rel_path, "error": record.error})
            if len(found) == SHOW_AT_MOST:
                break
    return found


# -- the dry run ----------------------------------------------------------------

def dry_run(request: UploadRequest, journal_opener: Callable[[], AbstractContextManager[Journal | None]]
            ) -> dict[str, Any]:
    """Scan with the selection applied and say what an upload would send; no bucket, and the
    journal only read, for --skip-archived (``journal_opener`` yields None when there is none).

    Also the objects and requests the files take, each file an object of its own and, with
    --pack-under, packed (:class:`RequestPlan`), and for an archive storage class the billed
    overhead per object that packing avoids."""
    settings = request.settings
    selector = Selector(settings.includes, settings.excludes)
    select = selector if selector.active else None
    items = (scan_list(request.source_root, settings.files_from, select, follow_symlinks=settings.follow_symlinks)
             if settings.files_from is not None
             else scan(request.source_root, select, follow_symlinks=settings.follow_symlinks))
    destination = Destination(request.source_root, request.bucket, request.prefix, request.transport.endpoint_url)
    count = total = skipped = already = 0
    first: list[str] = []
    with (journal_opener() if settings.skip_archived and request.bucket else nullcontext(None)) as reader, \
            RequestPlan(request.part_size, settings.pack_under, settings.shard_size or DEFAULT_SHARD_SIZE) as plan:
        for item in items:
            if item.skip_reason:
                skipped += 1
                continue
            if reader is not None and reader.find_archived(destination, [(item.rel_path, item.size, item.mtime_ns)]):
                already += 1
                continue
            count += 1
            total += item.size
            key = object_key(f"{request.prefix}<BATCH>/", item.rel_path)
            plan.add(key, item.rel_path, item.size, item.mtime_ns)
            if len(first) < SHOW_AT_MOST:
                first.append(display_path(key))
        requests = plan.report(settings.storage_class)
    return {"dry_run": True, "source_root": request.source_root, "files": count, "bytes": total,
            "files_skipped": skipped, "files_already_archived": already, "first_keys": first, **requests}


KiB = 1024
# S3 Glacier Flexible Retrieval and Deep Archive bill every object 40 KiB more than its bytes:
# 32 KiB of index at the archive class's rate, 8 KiB of name and metadata at STANDARD's.
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
ARCHIVE_OVERHEAD = 32 * KiB
STANDARD_OVERHEAD = 8 * KiB
# AWS's published price of PUT-class requests into DEEP_ARCHIVE (noted 2026-12-06; prices change).
PUT_PRICE_PER_1000 = {"DEEP_ARCHIVE": 0.05}
PRICE_NOTE = "AWS's published price noted 2026-12-06; check the S3 pricing page"


@dataclass
class Requests:
    """Objects and requests of one way of sending the files: a PutObject per object up to the
    part size, CreateMultipartUpload + a request per part + CompleteMultipartUpload above."""

    objects: int = 0
    requests: int = 0
    multipart_objects: int = 0

    def add(self, size: int, part_size: int, *, multipart: bool) -> None:
        self.objects += 1
        if multipart:
            self.multipart_objects += 1
            self.requests += -(-size // part_size) + 2
        else:
            self.requests += 1


class RequestPlan:
    """The requests a batch's files take, unpacked and packed. Small files are laid out into
    shards as the upload does (:class:`archup.packing.ShardPlanner`, in key order): they are
    kept in key order in a private temporary SQLite file meanwhile (the scan yields them in
    walk order), so a million files do not sit in memory."""

    _BATCH = 1000

    def __init__(self, part_size: int, pack_under: int | None, shard_size: int) -> None:
        self.part_size = part_size
        self.pack_under = pack_under
        self.shard_size = shard_size
        self.unpacked = Requests()
        self.packed = Requests()
        self.shards = 0
        self.files_packed = 0
        self._db: Any = None
        self._pending: list[tuple[bytes, str, int, int]] = []

    def __enter__(self) -> RequestPlan:
        if self.pack_under is not None:
            import sqlite3

            self._db = sqlite3.connect("")  # "": a private temporary file, deleted on close
            self._db.execute("CREATE TABLE small (key BLOB, path TEXT, size INTEGER, mtime_ns INTEGER)")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._db is not None:
            self._db.close()

    def _file(self, size: int, packed: bool) -> None:
        from .multipart import part_size_for

        multipart = size >= self.part_size
        part_size = part_size_for(size, self.part_size) if multipart else self.part_size
        self.unpacked.add(size, part_size, multipart=multipart)
        if not packed:
            self.packed.add(size, part_size, multipart=multipart)

    def add(self, key: str, rel_path: str, size: int, mtime_ns: int) -> None:
        small = self.pack_under is not None and size < self.pack_under
        self._file(size, small)
        if small:
            # Bytes, so names with undecodable bytes sort as the journal's keys do (UTF-8 bytes).
            self._pending.append((key.encode("utf-8", "surrogateescape"), rel_path, size, mtime_ns))
            if len(self._pending) >= self._BATCH:
                self._flush()

    def _flush(self) -> None:
        self._db.executemany("INSERT INTO small VALUES (?, ?, ?, ?)", self._pending)
        self._pending.clear()

    def _lay_out(self) -> None:
        from .packing import ShardPlanner, layout_of

        def shard(members: list[FileRecord], heads: list[bytes] | None = None) -> None:
            size = layout_of(members, heads).size
            self.shards += 1
            self.files_packed += len(members)
            self.packed.add(size, self.part_size, multipart=size > self.part_size)

        self._flush()
        planner = ShardPlanner(self.shard_size, shard)
        for key, rel_path, size, mtime_ns in self._db.execute("SELECT key, path, size, mtime_ns FROM small "
                                                             "ORDER BY key"):
            planner.add(FileRecord("", rel_path, key.decode("utf-8", "surrogateescape"), size, mtime_ns,
                                   FileState.PENDING, None, None, None, None, None, 0, ""))
        planner.flush()

    def report(self, storage_class: str | None) -> dict[str, Any]:
        """``unpacked``; with --pack-under ``packed``; in GLACIER or DEEP_ARCHIVE ``archive_overhead``."""
        document: dict[str, Any] = {"unpacked": vars(self.unpacked).copy()}
        if self.pack_under is not None:
            self._lay_out()
            document["packed"] = {**vars(self.packed), "shards": self.shards, "files_packed": self.files_packed,
                                  "pack_under": self.pack_under, "shard_size": self.shard_size}
        if storage_class in ARCHIVE_CLASSES:
            document["archive_overhead"] = self._overhead(storage_class)
        return document

    def _overhead(self, storage_class: str) -> dict[str, Any]:
        per_object = ARCHIVE_OVERHEAD + STANDARD_OVERHEAD
        packed = self.packed.objects if self.pack_under is not None else self.unpacked.objects
        avoided = self.unpacked.objects - packed
        requests_avoided = self.unpacked.requests - (self.packed.requests if self.pack_under is not None
                                                     else self.unpacked.requests)
        price = PUT_PRICE_PER_1000.get(storage_class)
        return {
            "storage_class": storage_class,
            "bytes_per_object": per_object,
            "unpacked_bytes": self.unpacked.objects * per_object,
            "packed_bytes": packed * per_object,
            "objects_avoided": avoided,
            "bytes_avoided": avoided * per_object,
            "archive_rate_bytes_avoided": avoided * ARCHIVE_OVERHEAD,
            "standard_rate_bytes_avoided": avoided * STANDARD_OVERHEAD,
            "requests_avoided": requests_avoided,
            # One-time, not monthly: the requests' price (where known), in US dollars.
            "request_usd_avoided": round(requests_avoided * price / 1000, 6) if price is not None else None,
            "request_usd_per_1000": price,
            "price_note": PRICE_NOTE if price is not None else None,
        }


def read_only(open_reader: Callable[[], Journal]) -> Iterator[Journal | None]:
    """A read-only journal for the dry run: None if it is of another schema version (counted
    as nothing archived; a dry run never upgrades it)."""
    try:
        reader = open_reader()
    except JournalError as error:
        log.warning("--dry-run --skip-archived: %s; counting nothing as archived", error)
        yield None
        return
    try:
        yield reader
    finally:
        reader.close()
