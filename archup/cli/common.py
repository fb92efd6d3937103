"""What every command shares: options, opening the journal, errors to exit codes, output."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

try:  # newer typer vendors its own copy of click
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import get_current_context  # type: ignore[no-redef]

from .. import logs
from ..errors import ArchupError, BatchNotFound, ExitCode, JournalError, UsageError, exit_code_for
from ..journal import Journal, SQLiteJournal, is_shared_location, open_journal_at
from ..locations import check_journal_path, journal_location
from ..scan import display_path

if TYPE_CHECKING:  # the library's sending modules load only when a command sends
    from ..run import Transport

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Invocation:
    """One command run, kept on typer's context (``ctx.obj``): its name, whether --json printed
    its object, what it printed, its last error, and an error of the group's own settings
    that the command must report (only the command knows whether --json was asked for:
    click has not parsed its options yet)."""

    command: str = "archup"
    json_emitted: bool = False
    result: dict[str, Any] | None = None
    outcome: Any = None  # a sending command's RunOutcome, for --metrics-file
    last_error: str | None = None
    pending: tuple[str, int] | None = None
    signalled: bool = False  # a SIGINT/SIGTERM stopped the run (cli.upload.Stopping)

    def begin(self, command: str | None) -> None:
        self.command = f"archup {command}" if command else "archup"
        self.json_emitted = False
        self.result = None
        self.outcome = None
        self.last_error = None
        self.pending = None
        self.signalled = False


_OUTSIDE = Invocation()  # for the library's callers outside any command (never for a command run)
log = logging.getLogger("archup")


def invocation() -> Invocation:
    """The running command's invocation (typer's context object)."""
    ctx = get_current_context(silent=True)
    found = ctx.find_object(Invocation) if ctx is not None else None
    return found if found is not None else _OUTSIDE


def defer_error(ctx: typer.Context, message: str, code: int) -> None:
    """Fail the command about to run with this error, before it does anything."""
    ctx.ensure_object(Invocation).pending = (message, code)


def json_requested(args: Sequence[str]) -> bool:
    """--json among these arguments (not after '--', where it would be a directory name)."""
    return "--json" in list(itertools.takewhile(lambda arg: arg != "--", args))


def report_error(message: str, code: int, *, as_json: bool = False, printed: bool = False,
                 run: Invocation | None = None) -> None:
    """One error, once each: a line on stderr (unless already printed), the log file, and with
    --json the JSON object (unless the command printed its own)."""
    run = run or invocation()
    line = display_path(message)
    run.last_error = message
    if not printed:
        # Plain print, never rich markup: messages carry user file names; and one line,
        # whatever control characters a name smuggles in.
        print(f"archup: error: {line}", file=sys.stderr)
    logs.log_printed_error(f"{run.command}: error: {line} (exit {code})")
    if as_json and not run.json_emitted:
        emit_json({"error": message, "exit_code": code}, run=run)


def fail(message: str, code: int, *, as_json: bool = False) -> None:
    report_error(message, code, as_json=as_json)
    raise typer.Exit(code)


def _log_outcome(run: Invocation) -> None:
    # The scalar fields of what the command printed (batch id, state, counts, bytes): enough
    # for a cron log to say what each run did, without copying whole listings into it.
    fields = [f"{key}={display_path(str(value))}" for key, value in (run.result or {}).items()
              if isinstance(value, str | int | float | bool)]
    log.info("%s: done%s", run.command, ": " + " ".join(fields[:12]) if fields else "")


def handles_errors(command: F) -> F:
    """Map every archup error to its one-line message and documented exit code.

    With --json, stdout still carries exactly one JSON object: the command's own,
    or ``{"error": ..., "exit_code": ...}`` if it failed before printing one.
    """

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("json_output"))
        run = invocation()
        run.json_emitted = False
        run.result = None
        if kwargs.get("quiet"):
            logs.quiet_stderr()  # --quiet wins over -v, which was parsed (and applied) first
        if run.pending is not None:
            message, code = run.pending
            run.pending = None
            fail(message, code, as_json=as_json)
        try:
            outcome = command(*args, **kwargs)
        except ArchupError as error:
            fail(str(error), exit_code_for(error), as_json=as_json)
        except KeyboardInterrupt:
            fail("interrupted", int(ExitCode.INTERRUPTED), as_json=as_json)
        _log_outcome(run)
        return outcome

    return wrapper  # type: ignore[return-value]


def missing_journal(location: str | None) -> Path | None:
    """Where the journal would be, if there is none yet (None: it exists, or it is a shared
    journal's URL). A file where one of its directories should be is an error (exit 1), not
    an empty journal."""
    where = journal_location(location)
    if is_shared_location(where):
        return None
    path = Path(where)
    check_journal_path(path)  # a dangling symlink there is not "no journal yet"
    if path.exists():
        return None
    blocker = next((parent for parent in path.parents if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise JournalError(f"cannot open journal {path}: Not a directory ({blocker} is a file)")
    return path


@contextmanager
def open_journal(location: str | None, *, create: bool = True) -> Iterator[Journal]:
    """The journal at ``location``, a path or a ``postgresql://`` URL (else $ARCHUP_JOURNAL,
    else the default place).

    ``create=False`` is for commands that only look at or end batches: they never leave an
    empty journal, or its directory, behind (a mistyped --journal would look like a real
    one afterwards). A missing journal has no batches: BatchNotFound, exit 2.
    """
    where = journal_location(location)
    if not create and missing_journal(where) is not None:
        raise BatchNotFound(f"no journal at {where} (nothing uploaded yet); "
                            "check --journal or ARCHUP_JOURNAL")
    if not is_shared_location(where):
        check_journal_path(where)  # before SQLite opens (or creates) anything there
    else:
        warn_password_on_command_line(where)
    journal = open_journal_at(where) if is_shared_location(where) else SQLiteJournal(where)
    try:
        yield journal
    finally:
        journal.close()


def warn_password_on_command_line(url: str) -> None:
    """A password in a --journal URL typed on the command line is in every user's ps output."""
    from ..journal.pgdatabase import password_of

    ctx = get_current_context(silent=True)
    if ctx is None or not password_of(url):
        return
    source = ctx.get_parameter_source("journal_path")
    if source is not None and source.name == "COMMANDLINE":
        log.warning("the --journal URL carries a password, which other users of this host see in ps; "
                    "give it in PGPASSWORD, ~/.pgpass or PGSERVICE (~/.pg_service.conf) instead")


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
        if any(char.isspace() or not char.isprintable() for char in endpoint):
            # urlsplit would silently drop a CR or LF that botocore then refuses (a ValueError).
            raise UsageError(f"bad endpoint URL {endpoint!r}: it holds a space or a control character")
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"bad endpoint URL {endpoint!r}: expected http(s)://host[:port]")
        if parts.username or parts.password:
            # It would be recorded in the journal and the manifest: credentials belong in the AWS chain.
            raise UsageError("the endpoint URL must not carry credentials (user:password@); "
                             "use a profile or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    return endpoint


def normalize_prefix(prefix: str) -> str:
    """A key prefix as archup stores it: no leading slash, one trailing slash, no '.' or '..' segment."""
    prefix = prefix.strip().lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if any(segment in (".", "..") for segment in prefix.split("/")[:-1]):
        raise UsageError(f"bad prefix {prefix!r}: '.' and '..' segments are not allowed")
    return prefix


def transport(endpoint_url: str | None, profile: str | None, region: str | None, *,
              trust_recorded_endpoint: bool = False, **settings: Any) -> Transport:
    """How this run reaches the destination, from its flags (and the endpoint's environment)."""
    from ..run import Transport

    return Transport(endpoint_url=resolve_endpoint(endpoint_url), region=region, profile=profile,
                     trust_recorded_endpoint=trust_recorded_endpoint, **settings)


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8MiB', '8M', '16MB', '5242880': binary multiples, like rclone's size suffixes."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"bad size {text!r}: use a number of bytes or a suffix such as 8MiB or 64M")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * 1024 ** " kmgt".index(unit or " ")


def emit_json(document: Any, *, run: Invocation | None = None) -> None:
    run = run or invocation()
    run.json_emitted = True
    if isinstance(document, dict):
        run.result = document
    sys.stdout.write(json.dumps(document, ensure_ascii=False, sort_keys=False) + "\n")
    sys.stdout.flush()


def print_fields(fields: list[tuple[str, Any]]) -> None:
    """A summary: a table on a terminal, labels in words and numbers in units; for cron (not a
    terminal) aligned plain lines, no box drawing, no escape codes, one ``name  value`` a line
    with the raw number, for grep and awk."""
    invocation().result = dict(fields)
    if sys.stdout.isatty():
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        from . import human

        table = Table(show_header=False, box=box.ROUNDED)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for name, value in fields:
            # Text: a file name is never markup.
            table.add_row(human.label(name), Text(display_path(str(human.value(name, value)))))
        Console(highlight=False).print(table)
        return
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name:<{width}}  {display_path(str(value))}")
