"""Every command has help text and is documented in the README; the exit-code table is in both."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from archup.cli import app
from archup.errors import EXIT_CODE_TABLE

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_the_cli_has_the_commands_users_expect() -> None:
    assert {"upload", "status", "finalize", "resume", "list", "abort", "gc"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_has_help_and_is_in_the_readme(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.stdout
    docstring = typer.main.get_command(app).commands[command].help  # type: ignore[attr-defined]
    assert docstring and len(docstring.strip()) > 20
    assert re.search(rf"`archup {command}\b", README), f"'archup {command}' is not documented in README.md"
    assert f"archup {command}" in README.split("## Commands", 1)[1], f"no example of 'archup {command}'"


def test_exit_code_table_is_in_help_and_readme() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for code, meaning in EXIT_CODE_TABLE:
        assert re.search(rf"^\s*{int(code)}\s+{re.escape(meaning[:20])}", result.stdout, re.MULTILINE), code
        assert re.search(rf"^\| {int(code)} \|", README, re.MULTILINE), f"exit code {code} missing in README"


def test_readme_starts_with_the_two_commands() -> None:
    first_block = README.split("## First two commands", 1)[1].split("##", 1)[0]
    assert "scripts/test-parallel.sh" in first_block
    assert "scripts/test.sh" in first_block
    assert "scripts/test.sh" in (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
