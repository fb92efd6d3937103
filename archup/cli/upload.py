"""archup upload: create (or continue) a batch, upload a directory, finalize."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from ..batches import find_resumable, write_marker
from ..errors import BatchClosed, BatchIncomplete, Interrupted, JournalError, UsageError
from ..finalize import finalize
from ..journal import BatchRecord, BatchSettings, Journal, default_journal_path, resume_command
from ..lock import BatchLock, source_lock
from ..scan import UNREADABLE_REASONS, ScanItem, display_path, object_key, scan, scan_list
from ..select import Selector, read_files_from
from ..states import BatchState, FileState
from ..store import ChecksumMode, S3Store, StoreConfig
from ..uploader import MIN_PART_SIZE, Uploader, UploadOptions, UploadResult
from .common import (
    BatchArgument,
    EndpointOption,
    JournalOption,
    JsonOption,
    ProfileOption,
    RegionOption,
    check_batch_id,
    emit_json,
    handles_errors,
    json_missing,
    missing_journal,
    open_journal,
    parse_size,
    print_fields,
    resolve_endpoint,
    store_for_batch,
)
from .progress import RichProgress

log = logging.getLogger("archup.cli")

MAX_PARALLEL = 256
MAX_PART_SIZE = 5 * 1024 ** 3
SHOW_AT_MOST = 20


def normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip().lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if any(segment in (".", "..") for segment in prefix.split("/")[:-1]):
        raise UsageError(f"bad prefix {prefix!r}: '.' and '..' segments are not allowed")
    return prefix


DEFAULT_GRACE = 30.0


class Stopping:
    """SIGINT/SIGTERM for a whole command. The first: stop taking new work (``stop``); what is
    in flight finishes, and the command ends with exit 130 and how to resume, at most
    ``grace`` seconds later. A second signal, or the grace running out, exits 130 at once:
    every journal write is one transaction, so the batch is as safe to resume as after kill -9."""

    def __init__(self, grace: float, as_json: bool = False) -> None:
        self.stop = threading.Event()  # also set by the uploader itself on a fatal error
        self.grace = grace
        self.as_json = as_json
        self.hint: str | None = None  # the resume command, once the batch is known
        self._signalled = False
        self._timer: threading.Timer | None = None

    def _exit_now(self, why: str) -> None:
        message = f"archup: error: {why}; exiting now"
        if self.hint:
            message += f", the batch is safe to resume with '{self.hint}'"
        os.write(2, (message + "\n").encode("utf-8", "replace"))
        if self.as_json and json_missing():  # --json: one object on stdout, whatever ends the run
            error = message.removeprefix("archup: error: ")
            os.write(1, (json.dumps({"error": error, "exit_code": 130}, ensure_ascii=False) + "\n").encode())
        os._exit(130)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self._signalled:
            self._exit_now("second signal")
        self._signalled = True
        self.stop.set()
        print(f"archup: stopping: finishing the requests in flight (a second signal, or {self.grace:g} s, "
              "exits at once)", file=sys.stderr)
        self._timer = threading.Timer(self.grace, self._exit_now,
                                      args=(f"requests still in flight {self.grace:g} s after the signal",))
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


@contextmanager
def stop_on_signals(grace: float = DEFAULT_GRACE, as_json: bool = False) -> Iterator[Stopping]:
    stopping = Stopping(grace, as_json)
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return
    previous = {sig: signal.signal(sig, stopping.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopping
    finally:
        stopping.cancel()
        for sig, old in previous.items():
            signal.signal(sig, old)


def _partial_report(journal: Journal, batch_id: str, result: UploadResult, hint: str) -> dict[str, object]:
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


def _run(journal: Journal, store: S3Store, batch_id: str, options: UploadOptions, *, resumed: bool,
         show_bar: bool, stop: threading.Event) -> UploadResult:
    """The scan and the upload, in a thread of their own. The main thread only waits, in
    short steps: the kernel may hand a SIGINT to any thread, and Python runs its handler in
    the main thread only once that thread wakes; blocked in a join for a part in flight, it
    could sleep through a signal for minutes."""
    outcome: list[UploadResult] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            outcome.append(_scan_and_send(journal, store, batch_id, options, resumed=resumed, show_bar=show_bar,
                                          stop=stop))
        except BaseException as error:  # handed to the main thread below
            failure.append(error)

    worker = threading.Thread(target=work, name="archup-run", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if failure:
        raise failure[0]
    return outcome[0]


def _scan_and_send(journal: Journal, store: S3Store, batch_id: str, options: UploadOptions, *, resumed: bool,
                   show_bar: bool, stop: threading.Event) -> UploadResult:
    uploader = Uploader(journal, store, batch_id, options, stop=stop)
    if resumed:
        uploader.sweep_orphan_uploads()
        uploader.settle_lost_puts()
    uploader.scan()
    if not show_bar:
        return uploader.send()
    state = journal.get_state(batch_id)
    done = (FileState.UPLOADED, FileState.SKIPPED)
    with RichProgress(state.bytes_total - sum(state.bytes_by_state[s] for s in done),
                      state.files_total - sum(state.counts[s] for s in done)) as bar:
        uploader.observer = bar
        return uploader.send()


# S3's storage classes; another name is refused as a typo (every file would fail on it).
STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", "GLACIER",
                   "DEEP_ARCHIVE", "REDUCED_REDUNDANCY", "EXPRESS_ONEZONE")


class RetryMode(str, Enum):
    STANDARD = "standard"
    ADAPTIVE = "adaptive"


RetryModeOption = Annotated[RetryMode, typer.Option(
    "--retry-mode", help="standard, or adaptive (also slows down on 503 SlowDown / 429).")]


def parse_pairs(option: str, values: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} {value!r}: expected key=value")
        if not (key + item).isascii():
            raise UsageError(f"{option} {value!r}: S3 accepts only ASCII here")
        pairs.append((key.strip(), item))
    return pairs


def _read_only_journal(journal_path: Path | None) -> Journal | None:
    """The journal, for --dry-run --skip-archived to read: None if there is none yet, or it is
    of another schema version (counted as nothing archived; a dry run never upgrades it)."""
    path = journal_path or default_journal_path()
    if missing_journal(path) is not None:
        return None
    try:
        return Journal(path, read_only=True)
    except JournalError as error:
        log.warning("--dry-run --skip-archived: %s; counting nothing as archived", error)
        return None


def _dry_run(source: str, prefix: str, selector: Selector, listed: tuple[str, ...] | None, as_json: bool,
             follow_symlinks: bool, archived: Callable[[ScanItem], bool] | None = None) -> None:
    """Scan with the selection applied and say what an upload would send; no bucket, and the
    journal only read (``archived``: --skip-archived's lookup, when there is a journal)."""
    select = selector if selector.active else None
    items = (scan_list(source, listed, select, follow_symlinks=follow_symlinks) if listed is not None
             else scan(source, select, follow_symlinks=follow_symlinks))
    count = total = skipped = already = 0
    first: list[str] = []
    for item in items:
        if item.skip_reason:
            skipped += 1
            continue
        if archived is not None and archived(item):
            already += 1
            continue
        count += 1
        total += item.size
        if len(first) < SHOW_AT_MOST:
            first.append(display_path(object_key(f"{prefix}<BATCH>/", item.rel_path)))
    report = {"dry_run": True, "source_root": source, "files": count, "bytes": total,
              "files_skipped": skipped, "files_already_archived": already, "first_keys": first}
    if as_json:
        emit_json(report)
        return
    print(f"would upload {count} file(s), {total} bytes, from {source} ({skipped} skipped"
          + (f", {already} already archived" if already else "") + ")")
    for key in first:
        print(f"  {key}")
    if count > len(first):
        print(f"  ... and {count - len(first)} more")


def _check_run_limits(retries: int, timeout: float, connect_timeout: float, grace: float) -> None:
    if not 0 <= retries <= 50:
        raise UsageError(f"--retries {retries}: must be between 0 and 50")
    for name, value in (("--timeout", timeout), ("--connect-timeout", connect_timeout), ("--grace", grace)):
        if not 0 < value <= 3600:
            raise UsageError(f"{name} {value:g}: must be more than 0 and at most 3600 seconds")


def _check_parallel(parallel: int) -> None:
    if not 1 <= parallel <= MAX_PARALLEL:
        raise UsageError(f"--parallel {parallel}: must be between 1 and {MAX_PARALLEL}")


ParallelOption = Annotated[int, typer.Option("--parallel", "-p", envvar="ARCHUP_PARALLEL",
                                             help="Concurrent requests (threads).")]
NoFinalizeOption = Annotated[bool, typer.Option("--no-finalize", help="Upload only; finalize later.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")]
ChecksumOption = Annotated[ChecksumMode, typer.Option(
    "--checksum", help="Integrity check sent with every request (sha256, crc32, md5, none).")]
FullObjectOption = Annotated[bool, typer.Option(
    "--full-object-checksum/--no-full-object-checksum",
    help="Multipart objects keep a CRC32 of the whole object, checked by the server at completion "
    "(with --checksum sha256 or crc32); off for endpoints that reject ChecksumType FULL_OBJECT.")]
GraceOption = Annotated[float, typer.Option(
    "--grace", help="Seconds a first SIGINT/SIGTERM leaves the requests in flight to finish before "
    "archup exits 130 at once (a second signal exits at once).")]
RetriesOption = Annotated[int, typer.Option("--retries", help="Retries of a failed request (botocore).")]
BwlimitOption = Annotated[str | None, typer.Option(
    "--bwlimit", help="Average upload bandwidth limit in bytes per second (e.g. 10MiB).", show_default=False)]
TimeoutOption = Annotated[float, typer.Option(
    "--timeout", help="Seconds to wait for an answer to a request before it counts as failed and is retried "
    "(the read timeout).")]
ConnectTimeoutOption = Annotated[float, typer.Option(
    "--connect-timeout", help="Seconds to wait for a connection to the endpoint.")]
FollowOption = Annotated[bool, typer.Option(
    "--follow-symlinks", help="Take a symlink to a file or directory inside DIR as what it points to; "
    "links out of DIR, dangling links and loops are skipped. A batch keeps the choice it was started with.")]
PrehashOption = Annotated[bool, typer.Option(
    "--prehash/--no-prehash",
    help="Hash each multipart file before sending it, so its object metadata carries its SHA-256 "
    "(a second read of large files, as rclone does).")]


@handles_errors
def upload(
    directory: Annotated[Path, typer.Argument(help="Directory to upload.", metavar="DIR", show_default=False)],
    parallel: ParallelOption = 5,
    bucket: Annotated[str | None, typer.Option("--bucket", envvar="ARCHUP_BUCKET",
                                               help="Destination bucket.", show_default=False)] = None,
    endpoint_url: EndpointOption = None,
    profile: ProfileOption = None,
    region: RegionOption = None,
    prefix: Annotated[str, typer.Option("--prefix", envvar="ARCHUP_PREFIX",
                                        help="Key prefix; the batch goes under <prefix><BATCH>/.")] = "staging/",
    part_size: Annotated[str, typer.Option("--part-size", help="Multipart part size (and threshold); grown "
                                           "automatically so no file needs more than 10,000 parts.")] = "8MiB",
    checksum: ChecksumOption = ChecksumMode.SHA256,
    full_object_checksum: FullObjectOption = True,
    prehash: PrehashOption = True,
    batch: Annotated[str | None, typer.Option("--batch", help="Continue this unfinished batch.",
                                              show_default=False)] = None,
    new_batch: Annotated[bool, typer.Option("--new-batch", help="Start a new batch even if an unfinished "
                                            "one of this source and destination exists.")] = False,
    no_finalize: NoFinalizeOption = False,
    include: Annotated[list[str] | None, typer.Option(
        "--include", help="Only files matching this glob (repeatable).", show_default=False)] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", help="Leave out files matching this glob (repeatable).", show_default=False)] = None,
    files_from: Annotated[Path | None, typer.Option(
        "--files-from", help="Only the relative paths listed in this file, one a line.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be uploaded; touch neither "
                                          "bucket nor journal.")] = False,
    follow_symlinks: FollowOption = False,
    skip_archived: Annotated[bool, typer.Option(
        "--skip-archived", help="Skip files unchanged (path, size, mtime) since an earlier finalized batch "
        "of this source to this destination.")] = False,
    storage_class: Annotated[str | None, typer.Option(
        "--storage-class", help="STANDARD, STANDARD_IA, GLACIER_IR, GLACIER, DEEP_ARCHIVE, ...",
        show_default=False)] = None,
    sse: Annotated[str | None, typer.Option("--sse", help="Server-side encryption: AES256 or aws:kms.",
                                            show_default=False)] = None,
    sse_kms_key_id: Annotated[str | None, typer.Option("--sse-kms-key-id", help="KMS key for --sse aws:kms.",
                                                       show_default=False)] = None,
    metadata: Annotated[list[str] | None, typer.Option(
        "--metadata", help="User metadata k=v on every file object (repeatable).", show_default=False)] = None,
    tag: Annotated[list[str] | None, typer.Option(
        "--tag", help="Object tag k=v on every file object (repeatable).", show_default=False)] = None,
    bwlimit: BwlimitOption = None,
    retries: RetriesOption = 4,
    timeout: TimeoutOption = 60.0,
    connect_timeout: ConnectTimeoutOption = 10.0,
    retry_mode: RetryModeOption = RetryMode.STANDARD,
    grace: GraceOption = DEFAULT_GRACE,
    quiet: QuietOption = False,
    journal_path: JournalOption = None,
    json_output: JsonOption = False,
) -> None:
    """Upload DIR as one batch under <prefix><BATCH>/, then finalize it (write the manifest).

    An unfinished batch of the same source and destination is resumed instead
    of starting over (--new-batch starts a new one).
    """
    if not directory.exists():
        raise UsageError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    _check_parallel(parallel)
    part_bytes = parse_size(part_size)
    if not MIN_PART_SIZE <= part_bytes <= MAX_PART_SIZE:
        raise UsageError(f"--part-size {part_size}: must be between 5MiB and 5GiB (S3's part limits)")
    if batch and new_batch:
        raise UsageError("--batch and --new-batch exclude each other")
    _check_run_limits(retries, timeout, connect_timeout, grace)
    if sse is not None and sse not in ("AES256", "aws:kms", "aws:kms:dsse"):
        raise UsageError(f"--sse {sse}: use AES256 or aws:kms")
    if sse_kms_key_id and sse not in ("aws:kms", "aws:kms:dsse"):
        raise UsageError("--sse-kms-key-id needs --sse aws:kms")
    if storage_class is not None:
        storage_class = storage_class.upper()
        if storage_class not in STORAGE_CLASSES:
            raise UsageError(f"--storage-class {storage_class}: unknown; use one of {', '.join(STORAGE_CLASSES)}")
    source = str(directory.resolve())
    key_prefix = normalize_prefix(prefix)
    selector = Selector(include or (), exclude or ())
    listed = tuple(read_files_from(files_from)) if files_from else None
    wanted = BatchSettings(
        includes=tuple(include or ()), excludes=tuple(exclude or ()), files_from=listed,
        skip_archived=skip_archived, follow_symlinks=follow_symlinks, storage_class=storage_class, sse=sse,
        sse_kms_key_id=sse_kms_key_id, metadata=tuple(parse_pairs("--metadata", metadata or [])),
        tags=tuple(parse_pairs("--tag", tag or [])), checksum=checksum.value,
        full_object_checksum=full_object_checksum)
    if dry_run:
        reader = _read_only_journal(journal_path) if skip_archived and bucket else None
        archive = (source, bucket or "", key_prefix, resolve_endpoint(endpoint_url))
        try:
            _dry_run(source, key_prefix, selector, listed, json_output, follow_symlinks,
                     None if reader is None else lambda item: reader.archived_at(
                         archive, item.rel_path, item.size, item.mtime_ns) is not None)
        finally:
            if reader is not None:
                reader.close()
        return
    if not bucket:
        raise UsageError("no bucket: pass --bucket or set ARCHUP_BUCKET")
    endpoint = resolve_endpoint(endpoint_url)
    with stop_on_signals(grace, json_output) as stopping:
        store = S3Store(StoreConfig(
            bucket=bucket, endpoint_url=endpoint, region=region, profile=profile,
            max_pool_connections=max(10, parallel + 4), checksum=checksum, full_object_checksum=full_object_checksum,
            max_attempts=retries + 1, read_timeout=timeout, connect_timeout=connect_timeout,
            retry_mode=retry_mode.value, bwlimit=parse_size(bwlimit) if bwlimit else None))
        store.check_bucket()
        talk = not (quiet or json_output)

        with open_journal(journal_path) as journal, \
                source_lock(journal.path, source, bucket, key_prefix, endpoint):
            record: BatchRecord | None
            if batch:
                record = journal.get_batch(check_batch_id(batch))
                if record.source_root != source:
                    raise UsageError(f"batch {record.batch_id} archives {record.source_root}, not {source}")
                if (record.bucket, record.prefix, record.endpoint_url) != (bucket, key_prefix, endpoint):
                    raise UsageError(f"batch {record.batch_id} goes to s3://{record.bucket}/{record.prefix} at "
                                     f"{record.endpoint_url or 'AWS'}, not s3://{bucket}/{key_prefix} at "
                                     f"{endpoint or 'AWS'}; 'archup resume {record.batch_id}' takes its own")
            else:
                record = None if new_batch else find_resumable(journal, source, bucket, key_prefix, endpoint)
                if record is not None and talk:
                    print(f"archup: resuming unfinished batch {record.batch_id} of {source} "
                          "(--new-batch starts a new one)", file=sys.stderr)
            if record is None:
                from ulid import ULID  # here, not at the top: only a new batch needs it

                record = journal.init_batch(str(ULID()), source_root=source, bucket=bucket, prefix=key_prefix,
                                            part_size=part_bytes, endpoint_url=endpoint, region=region,
                                            settings=wanted)
                resumed = False
            else:
                resumed = True
            with BatchLock(journal.path, record.batch_id):
                _upload_batch(journal, store, journal.get_batch(record.batch_id), parallel=parallel,
                              resumed=resumed, no_finalize=no_finalize, quiet=quiet, json_output=json_output,
                              prehash=prehash, wanted=wanted, wanted_part_size=part_bytes, profile=profile,
                              stopping=stopping)


@handles_errors
def resume(
    batch_id: BatchArgument,
    parallel: ParallelOption = 5,
    endpoint_url: EndpointOption = None,
    profile: ProfileOption = None,
    region: RegionOption = None,
    checksum: Annotated[ChecksumMode | None, typer.Option(
        "--checksum", help="Integrity check sent with every request (sha256, crc32, md5, none) "
        "[default: as the batch was started]", show_default=False)] = None,
    full_object_checksum: Annotated[bool | None, typer.Option(
        "--full-object-checksum/--no-full-object-checksum",
        help="Full-object CRC32 on new multipart uploads [default: as the batch was started]",
        show_default=False)] = None,
    prehash: PrehashOption = True,
    retries: RetriesOption = 4,
    retry_mode: RetryModeOption = RetryMode.STANDARD,
    bwlimit: BwlimitOption = None,
    timeout: TimeoutOption = 60.0,
    connect_timeout: ConnectTimeoutOption = 10.0,
    grace: GraceOption = DEFAULT_GRACE,
    no_finalize: NoFinalizeOption = False,
    quiet: QuietOption = False,
    journal_path: JournalOption = None,
    json_output: JsonOption = False,
) -> None:
    """Continue an unfinished batch from its journal (same source and destination), then finalize it."""
    _check_parallel(parallel)
    _check_run_limits(retries, timeout, connect_timeout, grace)
    batch_id = check_batch_id(batch_id)
    with stop_on_signals(grace, json_output) as stopping:
        with open_journal(journal_path) as journal:
            record = journal.get_batch(batch_id)
            if not os.path.isdir(record.source_root):
                raise UsageError(f"batch {batch_id} archives {record.source_root}, which is not a directory now")
            chosen = {name: value for name, value in (("checksum", checksum),
                                                      ("full_object_checksum", full_object_checksum))
                      if value is not None}
            store = store_for_batch(record, endpoint_url, profile, region, max_pool_connections=max(10, parallel + 4),
                                    read_timeout=timeout, connect_timeout=connect_timeout, max_attempts=retries + 1,
                                    retry_mode=retry_mode.value, bwlimit=parse_size(bwlimit) if bwlimit else None,
                                    **chosen)
            store.check_bucket()
            with BatchLock(journal.path, batch_id):
                _upload_batch(journal, store, journal.get_batch(batch_id), parallel=parallel, resumed=True,
                              no_finalize=no_finalize, quiet=quiet, json_output=json_output,
                              prehash=prehash, profile=profile, stopping=stopping)


def _name_skipped(journal: Journal, batch_id: str) -> None:
    """The files skipped by policy or unreadable, named (first 20 and a count); the files
    --skip-archived found archived already are only counted."""
    state = journal.get_state(batch_id, problem_limit=SHOW_AT_MOST)
    archived = state.batch.files_archived
    if archived:
        print(f"archup: {archived} file(s) unchanged since an earlier batch, not sent again (--skip-archived)",
              file=sys.stderr)
    count = state.counts[FileState.SKIPPED]
    if not count:
        return
    print(f"archup: {count} file(s) skipped:", file=sys.stderr)
    for record in state.skipped:
        print(f"  skipped: {display_path(record.rel_path)}: {record.error}", file=sys.stderr)
    if count > len(state.skipped):
        print(f"  ... and {count - len(state.skipped)} more ('archup status {batch_id} --all' lists them)",
              file=sys.stderr)


def _unreadable(journal: Journal, batch_id: str) -> list[dict[str, str | None]]:
    """The first paths that could not be read (a policy skip is not among them)."""
    found: list[dict[str, str | None]] = []
    for record in journal.iter_files(batch_id, [FileState.SKIPPED]):
        if record.error and record.error.startswith(UNREADABLE_REASONS):
            found.append({"path": record.rel_path, "error": record.error})
            if len(found) == SHOW_AT_MOST:
                break
    return found


def _upload_batch(journal: Journal, store: S3Store, record: BatchRecord, *, parallel: int, resumed: bool,
                  no_finalize: bool, quiet: bool, json_output: bool, prehash: bool = True,
                  wanted: BatchSettings | None = None, wanted_part_size: int | None = None,
                  profile: str | None = None,
                  stopping: Stopping | None = None) -> None:
    """Upload (or continue) one batch while holding its lock, then finalize and report.

    The batch keeps the settings its first run chose (``record.settings``, its part size):
    which files, and how their objects are stored; ``wanted`` (this run's flags) only
    makes a note."""
    batch_id, source = record.batch_id, record.source_root
    talk = not (quiet or json_output)
    if record.settings is not None:
        settings = record.settings
    elif wanted is not None:
        # Begun by an archup that did not record its options: this run's (the job's) become its own.
        journal.set_batch_settings(batch_id, wanted)
        settings = wanted
    else:
        settings = BatchSettings()
        if talk and not record.state.terminal:
            print(f"archup: batch {batch_id} was begun by an older archup that did not record its options "
                  "(--include/--exclude, --follow-symlinks, archive options); 'archup upload' with the job's "
                  "options finishes it with them", file=sys.stderr)
    hint = resume_command(batch_id, journal.path, profile)
    stopping = stopping or Stopping(DEFAULT_GRACE)
    stopping.hint = hint
    # Every object of the batch stored alike, whichever run sends it.
    store.config = replace(store.config, storage_class=settings.storage_class, sse=settings.sse,
                           sse_kms_key_id=settings.sse_kms_key_id, user_metadata=settings.metadata,
                           tags=settings.tags)
    changed = settings.differences(wanted) if wanted is not None and resumed and settings is not wanted else []
    if resumed and wanted_part_size is not None and wanted_part_size != record.part_size:
        changed.append("part_size")
    if changed and talk:
        print(f"archup: batch {batch_id} keeps the options it was started with ({', '.join(changed)} differ "
              "this time; --new-batch starts one with these)", file=sys.stderr)
    if talk:
        print(f"archup: batch {batch_id}: uploading {source} to s3://{record.bucket}/{record.batch_prefix} "
              f"with {parallel} streams", file=sys.stderr)
    if record.state is BatchState.ENQUEUED:
        result = UploadResult(batch_id)  # already sealed: finalize below just reprints its summary
    elif record.state.terminal:
        raise BatchClosed(f"batch {batch_id} is {record.state.value}; start a new batch")
    elif stopping.stop.is_set():
        raise Interrupted(f"batch {batch_id} interrupted before it began; resume with '{hint}'")
    else:
        write_marker(store, record)
        selector = Selector(settings.includes, settings.excludes)
        options = UploadOptions(parallel=parallel, part_size=record.part_size, multipart_threshold=record.part_size,
                                select=selector if selector.active else None, files_from=settings.files_from,
                                skip_archived=settings.skip_archived, prehash=prehash,
                                follow_symlinks=settings.follow_symlinks)
        result = _run(journal, store, batch_id, options, resumed=resumed, show_bar=talk and sys.stderr.isatty(),
                      stop=stopping.stop)

    if talk:
        _name_skipped(journal, batch_id)
    if result.fatal is not None:
        raise result.fatal
    if result.interrupted:
        raise Interrupted(f"batch {batch_id} interrupted; resume with '{hint}'")
    if result.files_failed:
        report = _partial_report(journal, batch_id, result, hint)
        if json_output:
            emit_json(report)
        else:
            for path, error in result.failures[:SHOW_AT_MOST]:
                print(f"failed: {display_path(path)}: {display_path(error)}", file=sys.stderr)
            if result.files_failed > SHOW_AT_MOST:
                print(f"... and {result.files_failed - SHOW_AT_MOST} more failed", file=sys.stderr)
        raise BatchIncomplete(f"batch {batch_id}: {result.files_failed} file(s) failed; "
                              f"resume with '{hint}'")
    if no_finalize:
        report = _partial_report(journal, batch_id, result, hint)
        if json_output:
            emit_json(report)
        elif not quiet:
            print_fields([(k, v) for k, v in report.items() if k != "failures"])
        return
    summary = finalize(journal, store, batch_id).as_dict()
    summary["bytes_sent"] = result.bytes_sent
    unreadable = journal.count_skipped(batch_id, UNREADABLE_REASONS)
    summary["files_unreadable"] = unreadable
    summary["files_already_archived"] = journal.get_batch(batch_id).files_archived
    named = _unreadable(journal, batch_id) if unreadable else []
    if json_output:
        emit_json(summary | ({"unreadable": named} if named else {}))
    elif not quiet:
        print_fields(list(summary.items()))
    elif named:  # --quiet: errors only, and these are errors
        for item in named:
            print(f"unreadable: {display_path(str(item['path']))}: {item['error']}", file=sys.stderr)
        if unreadable > len(named):
            print(f"... and {unreadable - len(named)} more unreadable", file=sys.stderr)
    if unreadable:
        # Sealed with what could be read; the exit code still tells cron that something
        # that should be archived is not (as rclone and the AWS CLI do).
        raise BatchIncomplete(f"batch {batch_id} sealed without {unreadable} path(s) that could not be read "
                              f"(named above; 'archup status {batch_id} --all' lists them); make them readable and "
                              "run again (--skip-archived sends only what is missing)")
