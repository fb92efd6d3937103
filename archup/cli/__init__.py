"""The command line: one small module per command over the library core."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import logs
from ..errors import EXIT_CODE_TABLE, ArchupError, exit_code_for
from . import config as config_file
from . import finalize, lifecycle, status, upload, verify
from .common import fail

# "\b" keeps click from re-wrapping the table into one paragraph.
EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"{code:>5}  {meaning}" for code, meaning in EXIT_CODE_TABLE)

app = typer.Typer(
    name="archup",
    help="Parallel archival uploader for S3-compatible storage, with a crash-safe journal.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def settings(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(
        "--config", help="TOML config file [env: ARCHUP_CONFIG; default: ~/.config/archup/config.toml]. "
        "Precedence: flags, then environment, then this file.", show_default=False)] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More log output: -v info, -vv debug, -vvv botocore too. "
                                         "Credentials and signatures are always scrubbed.")] = 0,
    log_file: Annotated[Path | None, typer.Option("--log-file", help="Also write the log to this file (0600).",
                                                  show_default=False)] = None,
) -> None:
    """Parallel archival uploader for S3-compatible storage, with a crash-safe journal."""
    # Runs after the group's options are parsed and before the command's are, so the
    # command sees the file's values as its defaults.
    try:
        logs.configure(verbose, log_file)
    except OSError as error:
        fail(f"cannot open log file {log_file}: {error.strerror}", 2)
    try:
        ctx.default_map = config_file.load(config, ctx.command)  # type: ignore[arg-type]
    except ArchupError as error:
        fail(str(error), exit_code_for(error))


app.command("upload", epilog=EXIT_CODES_HELP)(upload.upload)
app.command("status")(status.status)
app.command("resume")(upload.resume)
app.command("finalize")(finalize.finalize)
app.command("verify")(verify.verify)
app.command("list")(lifecycle.list_batches)
app.command("abort")(lifecycle.abort)
app.command("gc")(lifecycle.gc)


def main() -> None:
    app()
