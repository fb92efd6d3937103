"""archup upload: create (or continue) a batch, upload a directory, finalize."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from ulid import ULID

from ..errors import BatchClosed, BatchIncomplete, Interrupted, UsageError
from ..finalize import finalize
from ..journal import Journal
from ..states import BatchState, FileState
from ..store import ChecksumMode, S3Store, StoreConfig
from ..uploader import MIN_PART_SIZE, UploadOptions, UploadResult, Uploader
from .common import (EndpointOption, JournalOption, JsonOption, ProfileOption, RegionOption,
                     check_batch_id, emit_json, handles_errors, open_journal, parse_size, print_fields,
                     resolve_endpoint)
from .progress import RichProgress

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


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM: stop taking new work. A second one: exit at once (the journal stays consistent)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(130)
        stop.set()
        print("archup: stopping: finishing the requests in flight (a second signal exits at once)",
              file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _resume_hint(batch_id: str, source: str) -> str:
    return f"archup upload --batch {batch_id} {source}"


def _partial_report(journal: Journal, batch_id: str, result: UploadResult, source: str) -> dict[str, object]:
    state = journal.get_state(batch_id)
    return {
        "batch_id": batch_id,
        "status": state.batch.state.value,
        "files_uploaded": state.counts[FileState.UPLOADED],
        "files_failed": state.counts[FileState.FAILED],
        "files_pending": state.counts[FileState.PENDING] + state.counts[FileState.UPLOADING],
        "files_skipped": state.counts[FileState.SKIPPED],
        "total_bytes": state.bytes_by_state[FileState.UPLOADED],
        "failures": [{"path": path, "error": error} for path, error in result.failures[:SHOW_AT_MOST]],
        "resume": _resume_hint(batch_id, source),
    }


def _run(journal: Journal, store: S3Store, batch_id: str, source: str, options: UploadOptions,
         show_bar: bool) -> UploadResult:
    stop = threading.Event()
    with stop_on_signals(stop):
        uploader = Uploader(journal, store, batch_id, options, stop=stop)
        uploader.scan(source)
        if not show_bar:
            return uploader.send(source)
        state = journal.get_state(batch_id)
        done = (FileState.UPLOADED, FileState.SKIPPED)
        with RichProgress(state.bytes_total - sum(state.bytes_by_state[s] for s in done),
                          state.files_total - sum(state.counts[s] for s in done)) as bar:
            uploader.observer = bar
            return uploader.send(source)


@handles_errors
def upload(
    directory: Annotated[Path, typer.Argument(help="Directory to upload.", show_default=False)],
    parallel: Annotated[int, typer.Option("--parallel", "-p", envvar="ARCHUP_PARALLEL",
                                          help="Concurrent requests (threads).")] = 5,
    bucket: Annotated[str | None, typer.Option("--bucket", envvar="ARCHUP_BUCKET",
                                               help="Destination bucket.", show_default=False)] = None,
    endpoint_url: EndpointOption = None,
    profile: ProfileOption = None,
    region: RegionOption = None,
    prefix: Annotated[str, typer.Option("--prefix", envvar="ARCHUP_PREFIX",
                                        help="Key prefix; the batch goes under <prefix><BATCH>/.")] = "staging/",
    part_size: Annotated[str, typer.Option("--part-size", help="Multipart part size (and threshold); grown "
                                           "automatically so no file needs more than 10,000 parts.")] = "8MiB",
    checksum: Annotated[ChecksumMode, typer.Option("--checksum", help="Integrity check sent with every request "
                                                   "(sha256, crc32, md5, none).")] = ChecksumMode.SHA256,
    batch: Annotated[str | None, typer.Option("--batch", help="Continue this unfinished batch.",
                                              show_default=False)] = None,
    no_finalize: Annotated[bool, typer.Option("--no-finalize", help="Upload only; finalize later.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")] = False,
    journal_path: JournalOption = None,
    json_output: JsonOption = False,
) -> None:
    """Upload DIR as one batch under <prefix><BATCH>/, then finalize it (write the manifest)."""
    if not directory.exists():
        raise UsageError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    if not 1 <= parallel <= MAX_PARALLEL:
        raise UsageError(f"--parallel {parallel}: must be between 1 and {MAX_PARALLEL}")
    part_bytes = parse_size(part_size)
    if not MIN_PART_SIZE <= part_bytes <= MAX_PART_SIZE:
        raise UsageError(f"--part-size {part_size}: must be between 5MiB and 5GiB (S3's part limits)")
    if not bucket:
        raise UsageError("no bucket: pass --bucket or set ARCHUP_BUCKET")
    source = str(directory.resolve())
    endpoint = resolve_endpoint(endpoint_url)
    store = S3Store(StoreConfig(bucket=bucket, endpoint_url=endpoint, region=region, profile=profile,
                                max_pool_connections=max(10, parallel + 4), checksum=checksum))
    store.check_bucket()
    talk = not (quiet or json_output)

    with open_journal(journal_path) as journal:
        if batch:
            batch_id = check_batch_id(batch)
            record = journal.get_batch(batch_id)
            if record.source_root != source:
                raise UsageError(f"batch {batch_id} archives {record.source_root}, not {source}")
            if record.bucket != bucket:
                raise UsageError(f"batch {batch_id} goes to bucket {record.bucket}, not {bucket}")
        else:
            batch_id = str(ULID())
            record = journal.init_batch(batch_id, source_root=source, bucket=bucket,
                                        prefix=normalize_prefix(prefix), part_size=part_bytes,
                                        endpoint_url=endpoint, region=region)
        if talk:
            print(f"archup: batch {batch_id}: uploading {source} to s3://{bucket}/{record.batch_prefix} "
                  f"with {parallel} streams", file=sys.stderr)

        if record.state is BatchState.ENQUEUED:
            result = UploadResult(batch_id)  # already sealed: finalize below just reprints its summary
        elif record.state.terminal:
            raise BatchClosed(f"batch {batch_id} is {record.state.value}; start a new batch")
        else:
            result = _run(journal, store, batch_id, source, UploadOptions(
                parallel=parallel, part_size=record.part_size, multipart_threshold=record.part_size),
                show_bar=talk and sys.stderr.isatty())

        if result.fatal is not None:
            raise result.fatal
        if result.interrupted:
            raise Interrupted(f"batch {batch_id} interrupted; resume with '{_resume_hint(batch_id, source)}'")
        if result.files_failed:
            report = _partial_report(journal, batch_id, result, source)
            if json_output:
                emit_json(report)
            else:
                for failure in report["failures"]:  # type: ignore[attr-defined]
                    print(f"failed: {failure['path']}: {failure['error']}", file=sys.stderr)
                if result.files_failed > SHOW_AT_MOST:
                    print(f"... and {result.files_failed - SHOW_AT_MOST} more failed", file=sys.stderr)
            raise BatchIncomplete(f"batch {batch_id}: {result.files_failed} file(s) failed; "
                                  f"resume with '{_resume_hint(batch_id, source)}'")
        if no_finalize:
            report = _partial_report(journal, batch_id, result, source)
            if json_output:
                emit_json(report)
            elif not quiet:
                print_fields([(k, v) for k, v in report.items() if k != "failures"])
            return
        summary = finalize(journal, store, batch_id)
        if json_output:
            emit_json(summary.as_dict())
        elif not quiet:
            print_fields(list(summary.as_dict().items()))

