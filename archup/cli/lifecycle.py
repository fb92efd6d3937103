"""archup list, abort and gc: the batches in the journal and their end of life."""

from __future__ import annotations

import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .. import logs
from ..clock import utcnow
from ..errors import ExitCode, UsageError
from ..scan import display_path
from ..states import BatchState, FileState
from . import human
from .common import (
    check_batch_id,
    emit_json,
    handles_errors,
    invocation,
    missing_journal,
    open_journal,
    print_fields,
    transport,
)
from .metrics import MetricsFileOption, reports_metrics
from .options import (
    BatchArgument,
    EndpointOption,
    JournalOption,
    JsonOption,
    ProfileOption,
    QuietOption,
    RegionOption,
    TrustEndpointOption,
)

if TYPE_CHECKING:  # the library's batch and sending modules load when a command needs them
    from ..batches import GcReport

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """'24h', '90m', '7d'."""
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"bad duration {text!r}: use a number and a unit (s, m, h, d, w), such as 24h")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _missing_journal(journal_path: str | None) -> Path | None:
    """Where the journal would be, if there is none: nothing uploaded yet, so nothing to list
    or collect (and list and gc must not create it)."""
    return missing_journal(journal_path)


def _say_missing(path: Path) -> None:
    print(f"archup: no journal at {path} (nothing uploaded yet)", file=sys.stderr)


def _seconds_since(created_at: str) -> float:
    return (utcnow() - datetime.fromisoformat(created_at.replace("Z", "+00:00"))).total_seconds()


def _age(created_at: str) -> str:
    seconds = int(_seconds_since(created_at))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@handles_errors
