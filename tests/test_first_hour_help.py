"""--help as a person reads it at 120 columns (and at 80), and click's own usage errors in the
one form every other error has: ``archup: error: ...``, one line, exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

COMMANDS = ["upload", "resume", "status", "finalize", "verify", "list", "abort", "gc", "version"]


def archup(*args: str, columns: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm"}
    return subprocess.run([sys.executable, "-m", "archup", *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


@pytest.mark.parametrize("columns", [80, 120])
def test_the_exit_codes_in_help_never_run_past_the_width_or_split_a_word(columns: int) -> None:
    for args in (["--help"], ["upload", "--help"]):
        result = archup(*args, columns=columns)
        assert result.returncode == 0, result.stderr
        table = result.stdout.split("Exit codes:", 1)[1]
        for line in table.splitlines():
            assert len(line) <= columns, line  # a terminal would break it wherever the width falls
        words = " ".join(line.strip() for line in table.splitlines())
        assert "not the batch's" in words and "the batch is sealed without them" in words, table


def test_environment_variables_are_noted_in_one_form() -> None:
    notes: list[str] = []
    for command in [None, *COMMANDS]:
        result = archup(*([command] if command else []), "--help", columns=200)
        assert result.returncode == 0, result.stderr
        notes += re.findall(r"\[env[^:\]]*:", result.stdout)
    assert notes and set(notes) == {"[env var:"}, sorted(set(notes))


@pytest.mark.parametrize("command,argument", [("upload", "DIR"), ("status", "BATCH"), ("resume", "BATCH")])
def test_the_usage_line_names_the_argument_plainly(command: str, argument: str) -> None:
    result = archup(command, "--help")
    usage = result.stdout.splitlines()[0]
    assert usage == f"Usage: archup {command} [OPTIONS] {argument}", usage


@pytest.mark.parametrize("args", [["upload", "--parallel", "abc", "/tmp"], ["upload", "--no-such-option", "/tmp"],
                                  ["upload"], ["status", "--all=3"]])
def test_a_usage_error_click_finds_is_one_archup_error_line(args: list[str]) -> None:
    result = archup(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("archup: error: "), result.stderr
    assert result.stdout == ""
    if "--parallel" in args:
        assert "'abc' is not a valid integer" in lines[0] or "'abc' is not a valid int" in lines[0], lines
        assert "--parallel" in lines[0]
