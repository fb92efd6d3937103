"""archup upload and archup resume: parse, handle signals, render; the run is the library's."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from ..errors import ExitCode, UsageError
from ..journal import (
    DEFAULT_LEASE,
    BatchRecord,
    BatchSettings,
    Journal,
    SQLiteJournal,
    is_shared_location,
    open_journal_at,
)
from ..locations import journal_location
from ..scan import display_path
from ..select import read_files_from
from ..store import DEFAULT_TRANSPORT, ChecksumMode
from . import human
from .common import (
    Invocation,
    check_batch_id,
    emit_json,
    handles_errors,
    invocation,
    missing_journal,
    normalize_prefix,
    open_journal,
    parse_size,
    print_fields,
    transport,
)
from .metrics import MetricsFileOption, reports_metrics
from .options import (
    BatchArgument,
    BwlimitOption,
    ChecksumOption,
    ConnectTimeoutOption,
    EndpointOption,
    FollowOption,
    FullObjectOption,
    GraceOption,
    JournalOption,
    JsonOption,
    LeaseOption,
    NoFinalizeOption,
    ParallelOption,
    PrehashOption,
    ProfileOption,
    QuietOption,
    RegionOption,
    ResumeParallelOption,
    RetriesOption,
    RetryMode,
    RetryModeOption,
    SourceRootOption,
    TimeoutOption,
    TransportOption,
    TrustEndpointOption,
    complete_batch,
)

if TYPE_CHECKING:  # the sending modules load when a command sends, not for status or --help
    from ..outcomes import UploadObserver
    from ..run import RunOutcome, SkippedFiles

MAX_PARALLEL = 256
MAX_PART_SIZE = 5 * 1024 ** 3
DEFAULT_GRACE = 30.0
T = TypeVar("T")
# One at a time on the terminal: the 'stopping' note and a forced exit's clearing and last line.
# A second signal arriving while the note is written waits for it (at most NOTE_WAIT seconds),
# so the clearing never erases a note half written, and the run's own end waits for the note
# (its thread), so the note never comes after the run's last line or is cut off by the exit.
_NOTE_LOCK = threading.RLock()
NOTE_WAIT = 2.0


class Stopping:
    """SIGINT/SIGTERM for a whole command. The first: stop taking new work (``stop``); what is
    in flight finishes, and the command ends with exit 130 and how to resume, at most
    ``grace`` seconds later. A second signal, or the grace running out, exits 130 at once:
    every journal write is one transaction, so the batch is as safe to resume as after kill -9.
    That forced exit (``os._exit``) is the one place archup leaves without unwinding."""

    def __init__(self, grace: float, as_json: bool = False, run_state: Invocation | None = None) -> None:
        self.stop = threading.Event()  # also set by the uploader itself on a fatal error
        self.grace = grace
        self.as_json = as_json
        self.hint: str | None = None  # the resume command, once the batch is known
        # The timer thread has no click context: the invocation is handed over here.
        self._invocation = run_state or invocation()
        self._signalled = False
        self._timer: threading.Timer | None = None
        self._note: threading.Thread | None = None

    def _exit_now(self, why: str) -> None:
        # Never released: os._exit below. If the note cannot be had in time, exit all the same.
        _NOTE_LOCK.acquire(timeout=NOTE_WAIT)
        _clear_terminal()  # no frame of the bar, no echoed '^C', before the last line
        message = f"archup: error: {why}; exiting now"
        if self.hint:
            message += f", the batch is safe to resume with '{self.hint}'"
        os.write(2, (message + "\n").encode("utf-8", "replace"))
        code = int(ExitCode.INTERRUPTED)
        if self.as_json and not self._invocation.json_emitted:  # --json: one object on stdout, whatever ends the run
            error = message.removeprefix("archup: error: ")
            os.write(1, (json.dumps({"error": error, "exit_code": code}, ensure_ascii=False) + "\n").encode())
        os._exit(code)

    @property
    def signalled(self) -> bool:
        return self._signalled

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self._signalled:
            if self._invocation.last_error is not None:
                # The command's last line is being written (report_error sets last_error first):
                # the process is ending with its code anyway, and a second error line would
                # follow the last one. main() ignores signals once the command is done.
                return
            self._exit_now("second signal")
        self._signalled = True
        self._invocation.signalled = True
        self.stop.set()
        # Printed by a thread of its own: a second signal arriving in the middle of this
        # print would otherwise interrupt it in this thread and clear the bar under it.
        self._note = threading.Thread(target=_say, name="archup-stopping", daemon=True, args=(
            f"archup: stopping: finishing the requests in flight (a second signal, or {self.grace:g} s, "
            "exits at once)",))
        self._note.start()
        self._timer = threading.Timer(self.grace, self._exit_now,
                                      args=(f"requests still in flight {self.grace:g} s after the signal",))
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def settle(self) -> None:
        """The run ended on its own: no forced exit any more, and the 'stopping' note is out
        before the run's last line (its thread, a daemon, would otherwise be cut off by the
        process's exit, or print after that line)."""
        self.cancel()
        if self._note is not None:
            self._note.join(NOTE_WAIT)