def list_batches(
    status: Annotated[BatchState | None, typer.Option("--status", help="Only batches in this state.",
                                                      show_default=False)] = None,
    journal_path: JournalOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """List the batches in the journal with state, age, file counts and bytes."""
    missing = _missing_journal(journal_path)
    rows: list[dict[str, Any]] = []
    if missing is None:
        with open_journal(journal_path, create=False) as journal:
            for batch in journal.list_batches(status):
                summary = journal.get_state(batch.batch_id, problem_limit=0)
                rows.append({
                    "batch_id": batch.batch_id, "status": batch.state.value, "created_at": batch.created_at,
                    "age": _age(batch.created_at), "source_root": batch.source_root,
                    "destination": f"s3://{batch.bucket}/{batch.batch_prefix}",
                    "files_total": summary.files_total, "files_uploaded": summary.counts[FileState.UPLOADED],
                    "files_failed": summary.counts[FileState.FAILED],
                    "bytes_total": summary.bytes_total, "bytes_uploaded": summary.bytes_by_state[FileState.UPLOADED],
                    "forgotten_at": batch.forgotten_at,
                })
    if json_output:
        emit_json({"batches": rows})
        return
    if quiet:
        return
    if missing is not None:
        _say_missing(missing)
    if sys.stdout.isatty():
        if rows or missing is not None:
            _print_table(rows)
        else:  # one line, not an empty table
            print("no batches" + (f" in state {status.value}" if status else ""))
        return
    for row in rows:  # cron and scripts: one line a batch, raw numbers
        print(f"{row['batch_id']}  {row['status']:<10}  {row['age']:>5}  "
              f"{row['files_uploaded']}/{row['files_total']} files  "
              f"{row['bytes_uploaded']}/{row['bytes_total']} bytes  {display_path(row['source_root'])}"
              + ("  (forgotten)" if row["forgotten_at"] else ""))


def _print_table(rows: list[dict[str, Any]]) -> None:
    """On a terminal: a header row, sizes in units, as rclone and restic list things."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for heading, justify in (("Batch", "left"), ("Status", "left"), ("Age", "right"), ("Files", "right"),
                             ("Uploaded", "right"), ("Source", "left")):
        table.add_column(heading, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(row["batch_id"], row["status"] + (" (forgotten)" if row["forgotten_at"] else ""),
                      human.duration(max(0.0, _seconds_since(row["created_at"]))),
                      f"{row['files_uploaded']} of {row['files_total']}",
                      f"{human.size(row['bytes_uploaded'])} of {human.size(row['bytes_total'])}",
                      Text(display_path(row["source_root"])))
    Console(highlight=False).print(table)


@handles_errors
def abort(
    batch_id: BatchArgument,
    purge: Annotated[bool, typer.Option("--purge", help="Also delete the batch's staged objects.")] = False,
    endpoint_url: EndpointOption = None,
    trust_recorded_endpoint: TrustEndpointOption = False,
    profile: ProfileOption = None,
    region: RegionOption = None,
    journal_path: JournalOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Abort a batch: abort its multipart uploads and mark it aborted (--purge deletes its objects)."""
    from ..batches import abort_batch
    from ..run import store_factory

    batch_id = check_batch_id(batch_id)
    with open_journal(journal_path, create=False) as journal:
        # The batch is read under its lock, inside abort_batch: not before it.
        report = abort_batch(journal, store_factory(transport(endpoint_url, profile, region,
                                                              trust_recorded_endpoint=trust_recorded_endpoint)),
                             batch_id,
                             purge=purge)
    if json_output:
        emit_json(report.as_dict())
    elif not quiet:
        # Labelled as status labels it ('state' stays the JSON's key).
        print_fields([("status" if name == "state" else name, value) for name, value in report.as_dict().items()])


@handles_errors
@reports_metrics("gc")
def gc(
    older_than: Annotated[str | None, typer.Option(
        "--older-than", help="Expire unfinalized batches created longer ago than this (e.g. 24h); "
        "default: each batch's own expiry, 24 hours after it was created. With --abort-orphans, "
        "the age an orphan upload's batch must have (default 24h).", show_default=False)] = None,
    abort_orphans: Annotated[bool, typer.Option(
        "--abort-orphans", help="Also abort the orphan multipart uploads it finds whose batch began longer "
        "ago than --older-than (default 24h): younger ones may be another host's, in flight.")] = False,
    forget_after: Annotated[str, typer.Option(
        "--forget-after", help="Forget the file lists of finalized, aborted and expired batches that ended "
        "longer ago than this (their summaries stay; a finalized batch's files are in its manifest), "
        "then shrink the journal; 'never' keeps them.")] = "30d",
    endpoint_url: EndpointOption = None,
    trust_recorded_endpoint: TrustEndpointOption = False,
    profile: ProfileOption = None,
    region: RegionOption = None,
    journal_path: JournalOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    metrics_file: MetricsFileOption = None,
) -> None:
    """Expire stale unfinalized batches (aborting their uploads), report orphan multipart uploads, and
    forget the file lists of batches that ended long ago (--forget-after)."""
    from ..batches import GcReport, collect_garbage
    from ..run import store_factory

    age = parse_duration(older_than) if older_than else None
    forget = None if forget_after.strip().lower() == "never" else parse_duration(forget_after)
    missing = _missing_journal(journal_path)
    if missing is not None:
        report = GcReport()  # no batches: none to expire, and no destinations to look for orphans in
    else:
        with open_journal(journal_path, create=False) as journal:
            report = collect_garbage(journal, store_factory(transport(
                endpoint_url, profile, region, trust_recorded_endpoint=trust_recorded_endpoint)), older_than=age,
                                     abort_orphans=abort_orphans, forget_after=forget)
    invocation().result = report.as_dict()  # what --metrics-file counts, whatever is printed
    if json_output:
        emit_json(report.as_dict())
    elif not quiet:  # quiet: a nightly cron job mails only when something went wrong
        _print_gc_report(report, missing, abort_orphans)
    for error in report.errors:
        line = display_path(error)
        print(f"archup: error: {line}", file=sys.stderr)
        logs.log_printed_error(f"archup gc: error: {line}")
    if report.errors:
        # A destination gc could not look at (or clean): cron must hear of it.
        raise typer.Exit(int(ExitCode.DESTINATION))


def _print_gc_report(report: GcReport, missing: Path | None, abort_orphans: bool) -> None:
    if missing is not None:
        _say_missing(missing)
    for expired in report.expired:
        print(f"expired {expired.batch_id} ({expired.uploads_aborted} multipart upload(s) aborted)")
    for batch_id in report.busy:
        print(f"busy {batch_id}: another archup owns it; left alone")
    for batch_id in report.sealed:
        print(f"sealed {batch_id}: its manifest.json is in the bucket but the journal never recorded it; "
              f"left alone; run 'archup finalize {batch_id}' to record it")
    kept = {orphan["upload_id"]: orphan["reason"] for orphan in report.orphans_kept}
    for orphan in report.orphan_uploads:
        # A key and an upload id are the bucket's: escaped, as any name from outside.
        print(display_path(f"orphan upload s3://{orphan['bucket']}/{orphan['key']} ({orphan['upload_id']})")
              + ((f" kept: {kept[orphan['upload_id']]}" if orphan["upload_id"] in kept else " aborted")
                 if abort_orphans else ""))
    for batch_id in report.forgotten:
        print(f"forgot {batch_id}: its file list is in its manifest (finalized) or gone (aborted, expired)")
    print(f"{len(report.expired)} batch(es) expired, {len(report.orphan_uploads)} orphan upload(s) found, "
          f"{len(report.forgotten)} batch(es) forgotten, {report.bytes_freed} journal byte(s) freed")
