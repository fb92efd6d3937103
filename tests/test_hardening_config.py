"""Hardening, issue 29 item 11: a config file's edge cases end in one line and exit 2, never in
a bug report, a hang, or all the memory there is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _archup(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    source = tmp_path / "src"
    source.mkdir(exist_ok=True)
    (source / "a.txt").write_text("a\n")
    # A real process: a MemoryError or a hang would be the process's, not the test runner's.
    return subprocess.run([sys.executable, "-m", "archup", *args], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}, check=False)


def _one_error_line(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("archup: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr and "a bug" not in result.stderr, result.stderr


def test_a_crlf_in_the_endpoint_url_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('endpoint_url = "http://127.0.0.1:9000\\r\\n"\n')
    result = _archup(tmp_path, "--config", str(config), "upload", "--bucket", "b", str(tmp_path / "src"))
    _one_error_line(result, "bad endpoint URL 'http://127.0.0.1:9000\\r\\n': it holds a space or a control character")


def test_an_endless_device_as_the_config_is_refused(tmp_path: Path) -> None:
    result = _archup(tmp_path, "--config", "/dev/zero", "list")
    _one_error_line(result, "config file /dev/zero is not a regular file")


def test_a_huge_regular_file_as_the_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "huge.toml"
    with open(config, "wb") as handle:
        handle.truncate(64 << 20)  # sparse: 64 MiB of zeros
    result = _archup(tmp_path, "--config", str(config), "list")
    _one_error_line(result, "is larger than 1048576 bytes: not a config file")


def test_a_fifo_as_the_config_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    result = _archup(tmp_path, "--config", str(fifo), "list")
    _one_error_line(result, f"config file {fifo} is not a regular file")


@pytest.mark.parametrize(("setting", "expected"), [("journal = true", "journal = true (for archup"),
                                                    ("[upload]\nparallel = \"8\"", 'parallel = "8"'),
                                                    ("[upload]\nbucket = 5", "bucket = 5")])
def test_a_value_of_the_wrong_type_is_a_usage_error(tmp_path: Path, setting: str, expected: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(setting + "\n")
    result = _archup(tmp_path, "--config", str(config), "upload", "--bucket", "b", str(tmp_path / "src"))
    _one_error_line(result, expected)
    assert not (tmp_path / "True").exists()


def test_values_of_the_right_types_still_load(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('journal = "j/journal.db"\n[upload]\nparallel = 3\nexclude = ["*.tmp"]\ntimeout = 5\n'
                      'dry_run = true\n')
    result = _archup(tmp_path, "--config", str(config), "upload", "--bucket", "b", str(tmp_path / "src"))
    assert result.returncode == 0, result.stderr