def _live_display() -> ModuleType | None:
    """archup.cli.progress if a run loaded it (a terminal's bar): never imported for cron."""
    return sys.modules.get(f"{__package__}.progress")


def _say(line: str) -> None:
    """A note on a line of its own, above the progress bar if one is drawn; written whole
    before a forced exit may clear the terminal (:data:`_NOTE_LOCK`)."""
    with _NOTE_LOCK:
        display = _live_display()
        if display is not None:
            display.say(line)
        else:
            sys.stderr.write(line + "\n")  # one write: the line and its end together
            sys.stderr.flush()


def _clear_terminal() -> None:
    display = _live_display()
    if display is not None:
        display.clear()
    elif sys.stderr.isatty():
        os.write(2, b"\r\x1b[K")  # over the '^C' the terminal echoed


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
        stopping.settle()
        if not stopping.signalled:
            for sig, old in previous.items():
                signal.signal(sig, old)
        # Once signalled, the handler stays to the process's end: a second signal while the
        # last lines are written still exits 130 at once, with its one line, rather than the
        # default action killing the process between the live area and the error line.


_FROZEN_AT_EXIT = False


def freeze_heap_at_exit() -> None:
    """When this process ends, take every object still alive out of the collector's reach
    first (``gc.freeze`` as an atexit handler, which runs before the interpreter tears down).

    Interpreter shutdown runs full collections over the whole heap, and with botocore's
    models loaded they cost a run 0.2-0.8 s of wall time on the (loaded) benchmark machine
    (exit after a 3-byte upload to moto: 461 ms without, 68 ms with, medians of 5; after
    4 x 64 MiB: 212-763 ms without, 27-105 ms with). All they would find is the process's
    last garbage, whose memory its exit gives back anyway: the journal, the files read and
    the metrics file are closed explicitly before, and objects outside reference cycles are
    still freed one by one. Registered once a process; a test that runs the command
    in-process freezes its heap only at its own end."""
    global _FROZEN_AT_EXIT
    if _FROZEN_AT_EXIT:
        return
    _FROZEN_AT_EXIT = True
    import atexit
    import gc

    atexit.register(gc.freeze)


