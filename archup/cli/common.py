"""What every command shares: options, opening the journal, errors to exit codes, output."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from .. import logs
from ..errors import ArchupError, BatchNotFound, ExitCode, JournalError, UsageError, exit_code_for
from ..journal import BatchRecord, BatchSettings, Journal, default_journal_path
from ..scan import display_path
from ..store import ChecksumMode, S3Store, StoreConfig

F = TypeVar("F", bound=Callable[..., Any])

JournalOption = Annotated[
    Path | None,
    typer.Option("--journal", help="Journal file [env: ARCHUP_JOURNAL; default: ~/.local/state/archup/journal.db]",
                 show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
BatchArgument = Annotated[str, typer.Argument(help="Batch id (a ULID, as printed by 'archup upload').",
                                               metavar="BATCH",
                                               show_default=False)]
EndpointOption = Annotated[
    str | None,
    typer.Option("--endpoint-url", help="S3 endpoint URL [env: ARCHUP_ENDPOINT_URL, AWS_ENDPOINT_URL]",
                 show_default=False),
]
ProfileOption = Annotated[str | None, typer.Option("--profile", help="AWS profile name.", show_default=False)]
RegionOption = Annotated[str | None, typer.Option("--region", help="Region of the bucket.", show_default=False)]

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class _Run(threading.local):
    """What this command run has said so far: its name, whether --json printed its object, its result."""

    command = "archup"
    json_emitted = False
    result: dict[str, Any] | None = None
    last_error: str | None = None
    # An error of the group's own settings, reported by the command: only the command
    # knows whether --json was asked for (click has not parsed its options yet).
    pending: tuple[str, int] | None = None


_run = _Run()
log = logging.getLogger("archup")


def begin_run(command: str | None) -> None:
    _run.command = f"archup {command}" if command else "archup"
    _run.json_emitted = False
    _run.result = None
    _run.last_error = None
    _run.pending = None


def defer_error(message: str, code: int) -> None:
    """Fail the command about to run with this error, before it does anything."""
    _run.pending = (message, code)


def json_requested(args: Sequence[str]) -> bool:
    """--json among these arguments (not after '--', where it would be a directory name)."""
    return "--json" in list(itertools.takewhile(lambda arg: arg != "--", args))


def report_error(message: str, code: int, *, as_json: bool = False, printed: bool = False) -> None:
    """One error, once each: a line on stderr (unless already printed), the log file, and with
    --json the JSON object (unless the command printed its own)."""
    line = display_path(message)
    _run.last_error = message
    if not printed:
        # Plain print, never rich markup: messages carry user file names; and one line,
        # whatever control characters a name smuggles in.
        print(f"archup: error: {line}", file=sys.stderr)
    logs.log_printed_error(f"{_run.command}: error: {line} (exit {code})")
    if as_json and not _run.json_emitted:
        emit_json({"error": message, "exit_code": code})


def fail(message: str, code: int, *, as_json: bool = False) -> None:
    report_error(message, code, as_json=as_json)
    raise typer.Exit(code)


def json_missing() -> bool:
    """Whether a --json run that failed has not printed its JSON object (and what to put in it)."""
    return not _run.json_emitted


def last_error() -> str | None:
    return _run.last_error


def _log_outcome() -> None:
    # The scalar fields of what the command printed (batch id, state, counts, bytes): enough
    # for a cron log to say what each run did, without copying whole listings into it.
    fields = [f"{key}={display_path(str(value))}" for key, value in (_run.result or {}).items()
              if isinstance(value, str | int | float | bool)]
    log.info("%s: done%s", _run.command, ": " + " ".join(fields[:12]) if fields else "")


def handles_errors(command: F) -> F:
    """Map every archup error to its one-line message and documented exit code.

    With --json, stdout still carries exactly one JSON object: the command's own,
    or ``{"error": ..., "exit_code": ...}`` if it failed before printing one.
    """

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("json_output"))
        _run.json_emitted = False
        _run.result = None
        if kwargs.get("quiet"):
            logs.quiet_stderr()  # --quiet wins over -v, which was parsed (and applied) first
        if _run.pending is not None:
            message, code = _run.pending
            _run.pending = None
            fail(message, code, as_json=as_json)
        try:
            outcome = command(*args, **kwargs)
        except ArchupError as error:
            fail(str(error), exit_code_for(error), as_json=as_json)
        except KeyboardInterrupt:
            fail("interrupted", int(ExitCode.INTERRUPTED), as_json=as_json)
        _log_outcome()
        return outcome

    return wrapper  # type: ignore[return-value]


def missing_journal(path: Path | None) -> Path | None:
    """Where the journal would be, if there is none yet (None: it exists). A file where one
    of its directories should be is an error (exit 1), not an empty journal."""
    path = path or default_journal_path()
    if path.exists():
        return None
    blocker = next((parent for parent in path.parents if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise JournalError(f"cannot open journal {path}: Not a directory ({blocker} is a file)")
    return path


@contextmanager
def open_journal(path: Path | None, *, create: bool = True) -> Iterator[Journal]:
    """The journal at ``path`` (else $ARCHUP_JOURNAL, else the default place).

    ``create=False`` is for commands that only look at or end batches: they never leave an
    empty journal, or its directory, behind (a mistyped --journal would look like a real
    one afterwards). A missing journal has no batches: BatchNotFound, exit 2.
    """
    path = path or default_journal_path()
    if not create and missing_journal(path) is not None:
        raise BatchNotFound(f"no journal at {path} (nothing uploaded yet); "
                            "check --journal or ARCHUP_JOURNAL")
    journal = Journal(path)
    try:
        yield journal
    finally:
        journal.close()


# A ULID in Crockford's base32 (no I, L, O, U); the first character carries only 3 bits.
# Checked by pattern: importing python-ulid costs every command a tenth of a second.
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")


def check_batch_id(batch_id: str) -> str:
    canonical = batch_id.strip().upper()
    if not _ULID.fullmatch(canonical):
        raise UsageError(f"malformed batch id {batch_id!r}: expected a 26-character ULID "
                         "such as 01K8RNKN488RQCG3YGG72QBZS5")
    return canonical


def resolve_endpoint(flag: str | None) -> str | None:
    endpoint = (flag or os.environ.get("ARCHUP_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)
    if endpoint is not None:
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"bad endpoint URL {endpoint!r}: expected http(s)://host[:port]")
        if parts.username or parts.password:
            # It would be recorded in the journal and the manifest: credentials belong in the AWS chain.
            raise UsageError("the endpoint URL must not carry credentials (user:password@); "
                             "use a profile or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    return endpoint


def store_for_batch(batch: BatchRecord, endpoint_url: str | None, profile: str | None, region: str | None,
                    **settings: Any) -> S3Store:
    """The store a recorded batch goes to; flags override what the journal recorded (the
    endpoint, region, and the checksum mode the endpoint accepted when the batch began)."""
    recorded = batch.settings or BatchSettings()
    settings.setdefault("checksum", ChecksumMode(recorded.checksum))
    settings.setdefault("full_object_checksum", recorded.full_object_checksum)
    return S3Store(StoreConfig(bucket=batch.bucket, endpoint_url=resolve_endpoint(endpoint_url) or batch.endpoint_url,
                               region=region or batch.region, profile=profile, **settings))


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8MiB', '8M', '16MB', '5242880': binary multiples, like rclone's size suffixes."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"bad size {text!r}: use a number of bytes or a suffix such as 8MiB or 64M")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * 1024 ** " kmgt".index(unit or " ")


def emit_json(document: Any) -> None:
    _run.json_emitted = True
    if isinstance(document, dict):
        _run.result = document
    sys.stdout.write(json.dumps(document, ensure_ascii=False, sort_keys=False) + "\n")
    sys.stdout.flush()


def print_fields(fields: list[tuple[str, Any]]) -> None:
    """A summary: a table on a terminal; for cron (not a terminal) aligned plain lines,
    no box drawing, no escape codes, one ``name  value`` a line for grep and awk."""
    _run.result = dict(fields)
    if sys.stdout.isatty():
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=False, box=box.ROUNDED)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for name, value in fields:
            table.add_row(name, Text(display_path(str(value))))  # Text: a file name is never markup
        Console(highlight=False).print(table)
        return
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name:<{width}}  {value}")
