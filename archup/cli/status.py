"""archup status: what the journal knows about one batch."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from ..journal import BatchRecord, BatchSummary, FileRecord, WorkerRecord
from ..scan import display_path
from ..states import FileState, ShardState
from . import human
from .common import (
    check_batch_id,
    emit_json,
    handles_errors,
    open_journal,
    print_fields,
)
from .options import BatchArgument, JournalOption, JsonOption

# Failed files shown, and skipped files shown, unless --all.
PROBLEM_LIMIT = 20

AllOption = Annotated[bool, typer.Option("--all", help="List every failed and skipped file "
                                                       f"(default: the first {PROBLEM_LIMIT} of each).")]


def _problem(record: FileRecord) -> dict[str, Any]:
    return {"path": record.rel_path, "state": record.state.value, "error": record.error}


def file_list(batch: BatchRecord) -> str:
    """Where a batch's list of files is: "journal", "manifest" (forgotten after its seal),
    or "none" (an aborted or expired batch forgotten: nothing of it was archived)."""
    if batch.forgotten_at is None:
        return "journal"
    return "manifest" if batch.manifest_key else "none"


def is_packed(summary: BatchSummary) -> bool:
    """A batch begun with --pack-under, or one with shards (its settings unrecorded)."""
    settings = summary.batch.settings
    return bool(summary.shards) or (settings is not None and settings.pack_under is not None)


def packing_document(summary: BatchSummary, files_packed: int) -> dict[str, Any]:
    """A packed batch's shards: counts and bytes per state, and the files in uploaded shards."""
    settings = summary.batch.settings
    return {
        "pack_under": settings.pack_under if settings is not None else None,
        "shard_size": settings.shard_size if settings is not None else None,
        "files_packed": files_packed,
        "shards": {state.value: summary.shards.get(state, 0) for state in ShardState}
        | {"total": sum(summary.shards.values())},
        "shard_bytes": {state.value: summary.shard_bytes.get(state, 0) for state in ShardState}
        | {"total": sum(summary.shard_bytes.values())},
    }


def status_document(summary: BatchSummary) -> dict[str, Any]:
    batch = summary.batch
    failed, skipped = summary.counts[FileState.FAILED], summary.counts[FileState.SKIPPED]
    return {
        "batch_id": batch.batch_id,
        "status": batch.state.value,
        "source_root": batch.source_root,
        "bucket": batch.bucket,
        "prefix": batch.batch_prefix,
        "endpoint_url": batch.endpoint_url,
        "scan_complete": batch.scan_complete,
        "files": {state.value: summary.counts[state] for state in FileState} | {"total": summary.files_total},
        # --skip-archived: unchanged since an earlier batch, so not in this one (counted, not listed).
        "files_already_archived": batch.files_archived,
        "bytes_uploaded": summary.bytes_by_state[FileState.UPLOADED],
        "bytes_total": summary.bytes_total,
        "created_at": batch.created_at,
        "updated_at": summary.updated_at,
        "expires_at": batch.expires_at,
        "finalized_at": batch.finalized_at,
        "manifest_key": batch.manifest_key,
        "error": batch.error,
        # gc --forget-after: the counts stay, the file rows went; where the file list is now.
        "forgotten_at": batch.forgotten_at,
        "file_list": file_list(batch),
        # Failed files first: however many files were skipped, they never hide one.
        "problems": [_problem(record) for record in summary.failed + summary.skipped],
        # How many of each kind 'problems' leaves out ('archup status BATCH --all' lists them).
        "problems_omitted": {"failed": failed - len(summary.failed), "skipped": skipped - len(summary.skipped)},
    }