def in_worker(work: Callable[[], T]) -> T:
    """Run the library's entry point in a thread of its own while this one only waits, in
    short steps: the kernel may hand a SIGINT to any thread, and Python runs its handler in
    the main thread only once that thread wakes; blocked in a join for a part in flight, it
    could sleep through a signal for minutes."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            outcome.append(work())
        except BaseException as error:  # handed to the main thread below
            failure.append(error)

    worker = threading.Thread(target=body, name="archup-run", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if failure:
        raise failure[0]
    return outcome[0]


class Talk:
    """The run's notes on stderr for a person or a cron mail; silent with --quiet and --json."""

    def __init__(self, talk: bool, stopping: Stopping) -> None:
        self.talk = talk
        self.stopping = stopping
        self.named: set[str] = set()  # failed files the live display named already

    def _say(self, line: str) -> None:
        if self.talk:
            _say(line)

    def resuming(self, batch: BatchRecord) -> None:
        self._say(f"archup: resuming unfinished batch {batch.batch_id} of {batch.source_root} "
                  "(--new-batch starts a new one)")

    def settings_unrecorded(self, batch: BatchRecord) -> None:
        self._say(f"archup: batch {batch.batch_id} was begun by an older archup that did not record its options "
                  "(--include/--exclude, --follow-symlinks, archive options); 'archup upload' with the job's "
                  "options finishes it with them")

    def options_kept(self, batch: BatchRecord, changed: list[str]) -> None:
        self._say(f"archup: batch {batch.batch_id} keeps the options it was started with ({', '.join(changed)} "
                  "differ this time; --new-batch starts one with these)")

    def starting(self, batch: BatchRecord, parallel: int, resume_hint: str) -> None:
        self.stopping.hint = resume_hint
        self._say(f"archup: batch {batch.batch_id}: uploading {batch.source_root} to "
                  f"s3://{batch.bucket}/{batch.batch_prefix} with {parallel} streams")

    def progress(self, files_todo: int, bytes_todo: int) -> AbstractContextManager[UploadObserver | None]:
        if self.talk and sys.stderr.isatty():
            from .progress import RichProgress

            return RichProgress(bytes_todo, files_todo, self.named)
        return nullcontext(None)

    def archived_before(self, batch: BatchRecord, earlier: BatchRecord) -> None:
        self._say(f"archup: batch {earlier.batch_id} already archived {batch.source_root} to "
                  f"s3://{batch.bucket}/{batch.prefix}; this batch sends every file again (a whole copy; "
                  "--skip-archived sends only files new or changed since)")

    def sent(self, skipped: SkippedFiles) -> None:
        """The files skipped by policy or unreadable, named (first 20 and a count); the files
        --skip-archived found archived already are only counted."""
        if skipped.archived:
            self._say(f"archup: {skipped.archived} file(s) unchanged since an earlier batch, not sent again "
                      "(--skip-archived)")
        if not skipped.count:
            return
        # Entries: a directory that could not be listed is among them, named as one.
        self._say(f"archup: {human.count(skipped.count, 'entry', 'entries')} skipped:")
        for record in skipped.first:
            self._say(f"  skipped: {display_path(record.rel_path)}: {record.error}")
        if skipped.count > len(skipped.first):
            self._say(f"  ... and {skipped.count - len(skipped.first)} more ('archup status {skipped.batch_id} "
                      "--all' lists them)")


def render(outcome: RunOutcome, *, quiet: bool, json_output: bool, named: set[str] | frozenset[str] = frozenset()
           ) -> None:
    """Print how the run ended, then raise its error (exit 3, 5, 130 ...), if any. ``named``:
    failed files the progress display named already (each is named once)."""
    from ..run import SHOW_AT_MOST

    invocation().outcome = outcome
    report = outcome.report
    if outcome.kind == "partial" and report is not None:
        if json_output:
            emit_json(report)
        else:
            for path, error in outcome.failures:
                if path in named:
                    continue
                print(f"failed: {display_path(path)}: {display_path(error)}", file=sys.stderr)
            if outcome.result.files_failed > SHOW_AT_MOST:
                print(f"... and {outcome.result.files_failed - SHOW_AT_MOST} more failed", file=sys.stderr)
    elif outcome.kind == "uploaded" and report is not None:
        if json_output:
            emit_json(report)
        elif not quiet:
            print_fields([(k, v) for k, v in report.items() if k != "failures"])
    elif outcome.kind == "finalized" and report is not None:
        if json_output:
            emit_json(report | ({"unreadable": outcome.unreadable} if outcome.unreadable else {}))
        elif not quiet:
            print_fields(list(report.items()))
        elif outcome.unreadable:  # --quiet: errors only, and these are errors
            for item in outcome.unreadable:
                print(f"unreadable: {display_path(str(item['path']))}: {item['error']}", file=sys.stderr)
            if outcome.unreadable_count > len(outcome.unreadable):
                print(f"... and {outcome.unreadable_count - len(outcome.unreadable)} more unreadable",
                      file=sys.stderr)
    if outcome.error is not None:
        raise outcome.error


# S3's storage classes; another name is refused as a typo (every file would fail on it).
STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", "GLACIER",
                   "DEEP_ARCHIVE", "REDUCED_REDUNDANCY", "EXPRESS_ONEZONE")


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


def _check_lease(lease: float) -> None:
    if not 1 <= lease <= 3600:
        raise UsageError(f"--lease {lease:g}: must be between 1 and 3600 seconds")


