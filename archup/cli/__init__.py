"""The command line: one small module per command over the library core."""

from __future__ import annotations

import logging
import re
import signal
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

try:  # newer typer vendors its own copy of click, whose exceptions it raises
    import typer._click as click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer uses click itself
    import click  # type: ignore[no-redef]
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[assignment]

from .. import logs
from ..errors import EXIT_CODE_TABLE, ArchupError, ExitCode, exit_code_for
from . import config as config_file
from . import finalize, lifecycle, restore, status, upload, verify
from . import version as version_command
from .common import Invocation, defer_error, emit_json, json_requested, report_error


def _exit_codes_help(width: int = 76) -> str:
    """The table, each meaning wrapped under itself to fit 80 columns with click's indent: a
    terminal would otherwise break its long lines in the middle of a word. "\b" keeps click
    from re-wrapping it into one paragraph."""
    rows = [textwrap.fill(meaning, width, initial_indent=f"{code:>5}  ", subsequent_indent=" " * 7,
                          break_long_words=False, break_on_hyphens=False)
            for code, meaning in EXIT_CODE_TABLE]
    return "\b\nExit codes:\n" + "\n".join(rows)


EXIT_CODES_HELP = _exit_codes_help()


class Command(TyperCommand):
    """A command whose usage line names its argument as the help does (``DIR``, not typer's
    ``{DIR}``)."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [re.sub(r"\{([A-Z_]+)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]

app = typer.Typer(
    name="archup",
    help="Parallel archival uploader for S3-compatible storage, with a crash-safe journal.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def settings(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(
        "--config", help="TOML config file [env var: ARCHUP_CONFIG; default: ~/.config/archup/config.toml]. "
        "Precedence: flags, then environment, then this file.", show_default=False)] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More log output: -v info, -vv debug, -vvv botocore too. "
                                         "Credentials and signatures are always scrubbed.")] = 0,
    log_file: Annotated[Path | None, typer.Option("--log-file", help="Also write the log to this file (0600).",
                                                  show_default=False)] = None,
    show_version: Annotated[bool, typer.Option(
        "--version", help="Print archup's version and its libraries', then exit.", is_eager=True,
        callback=version_command.show_version)] = False,
) -> None:
    """Parallel archival uploader for S3-compatible storage, with a crash-safe journal."""
    # Runs after the group's options are parsed and before the command's are, so the
    # command sees the file's values as its defaults. Errors here are reported by the
    # command (deferred), which knows whether to print them as JSON.
    ctx.ensure_object(Invocation).begin(ctx.invoked_subcommand)
    try:
        logs.configure(verbose, log_file)
    except OSError as error:
        defer_error(ctx, f"cannot open log file {log_file}: {error.strerror}", int(ExitCode.USAGE))
        return
    try:
        ctx.default_map = config_file.load(config, ctx.command)  # type: ignore[arg-type]
    except ArchupError as error:
        defer_error(ctx, str(error), exit_code_for(error))


app.command("upload", epilog=EXIT_CODES_HELP, cls=Command)(upload.upload)
app.command("status", cls=Command)(status.status)
app.command("resume", cls=Command)(upload.resume)
app.command("finalize", cls=Command)(finalize.finalize)
app.command("verify", cls=Command)(verify.verify)
app.command("restore", epilog=EXIT_CODES_HELP, cls=Command)(restore.restore)
app.command("list", cls=Command)(lifecycle.list_batches)
app.command("abort", cls=Command)(lifecycle.abort)
app.command("gc", cls=Command)(lifecycle.gc)
app.command("version", cls=Command)(version_command.version)


def _tune_malloc() -> None:
    """glibc only, before any thread starts: buffers of 512 KiB and more (shard bodies, parts)
    are always mapped and given back whole when freed, and threads share two arenas. By
    default glibc raises its mapping threshold to the largest block freed (8 MiB after the
    first shard), so later bodies come from per-thread arenas that keep their pages: 100,000
    packed files peaked at 211 MiB against 154 MiB so (docs/benchmarks.md)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    m_mmap_threshold, m_arena_max = -3, -8
    mallopt(m_mmap_threshold, 512 * 1024)
    mallopt(m_arena_max, 2)


def main() -> None:
    """The console script. Unlike app() alone, --json gets its one JSON object whatever fails:
    click's own usage errors (exit 2) and unexpected exceptions (exit 1, one line, no traceback)."""
    _tune_malloc()
    as_json = json_requested(sys.argv[1:])
    run = Invocation()  # the command's context object, still here after click is done
    try:
        code = app(standalone_mode=False, obj=run, prog_name="archup")
    except NoArgsIsHelpError as error:
        error.show()  # bare 'archup' (or a command alone) is click's help: nothing failed, nothing to report
        code = error.exit_code
    except ClickException as error:
        # A bad option or value click found: one line like every other error, with where help is.
        code = error.exit_code
        where = getattr(getattr(error, "ctx", None), "command_path", None)
        message = error.format_message().rstrip(".")
        report_error(message + (f"; see '{where} --help'" if where else ""), code, as_json=as_json, run=run)
    except typer.Abort:
        code = int(ExitCode.ERROR)
        report_error("aborted", code, as_json=as_json, run=run)
    except Exception as error:  # a bug: one line for cron, the traceback for -vv
        logging.getLogger("archup").debug("unexpected error", exc_info=True)
        code = int(ExitCode.ERROR)
        report_error(f"unexpected {type(error).__name__}: {error} (a bug; -vv logs the traceback)", code,
                     as_json=as_json, run=run)
    code = code if isinstance(code, int) else 0
    if as_json and code and not run.json_emitted:  # whatever exited non-zero without saying so in JSON
        emit_json({"error": run.last_error or f"exit {code}", "exit_code": code}, run=run)
    if run.signalled:
        # The run was stopped by a signal and its last line is out: another one changes nothing
        # now. Ignored, not left to the default action that the interpreter puts back as it
        # shuts down, which would end the process by SIGINT instead of with its exit code.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)
