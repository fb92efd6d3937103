"""The command line: one small module per command over the library core."""

from __future__ import annotations

import typer

from ..errors import EXIT_CODE_TABLE
from . import finalize, lifecycle, status, upload

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
app.command("upload", epilog=EXIT_CODES_HELP)(upload.upload)
app.command("status")(status.status)
app.command("resume")(upload.resume)
app.command("finalize")(finalize.finalize)
app.command("list")(lifecycle.list_batches)
app.command("abort")(lifecycle.abort)
app.command("gc")(lifecycle.gc)


def main() -> None:
    app()