@contextmanager
def _read_only_journal(location: str | None) -> Iterator[Journal | None]:
    """The journal, for --dry-run --skip-archived to read: None if there is none yet."""
    from .. import run

    where = journal_location(location)
    if missing_journal(where) is not None:
        yield None
        return
    yield from run.read_only(lambda: open_journal_at(where) if is_shared_location(where)
                             else SQLiteJournal(where, read_only=True))


def _print_dry_run(report: dict) -> None:  # the dry run's JSON document
    count, first = int(report["files"]), list(report["first_keys"])
    already = int(report["files_already_archived"])
    print(f"would upload {human.count(count, 'file')}, {human.size(int(report['bytes']))}, "
          f"from {report['source_root']} "
          f"({report['files_skipped']} skipped" + (f", {already} already archived" if already else "") + ")")
    for key in first:
        print(f"  {key}")
    if count > len(first):
        print(f"  ... and {count - len(first)} more")

    def sending(plan: dict) -> str:
        parts = f", {plan['multipart_objects']} of them in parts" if plan["multipart_objects"] else ""
        return (f"{human.count(plan['objects'], 'object')} ({human.count(plan['requests'], 'request')}"
                f"{parts})")

    unpacked, packed = report["unpacked"], report.get("packed")
    print(f"each file an object: {sending(unpacked)}")
    if packed is not None:
        print(f"packed (under {human.size(packed['pack_under'])}, shards of about {human.size(packed['shard_size'])}): "
              f"{sending(packed)}: {human.count(packed['files_packed'], 'file')} in "
              f"{human.count(packed['shards'], 'shard')}")
    overhead = report.get("archive_overhead")
    if overhead is not None:
        ways = (f"{human.size(overhead['unpacked_bytes'])} each file an object"
                + (f", {human.size(overhead['packed_bytes'])} packed" if packed is not None else ""))
        print(f"{overhead['storage_class']} bills {human.size(overhead['bytes_per_object'])} more per object "
              f"(32 KiB at its rate, 8 KiB at STANDARD's): {ways}")
        if packed is not None:
            print(f"packing avoids {human.size(overhead['bytes_avoided'])} of billed overhead "
                  f"({human.size(overhead['archive_rate_bytes_avoided'])} at {overhead['storage_class']}'s rate, "
                  f"{human.size(overhead['standard_rate_bytes_avoided'])} at STANDARD's) and "
                  f"{human.count(overhead['requests_avoided'], 'request')}"
                  + (f", ${overhead['request_usd_avoided']:.4f} once at ${overhead['request_usd_per_1000']} "
                     f"per 1,000 requests ({overhead['price_note']})"
                     if overhead["request_usd_avoided"] is not None else ""))


def check_run_limits(retries: int, timeout: float, connect_timeout: float, grace: float) -> None:
    if not 0 <= retries <= 50:
        raise UsageError(f"--retries {retries}: must be between 0 and 50")
    for name, value in (("--timeout", timeout), ("--connect-timeout", connect_timeout), ("--grace", grace)):
        if not 0 < value <= 3600:
            raise UsageError(f"{name} {value:g}: must be more than 0 and at most 3600 seconds")


def _packing(pack_under: str | None, shard_size: str, part_bytes: int) -> dict[str, int | None]:
    """The batch settings --pack-under and --shard-size ask for (none without --pack-under)."""
    from ..packing import MAX_SHARD_SIZE, MIN_SHARD_SIZE

    if pack_under is None:
        return {}
    under = parse_size(pack_under)
    if not 1 <= under <= part_bytes:
        raise UsageError(f"--pack-under {pack_under}: must be more than 0 and at most the part size "
                         f"({human.size(part_bytes)}); larger files are sent in parts")
    size = parse_size(shard_size)
    if not MIN_SHARD_SIZE <= size <= MAX_SHARD_SIZE:
        raise UsageError(f"--shard-size {shard_size}: must be between 64KiB and 5GiB")
    if size < under:
        raise UsageError(f"--shard-size {shard_size} is smaller than --pack-under {pack_under}")
    return {"pack_under": under, "shard_size": size}


def _check_parallel(parallel: int) -> None:
    if not 1 <= parallel <= MAX_PARALLEL:
        raise UsageError(f"--parallel {parallel}: must be between 1 and {MAX_PARALLEL}")


