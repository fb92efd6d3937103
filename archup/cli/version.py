"""archup version / archup --version: archup's version and its libraries', as rclone and aws print them."""

from __future__ import annotations

import platform
import sys

import typer

from .. import __version__
from .common import emit_json, handles_errors
from .options import JsonOption

# The libraries that decide how archup talks to a server; None where one is not installed.
LIBRARIES = ("boto3", "botocore", "awscrt")


def versions() -> dict[str, str | None]:
    """Read from the installed packages' metadata: nothing is imported (no boto3 start-up)."""
    from importlib import metadata

    found: dict[str, str | None] = {"archup": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def version_lines() -> str:
    found = versions()
    lines = [f"archup {found['archup']}", f"- python {found['python']} ({platform.python_implementation()}, "
             f"{sys.platform}/{platform.machine()})"]
    lines += [f"- {name} {found[name]}" for name in LIBRARIES if found[name] is not None]
    return "\n".join(lines)


def show_version(value: bool) -> None:
    """The eager --version option: print and stop before any command runs."""
    if value:
        typer.echo(version_lines())
        raise typer.Exit()


@handles_errors
def version(json_output: JsonOption = False) -> None:
    """Print archup's version and those of Python, boto3, botocore and awscrt (where installed)."""
    if json_output:
        emit_json(versions())
    else:
        typer.echo(version_lines())