@handles_errors
def status(batch_id: BatchArgument, journal_path: JournalOption = None, json_output: JsonOption = False,
           show_all: AllOption = False) -> None:
    """Show a batch: state, counts per file state, bytes, shards of a packed batch, times, failed and
    skipped files."""
    batch_id = check_batch_id(batch_id)
    with open_journal(journal_path, create=False) as journal:
        summary = journal.get_state(batch_id, problem_limit=-1 if show_all else PROBLEM_LIMIT)
        document = status_document(summary)
        if is_packed(summary):
            # A shard is committed uploaded with its members: their count is the files packed.
            files_packed = sum(shard.members for shard in journal.iter_shards(batch_id, [ShardState.UPLOADED]))
            document |= packing_document(summary, files_packed)
        if journal.claims() is not None:  # hosts share the batch: their processes are listed
            document["workers"] = [_worker(worker) for worker in journal.list_workers(batch_id)]
    if json_output:
        emit_json(document)
        return
    files = document["files"]
    amount = human.size if sys.stdout.isatty() else str  # cron and scripts keep the raw number
    print_fields([
        ("batch_id", document["batch_id"]),
        ("status", human.state(document["status"])),
        ("source", document["source_root"]),
        ("destination", f"s3://{document['bucket']}/{document['prefix']}"),
        ("scan", "complete" if document["scan_complete"] else "incomplete"),
        ("files", ", ".join(f"{count} {state}" for state, count in files.items() if count or state == "total")
         + (f"; {document['files_already_archived']} already archived" if document["files_already_archived"]
            else "")),
        ("bytes", f"{amount(document['bytes_uploaded'])} of {amount(document['bytes_total'])} uploaded"),
        *([("shards", _shards(document)),
           ("shard bytes", f"{amount(document['shard_bytes']['uploaded'])} of "
                           f"{amount(document['shard_bytes']['uploaded'] + document['shard_bytes']['uploading'])}"
                           " uploaded")] if "shards" in document else []),
        ("created", document["created_at"]),
        ("updated", document["updated_at"]),
        ("expires", document["expires_at"] if not document["finalized_at"] else "never (finalized)"),
        *([("finalized", document["finalized_at"]), ("manifest", document["manifest_key"])]
          if document["finalized_at"] else []),
        *([("error", document["error"])] if document["error"] else []),
        *([("forgotten", _forgotten(document))] if document["forgotten_at"] else []),
    ])
    for worker in document.get("workers", []):
        mark = "ended" if worker["ended"] else "LEASE EXPIRED" if worker["lease_expired"] else "working"
        print(f"worker: {display_path(worker['host'])} pid {worker['pid']}: {mark}, since {worker['since']}, last heartbeat "
              f"{worker['last_heartbeat']}, {worker['files_done']} files, {amount(worker['bytes_done'])} sent")
    for state in (FileState.FAILED.value, FileState.SKIPPED.value):
        for problem in document["problems"]:
            if problem["state"] == state:
                print(f"{state}: {display_path(problem['path'])}: {display_path(str(problem['error']))}")
        if document["problems_omitted"][state]:
            print(f"... and {document['problems_omitted'][state]} more {state} "
                  f"('archup status {batch_id} --all' lists them all)")


def _shards(document: dict[str, Any]) -> str:
    """``2 uploaded, 1 dropped, 3 total; 1200 files packed``."""
    counts = ", ".join(f"{count} {state}" for state, count in document["shards"].items()
                       if count or state == "total")
    return f"{counts}; {document['files_packed']} files packed"


def _worker(worker: WorkerRecord) -> dict[str, Any]:
    """One host's process of a shared batch: a lease that ran out without an end means it died
    or lost the database, and another host takes its files over."""
    return {"host": worker.host, "pid": worker.pid, "since": worker.started_at, "last_heartbeat": worker.heartbeat_at,
            "files_done": worker.files_done, "bytes_done": worker.bytes_done, "ended": worker.ended,
            "lease_expired": worker.lease_expired and not worker.ended}


def _forgotten(document: dict[str, Any]) -> str:
    if document["file_list"] == "manifest":
        where = (f"its file list is in its manifest, s3://{document['bucket']}/{document['manifest_key']} "
                 f"('archup verify {document['batch_id']}' checks the bucket against it)")
    else:
        where = f"its file list is gone (the batch was {document['status']}, nothing of it archived)"
    return f"{document['forgotten_at']} by gc --forget-after; {where}"