@handles_errors
@reports_metrics("upload")
def upload(
    directory: Annotated[Path, typer.Argument(help="Directory to upload.", metavar="DIR", show_default=False)],
    parallel: ParallelOption = 5,
    bucket: Annotated[str | None, typer.Option("--bucket", envvar="ARCHUP_BUCKET",
                                               help="Destination bucket.", show_default=False)] = None,
    endpoint_url: EndpointOption = None,
    trust_recorded_endpoint: TrustEndpointOption = False,
    profile: ProfileOption = None,
    region: RegionOption = None,
    prefix: Annotated[str, typer.Option("--prefix", envvar="ARCHUP_PREFIX",
                                        help="Key prefix; the batch goes under <prefix><BATCH>/.")] = "staging/",
    part_size: Annotated[str, typer.Option("--part-size", help="Multipart part size (and threshold); grown "
                                           "automatically so no file needs more than 10,000 parts.")] = "8MiB",
    pack_under: Annotated[str | None, typer.Option(
        "--pack-under", help="Pack files smaller than this into tar shards (shards/NNNNNN.tar), each file "
        "still restorable on its own; at most the part size. [default: off]", show_default=False)] = None,
    shard_size: Annotated[str, typer.Option(
        "--shard-size", help="About this many bytes a shard (with --pack-under); larger than the part "
        "size, a shard is sent in parts.")] = "8MiB",
    checksum: ChecksumOption = ChecksumMode.SHA256,
    full_object_checksum: FullObjectOption = True,
    prehash: PrehashOption = False,
    batch: Annotated[str | None, typer.Option("--batch", help="Continue this unfinished batch.",
                                              autocompletion=complete_batch, show_default=False)] = None,
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
    transport_kind: TransportOption = DEFAULT_TRANSPORT,
    grace: GraceOption = DEFAULT_GRACE,
    quiet: QuietOption = False,
    metrics_file: MetricsFileOption = None,
    source_root: SourceRootOption = None,
    lease: LeaseOption = DEFAULT_LEASE,
    journal_path: JournalOption = None,
    json_output: JsonOption = False,
) -> None:
    """Upload DIR as one batch under <prefix><BATCH>/, then finalize it (write the manifest).

    An unfinished batch of the same source and destination is resumed instead
    of starting over (--new-batch starts a new one).
    """
    from .. import run
    from ..multipart import MIN_PART_SIZE
    from ..run import UploadRequest

    local = Path(source_root) if source_root else directory
    if not local.exists():
        raise UsageError(f"{local}: no such directory")
    if not local.is_dir():
        raise UsageError(f"{local}: not a directory")
    _check_lease(lease)
    _check_parallel(parallel)
    part_bytes = parse_size(part_size)
    if not MIN_PART_SIZE <= part_bytes <= MAX_PART_SIZE:
        raise UsageError(f"--part-size {part_size}: must be between 5MiB and 5GiB (S3's part limits)")
    packing = _packing(pack_under, shard_size, part_bytes)
    if batch and new_batch:
        raise UsageError("--batch and --new-batch exclude each other")
    check_run_limits(retries, timeout, connect_timeout, grace)
    if sse is not None and sse not in ("AES256", "aws:kms", "aws:kms:dsse"):
        raise UsageError(f"--sse {sse}: use AES256 or aws:kms")
    if sse_kms_key_id and sse not in ("aws:kms", "aws:kms:dsse"):
        raise UsageError("--sse-kms-key-id needs --sse aws:kms")
    if storage_class is not None:
        storage_class = storage_class.upper()
        if storage_class not in STORAGE_CLASSES:
            raise UsageError(f"--storage-class {storage_class}: unknown; use one of {', '.join(STORAGE_CLASSES)}")
    listed = tuple(read_files_from(files_from)) if files_from else None
    wanted = BatchSettings(
        includes=tuple(include or ()), excludes=tuple(exclude or ()), files_from=listed,
        skip_archived=skip_archived, follow_symlinks=follow_symlinks, storage_class=storage_class, sse=sse,
        sse_kms_key_id=sse_kms_key_id, metadata=tuple(parse_pairs("--metadata", metadata or [])),
        tags=tuple(parse_pairs("--tag", tag or [])), checksum=checksum.value,
        full_object_checksum=full_object_checksum, parallel=parallel, **packing)
    request = UploadRequest(
        source_root=str(directory.resolve()) if source_root is None else os.path.abspath(directory),
        local_root=str(local.resolve()) if source_root else None, lease=lease,
        bucket=bucket or "", prefix=normalize_prefix(prefix),
        part_size=part_bytes, settings=wanted, parallel=parallel, prehash=prehash,
        batch_id=check_batch_id(batch) if batch else None, new_batch=new_batch, no_finalize=no_finalize,
        transport=transport(endpoint_url, profile, region, max_pool_connections=max(10, parallel + 4),
                            trust_recorded_endpoint=trust_recorded_endpoint,
                            checksum=checksum, full_object_checksum=full_object_checksum,
                            max_attempts=retries + 1, read_timeout=timeout, connect_timeout=connect_timeout,
                            retry_mode=retry_mode.value, bwlimit=parse_size(bwlimit) if bwlimit else None,
                            transport=transport_kind))
    if dry_run:
        report = run.dry_run(request, lambda: _read_only_journal(journal_path))
        if json_output:
            emit_json(report)
        else:
            _print_dry_run(report)
        return
    if not bucket:
        raise UsageError("no bucket: pass --bucket or set ARCHUP_BUCKET")
    freeze_heap_at_exit()
    with stop_on_signals(grace, json_output) as stopping, open_journal(journal_path) as journal:
        listener = Talk(not (quiet or json_output), stopping)
        outcome = in_worker(lambda: run.upload(journal, request, listener=listener, stop=stopping.stop,
                                                tally=metrics_file is not None))
    render(outcome, quiet=quiet, json_output=json_output, named=listener.named)


