"""--metrics-file: every upload, resume and gc leaves its outcome for monitoring, whatever it is."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from .. import metrics
from ..errors import ArchupError, ExitCode, Interrupted, exit_code_for
from ..states import FileState, ShardState
from .common import invocation, normalize_prefix

if TYPE_CHECKING:
    from ..run import RunOutcome

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("archup")

MetricsFileOption = Annotated[Path | None, typer.Option(
    "--metrics-file", help="Write this run's outcome to PATH in Prometheus textfile-collector format "
    "(node_exporter), replaced atomically at the end of every run.", show_default=False)]


RESTORE_METRICS = (("files_restored", "Files the last restore wrote (verified)."),
                   ("bytes_restored", "Bytes the last restore wrote (verified)."),
                   ("files_present", "Files the last restore found in place with the archive's SHA-256."),
                   ("files_failed", "Files the last restore could not restore or refused."),
                   ("objects_thawing", "Archived objects the last restore left thawing."))


def _labels(command: str, kwargs: dict[str, Any], outcome: RunOutcome | None) -> dict[str, str]:
    """Which job this is: its bucket, prefix and source, from the batch where the run got that far."""
    if outcome is not None and outcome.tally is not None:
        batch = outcome.tally.batch
        return {"bucket": batch.bucket, "prefix": batch.prefix, "source": batch.source_root}
    if command == "upload":
        directory = kwargs.get("directory")
        return {"bucket": kwargs.get("bucket") or "", "prefix": normalize_prefix(kwargs.get("prefix") or ""),
                "source": str(Path(directory).resolve()) if directory is not None else ""}
    if command == "restore":
        directory = kwargs.get("directory")
        return {"bucket": kwargs.get("bucket") or "", "prefix": kwargs.get("prefix") or "",
                "source": str(Path(directory).resolve()) if directory is not None else ""}
    return {"bucket": "", "prefix": "", "source": ""}


def _count(job: metrics.JobMetrics, outcome: RunOutcome | None, journal_path: str | None) -> None:
    if outcome is None:
        return
    if job.outcome != "interrupted":  # an interrupted run's outcome is "stopped"; say why it stopped
        job.outcome = outcome.kind
    if outcome.tally is not None:
        for state in metrics.STATES:
            job.files[state] = outcome.tally.counts[FileState(state)]
            job.bytes[state] = outcome.tally.bytes_by_state[FileState(state)]
        if outcome.tally.shards:
            for state in metrics.SHARD_STATES:
                job.shards[state] = outcome.tally.shards.get(ShardState(state), 0)
                job.shard_bytes[state] = outcome.tally.shard_bytes.get(ShardState(state), 0)
            job.files_packed = _files_packed(journal_path, outcome.batch_id)
    job.extra["archup_last_run_bytes_sent"] = ("Bytes the last run sent (parts resumed are not sent again).",
                                              outcome.result.bytes_sent)


def _files_packed(journal_path: str | None, batch_id: str) -> int | None:
    """The files in the batch's uploaded shards: their members, read from the journal once the
    run closed it (None, and the metric left out, if it cannot be read now)."""
    from .common import open_journal

    try:
        with open_journal(journal_path, create=False) as journal:
            return sum(shard.members for shard in journal.iter_shards(batch_id, [ShardState.UPLOADED]))
    except ArchupError as error:
        log.warning("metrics: files packed not counted: %s", error)
        return None


def reports_metrics(command: str) -> Callable[[F], F]:
    """Wrap a command that takes ``metrics_file``: write the file when it ends, however it ends."""

    def decorate(function: F) -> F:
        @wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            path: Path | None = kwargs.get("metrics_file")
            if path is None or kwargs.get("dry_run"):  # a dry run archives nothing: no outcome to report
                return function(*args, **kwargs)
            run = invocation()
            run.outcome = None
            job = metrics.JobMetrics(command, {}, started_at=time.time())
            start = time.monotonic()
            try:
                value = function(*args, **kwargs)
                job.exit_code, job.outcome = 0, "done"
                return value
            except typer.Exit as stop:
                job.exit_code = int(stop.exit_code)
                if job.exit_code == 0:
                    job.outcome = "done"
                raise
            except ArchupError as error:
                job.exit_code = exit_code_for(error)
                job.outcome = "interrupted" if isinstance(error, Interrupted) else "error"
                raise
            except KeyboardInterrupt:
                job.exit_code, job.outcome = int(ExitCode.INTERRUPTED), "interrupted"
                raise
            finally:
                job.duration_s = time.monotonic() - start
                from ..run import RunOutcome

                outcome = run.outcome if isinstance(run.outcome, RunOutcome) else None
                job.labels = _labels(command, kwargs, outcome)
                _count(job, outcome, kwargs.get("journal_path"))
                if command == "restore" and isinstance(run.result, dict):
                    for name, text in RESTORE_METRICS:
                        job.extra[f"archup_restore_{name}"] = (text, int(run.result.get(name, 0)))
                if command == "gc" and isinstance(run.result, dict):
                    job.extra["archup_gc_batches_expired"] = ("Batches the last gc expired.",
                                                             len(run.result.get("expired", [])))
                    job.extra["archup_gc_batches_forgotten"] = ("Batches whose file lists the last gc forgot.",
                                                               len(run.result.get("forgotten", [])))
                    job.extra["archup_journal_bytes"] = ("The journal's size on disk after the last gc.",
                                                        int(run.result.get("journal_bytes_after", 0)))
                try:
                    metrics.write(path, job, now=time.time())
                except metrics.MetricsError as error:
                    # The run's own outcome stands; monitoring hears of it as a stale file.
                    print(f"archup: warning: {error}", file=sys.stderr)
                    log.warning("%s", error)

        return wrapper  # type: ignore[return-value]

    return decorate
