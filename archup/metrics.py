"""A cron job's outcome for monitoring: the Prometheus textfile-collector format.

node_exporter's textfile collector reads ``*.prom`` files from one directory; a job
writes its file whole at the end of every run (temp file, fsync, rename), so the
collector never reads half of one. The time of the job's last fully successful run
is carried over from the file it replaces, so a failing job keeps reporting when it
last succeeded (the number an alert "no successful archive for 26 hours" needs).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ArchupError

LAST_SUCCESS = "archup_last_success_timestamp_seconds"
STATES = ("uploaded", "failed", "skipped")
SHARD_STATES = ("uploaded", "uploading", "dropped")


class MetricsError(ArchupError):
    """The metrics file could not be written (the run's own outcome stands)."""


@dataclass
class JobMetrics:
    """One run of a job: ``labels`` say which job (bucket, prefix, source)."""

    command: str                       # upload | resume | gc
    labels: dict[str, str]
    outcome: str = "error"             # finalized | uploaded | partial | stopped | interrupted | error | done
    exit_code: int = 1
    started_at: float = 0.0            # Unix time
    duration_s: float = 0.0
    files: dict[str, int] = field(default_factory=dict)   # per state: uploaded, failed, skipped
    bytes: dict[str, int] = field(default_factory=dict)
    # A packed batch (--pack-under): its tar shards per state, their bytes, and the files in
    # uploaded shards (empty, and not written, for a batch without shards).
    shards: dict[str, int] = field(default_factory=dict)
    shard_bytes: dict[str, int] = field(default_factory=dict)
    files_packed: int | None = None
    extra: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (help, value)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str], **more: str) -> str:
    pairs = {**labels, **more}
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in pairs.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(metrics: JobMetrics, last_success: float | None) -> str:
    """The file's text: a HELP and a TYPE line for each metric, then its samples."""
    base = {"command": metrics.command, **metrics.labels}
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} gauge"])
        lines.extend(f"{name}{_labels(base, **extra)} {_number(value)}" for extra, value in samples)

    gauge("archup_last_run_exit_code", "Exit code of the job's last run (0: everything archived).",
          [({}, metrics.exit_code)])
    gauge("archup_last_run_outcome", "How the job's last run ended (the series with value 1).",
          [({"outcome": metrics.outcome}, 1)])
    gauge("archup_last_run_timestamp_seconds", "Unix time the job's last run started.", [({}, metrics.started_at)])
    gauge("archup_last_run_duration_seconds", "Wall time of the job's last run.", [({}, metrics.duration_s)])
    if metrics.files or metrics.bytes:
        gauge("archup_last_run_files", "Files of the last run's batch, by state.",
              [({"state": state}, metrics.files.get(state, 0)) for state in STATES])
        gauge("archup_last_run_bytes", "Bytes of the last run's batch, by state.",
              [({"state": state}, metrics.bytes.get(state, 0)) for state in STATES])
    if metrics.shards:
        gauge("archup_last_run_shards", "Tar shards of the last run's packed batch, by state.",
              [({"state": state}, metrics.shards.get(state, 0)) for state in SHARD_STATES])
        gauge("archup_last_run_shard_bytes", "Bytes of the last run's packed batch's shards, by state.",
              [({"state": state}, metrics.shard_bytes.get(state, 0)) for state in SHARD_STATES])
    if metrics.files_packed is not None:
        gauge("archup_last_run_files_packed", "Files of the last run's batch stored in uploaded shards.",
              [({}, metrics.files_packed)])
    for name, (help_text, value) in sorted(metrics.extra.items()):
        gauge(name, help_text, [({}, value)])
    if last_success is not None:
        gauge(LAST_SUCCESS, "Unix time the job's last fully successful run ended (exit 0).", [({}, last_success)])
    return "\n".join(lines) + "\n"


_SAMPLE = re.compile(rf"^{LAST_SUCCESS}\{{.*\}} (\S+)$")


def previous_success(path: Path) -> float | None:
    """The last success recorded in the file this run replaces, if it has one."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found:
            try:
                value = float(found.group(1))
            except ValueError:
                return None
            return value if math.isfinite(value) else None
    return None


def write(path: Path, metrics: JobMetrics, *, now: float) -> None:
    """Replace the file atomically: a temp file beside it, fsync, rename, fsync the directory."""
    last_success = now if metrics.succeeded else previous_success(path)
    text = render(metrics, last_success)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as error:
        raise MetricsError(f"cannot write metrics file {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)  # the collector runs as another user
        os.replace(temp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as error:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise MetricsError(f"cannot write metrics file {path}: {error.strerror or error}") from None
