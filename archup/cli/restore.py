"""archup restore: a sealed batch back into a directory, verified; parse, render, exit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import BatchNotFound, RestoreIncomplete, ThawPending, UsageError
from ..scan import display_path
from ..select import read_files_from
from ..store import DEFAULT_TRANSPORT, TransportKind
from .common import check_batch_id, emit_json, handles_errors, invocation, open_journal, parse_size, print_fields
from .metrics import MetricsFileOption, reports_metrics
from .options import (
    BwlimitOption,
    ConnectTimeoutOption,
    EndpointOption,
    GraceOption,
    JournalOption,
    JsonOption,
    ProfileOption,
    QuietOption,
    RegionOption,
    RetriesOption,
    TimeoutOption,
    TrustEndpointOption,
)

if TYPE_CHECKING:
    from ..restore import BatchLocation, RestoreReport
    from ..store import StoreConfig

MAX_PARALLEL = 256
SHOW_AT_MOST = 20


def _locate(batch_id: str, journal_path: str | None, bucket: str | None, prefix: str | None,
            endpoint_url: str | None, region: str | None,
            trust_recorded_endpoint: bool) -> tuple[BatchLocation, str, str | None, str | None]:
    """Where the batch is (and its bucket, endpoint, region): the journal's row if a journal
    knows the batch, else --bucket and --prefix; the flags win over the row, and a recorded
    endpoint other than this host's is refused as for every command (run.endpoint_for)."""
    from ..manifest import SUMMARY_NAME
    from ..restore import BatchLocation
    from ..run import Transport, endpoint_for
    from ..states import BatchState
    from .common import missing_journal, normalize_prefix, resolve_endpoint

    endpoint = resolve_endpoint(endpoint_url)
    batch = None
    if bucket is None or prefix is None:
        try:
            if missing_journal(journal_path) is None:
                with open_journal(journal_path, create=False) as journal:
                    batch = journal.get_batch(batch_id)
        except BatchNotFound:
            batch = None
    if batch is not None and (bucket is None or bucket == batch.bucket) and \
            (prefix is None or normalize_prefix(prefix) == batch.prefix):
        if batch.state is not BatchState.ENQUEUED:
            raise UsageError(f"batch {batch_id} is {batch.state.value}, not sealed: only a finalized batch can be "
                             f"restored ('archup finalize {batch_id}' seals it)")
        location = BatchLocation(batch_id, batch.manifest_key or f"{batch.batch_prefix}{SUMMARY_NAME}",
                                 batch.batch_prefix, batch.summary_sha256)
        recorded = endpoint_for(batch, Transport(endpoint_url=endpoint,
                                                 trust_recorded_endpoint=trust_recorded_endpoint))
        return location, batch.bucket, recorded, region or batch.region
    if bucket is None:
        raise UsageError(f"no journal here knows batch {batch_id}: name its bucket with --bucket (and --prefix, "
                         "--endpoint-url if they are not the defaults)")
    batch_prefix = f"{normalize_prefix(prefix if prefix is not None else 'staging/')}{batch_id}/"
    return BatchLocation(batch_id, f"{batch_prefix}{SUMMARY_NAME}", batch_prefix), bucket, endpoint, region


def _config(bucket: str, endpoint: str | None, region: str | None, profile: str | None, parallel: int,
            retries: int, timeout: float, connect_timeout: float, bwlimit: int | None,
            transport_kind: TransportKind) -> StoreConfig:
    from ..store import StoreConfig

    return StoreConfig(bucket=bucket, endpoint_url=endpoint, region=region, profile=profile,
                       max_pool_connections=parallel + 4, max_attempts=retries + 1, read_timeout=timeout,
                       connect_timeout=connect_timeout, bwlimit=bwlimit, transport=transport_kind)


def _print_report(report: RestoreReport, named: set[str]) -> None:
    """The summary; the failures the live display did not name already (each named once)."""
    if report.dry_run:
        for action, path, size in report.planned:
            print(f"{action:<6} {display_path(path)} ({size} B)")
    for path, reason in report.failures[:SHOW_AT_MOST]:
        if path not in named:
            print(f"failed: {display_path(path)}: {display_path(reason)}", file=sys.stderr)
    if report.files_failed > SHOW_AT_MOST:
        print(f"... and {report.files_failed - SHOW_AT_MOST} more failed (--json lists up to 1,000)",
              file=sys.stderr)
    if report.thaw_note:
        print(f"archup: {report.thaw_note}", file=sys.stderr)
    fields = [("batch_id", report.batch_id), ("target", report.target), ("files_restored", report.files_restored),
              ("bytes_restored", report.bytes_restored), ("files_present", report.files_present),
              ("files_failed", report.files_failed), ("objects_thawing", report.objects_thawing),
              ("elapsed_s", round(report.elapsed_s, 3)), ("bytes_per_s", report.bytes_per_s)]
    print_fields(fields)