@handles_errors
@reports_metrics("resume")
def resume(
    batch_id: BatchArgument,
    parallel: ResumeParallelOption = None,
    endpoint_url: EndpointOption = None,
    trust_recorded_endpoint: TrustEndpointOption = False,
    profile: ProfileOption = None,
    region: RegionOption = None,
    checksum: Annotated[ChecksumMode | None, typer.Option(
        "--checksum", help="Integrity check sent with every request (sha256, crc32, md5, none) "
        "[default: as the batch was started]", show_default=False)] = None,
    full_object_checksum: Annotated[bool | None, typer.Option(
        "--full-object-checksum/--no-full-object-checksum",
        help="Full-object CRC64NVME (or CRC32) on new multipart uploads [default: as the batch was started]",
        show_default=False)] = None,
    prehash: PrehashOption = False,
    retries: RetriesOption = 4,
    retry_mode: RetryModeOption = RetryMode.STANDARD,
    transport_kind: TransportOption = DEFAULT_TRANSPORT,
    bwlimit: BwlimitOption = None,
    timeout: TimeoutOption = 60.0,
    connect_timeout: ConnectTimeoutOption = 10.0,
    grace: GraceOption = DEFAULT_GRACE,
    no_finalize: NoFinalizeOption = False,
    quiet: QuietOption = False,
    metrics_file: MetricsFileOption = None,
    source_root: SourceRootOption = None,
    lease: LeaseOption = DEFAULT_LEASE,
    journal_path: JournalOption = None,
    json_output: JsonOption = False,
) -> None:
    """Continue an unfinished batch from its journal (same source and destination), then finalize it."""
    from .. import run

    if parallel is not None:
        _check_parallel(parallel)
    check_run_limits(retries, timeout, connect_timeout, grace)
    _check_lease(lease)
    batch_id = check_batch_id(batch_id)
    how = transport(endpoint_url, profile, region, trust_recorded_endpoint=trust_recorded_endpoint,
                    max_pool_connections=max(10, (parallel or 0) + 4), read_timeout=timeout,
                    connect_timeout=connect_timeout, max_attempts=retries + 1, retry_mode=retry_mode.value,
                    bwlimit=parse_size(bwlimit) if bwlimit else None, checksum=checksum,
                    full_object_checksum=full_object_checksum, transport=transport_kind)
    freeze_heap_at_exit()
    with stop_on_signals(grace, json_output) as stopping, open_journal(journal_path) as journal:
        listener = Talk(not (quiet or json_output), stopping)
        outcome = in_worker(lambda: run.resume(journal, batch_id, how, parallel=parallel, prehash=prehash,
                                               no_finalize=no_finalize, listener=listener, stop=stopping.stop,
                                               tally=metrics_file is not None,
                                               local_root=str(Path(source_root).resolve()) if source_root else None,
                                               lease=lease))
    render(outcome, quiet=quiet, json_output=json_output, named=listener.named)