@handles_errors
@reports_metrics("restore")
def restore(
    batch_id: Annotated[str, typer.Argument(help="Batch id (a ULID).", metavar="BATCH", show_default=False)],
    directory: Annotated[Path, typer.Argument(help="Directory to restore into (created if missing).",
                                              metavar="DIR", show_default=False)],
    bucket: Annotated[str | None, typer.Option(
        "--bucket", envvar="ARCHUP_BUCKET", help="The batch's bucket, when no journal here knows the batch.",
        show_default=False)] = None,
    prefix: Annotated[str | None, typer.Option(
        "--prefix", envvar="ARCHUP_PREFIX", help="The key prefix the batch was uploaded under "
        "[default: staging/]", show_default=False)] = None,
    endpoint_url: EndpointOption = None,
    profile: ProfileOption = None,
    region: RegionOption = None,
    parallel: Annotated[int, typer.Option("--parallel", "-p", help="Concurrent requests: files, and ranges "
                                          "of large objects.")] = 8,
    include: Annotated[list[str] | None, typer.Option(
        "--include", help="Only files matching this glob (repeatable; upload's rules).", show_default=False)] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", help="Leave out files matching this glob (repeatable).", show_default=False)] = None,
    files_from: Annotated[Path | None, typer.Option(
        "--files-from", help="Only the relative paths listed in this file, one a line.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace files in DIR whose size or SHA-256 differs from the archive's.")] = False,
    restore_tier: Annotated[str, typer.Option(
        "--restore-tier", help="Thaw tier for archived objects: Standard, Bulk or Expedited.")] = "Standard",
    restore_days: Annotated[int, typer.Option(
        "--restore-days", help="Days a thawed copy of an archived object stays readable.")] = 7,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Wait for archived objects to thaw (polling with backoff) and finish in one run.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would be fetched, kept and thawed; write nothing.")] = False,
    part_size: Annotated[str, typer.Option(
        "--part-size", help="Objects larger than this download as parallel ranged GETs of this size.")] = "8MiB",
    bwlimit: BwlimitOption = None,
    retries: RetriesOption = 4,
    timeout: TimeoutOption = 60.0,
    connect_timeout: ConnectTimeoutOption = 10.0,
    grace: GraceOption = 10.0,
    transport_kind: Annotated[TransportKind, typer.Option(
        "--transport", envvar="ARCHUP_TRANSPORT",
        help="What sends each GET of a file or a range: crt (the AWS Common Runtime: signing and HTTP in C) "
        "or botocore. Listings and the manifest always use botocore.")] = DEFAULT_TRANSPORT,
    quiet: QuietOption = False,
    metrics_file: MetricsFileOption = None,
    trust_recorded_endpoint: TrustEndpointOption = False,
    journal_path: JournalOption = None,
    json_output: JsonOption = False,
) -> None:
    """Restore a sealed batch into DIR, every file checked against the manifest's SHA-256 before it
    gets its name. Works from the bucket alone (--bucket, --prefix). Exits 3 if any file failed or
    was refused, 75 if archived objects are thawing (run again later)."""
    from ..restore import RestoreOptions, restore_batch
    from ..store import open_store
    from .upload import check_run_limits, in_worker, stop_on_signals

    batch_id = check_batch_id(batch_id)
    if not 1 <= parallel <= MAX_PARALLEL:
        raise UsageError(f"--parallel {parallel}: must be between 1 and {MAX_PARALLEL}")
    if not 1 <= restore_days <= 36500:
        raise UsageError(f"--restore-days {restore_days}: must be between 1 and 36500")
    check_run_limits(retries, timeout, connect_timeout, grace)
    range_size = parse_size(part_size)
    if range_size < 1024 * 1024:
        raise UsageError(f"--part-size {part_size}: must be at least 1MiB")
    limit = parse_size(bwlimit) if bwlimit else None
    wanted = frozenset(read_files_from(files_from)) if files_from is not None else None
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a directory")

    location, bucket_name, endpoint, region_name = _locate(batch_id, journal_path, bucket, prefix, endpoint_url,
                                                           region, trust_recorded_endpoint)
    store = open_store(_config(bucket_name, endpoint, region_name, profile, parallel, retries, timeout,
                               connect_timeout, limit, transport_kind))
    store.check_bucket()
    options = RestoreOptions(parallel=parallel, part_size=range_size, overwrite=overwrite,
                             includes=tuple(include or ()), excludes=tuple(exclude or ()), files_from=wanted,
                             restore_tier=restore_tier.capitalize(), restore_days=restore_days, wait=wait,
                             dry_run=dry_run)
    observer = None
    progress = None
    if sys.stderr.isatty() and not quiet and not json_output and not dry_run:
        from .progress import RestoreProgress

        progress = observer = RestoreProgress()
    with stop_on_signals(grace, json_output) as stopping:
        if progress is not None:
            with progress:
                report = in_worker(lambda: restore_batch(store, location, directory.resolve(), options,
                                                         observer=observer, stop=stopping.stop))
        else:
            report = in_worker(lambda: restore_batch(store, location, directory.resolve(), options,
                                                     observer=observer, stop=stopping.stop))
    invocation().result = report.as_dict()
    if json_output:
        emit_json(report.as_dict())
    elif not quiet:
        _print_report(report, progress.named if progress is not None else set())
    else:
        for path, reason in report.failures[:SHOW_AT_MOST]:
            print(f"failed: {display_path(path)}: {display_path(reason)}", file=sys.stderr)
    if report.files_failed:
        raise RestoreIncomplete(f"batch {batch_id}: {report.files_failed} file(s) not restored (named above); "
                                "the others are in place: run the same command again after fixing the cause")
    if report.objects_thawing:
        raise ThawPending(report.thaw_note)
