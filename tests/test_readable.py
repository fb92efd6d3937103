"""Numbers a person reads at a glance on a terminal; raw ones for cron and --json.

The terminal side (a real pseudo-terminal) is in tests/test_terminal.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from archup.cli import human


@pytest.mark.parametrize(("count", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536, "1.50 KiB"), (10 * 1024, "10.0 KiB"),
    (384 * 1024, "384 KiB"), (54231040, "51.7 MiB"), (2 ** 31, "2.00 GiB"), (5 * 2 ** 40, "5.00 TiB"),
])
def test_sizes_in_binary_units(count: int, text: str) -> None:
    assert human.size(count) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (0.4, "0.4s"), (12, "12s"), (134, "2m 14s"), (3 * 3600 + 300, "3h 05m"), (2 * 86400 + 4 * 3600, "2d 4h"),
])
def test_durations_as_a_person_says_them(seconds: float, text: str) -> None:
    assert human.duration(seconds) == text


def test_summary_fields_in_words_and_units() -> None:
    assert human.label("files_uploaded") == "files uploaded" and human.label("total_bytes") == "size"
    assert human.value("total_bytes", 54231040) == "51.7 MiB"
    assert human.value("bytes_per_s", 1024 * 1024) == "1.00 MiB/s"
    assert human.value("elapsed_s", 134.2) == "2m 14s"
    assert human.value("files_uploaded", 5) == 5 and human.value("scan_complete", True) is True


def write_source(root: Path) -> int:
    root.mkdir()
    for index in range(4):
        (root / f"f{index}.bin").write_bytes(bytes([index]) * 5000)
    return 4 * 5000


def test_json_has_elapsed_and_rate_and_every_number_stays_raw(cli, tmp_path: Path) -> None:
    total = write_source(tmp_path / "src")
    result = cli("upload", "--json", str(tmp_path / "src"))
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert isinstance(document["elapsed_s"], float) and document["elapsed_s"] > 0
    assert isinstance(document["bytes_per_s"], int) and document["bytes_per_s"] > 0
    assert document["total_bytes"] == document["bytes_sent"] == total
    assert document["bytes_per_s"] == pytest.approx(total / document["elapsed_s"], rel=0.01, abs=1)


def test_cron_output_keeps_name_value_lines_with_the_two_new_fields(cli, tmp_path: Path) -> None:
    total = write_source(tmp_path / "src")
    result = cli.subprocess("upload", str(tmp_path / "src"))  # stdout is a pipe: no terminal
    assert result.exit_code == 0, result.stderr
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in result.stdout.splitlines())
    assert fields["total_bytes"] == str(total) and fields["files_uploaded"] == "4"
    assert re.fullmatch(r"\d+\.\d+", fields["elapsed_s"]) and re.fullmatch(r"\d+", fields["bytes_per_s"])
    assert "\x1b[" not in result.stdout and "MiB" not in result.stdout and "KiB" not in result.stdout


def test_resume_reports_elapsed_and_rate_too(cli, tmp_path: Path) -> None:
    write_source(tmp_path / "src")
    uploaded = cli("upload", "--no-finalize", "--json", str(tmp_path / "src"))
    assert uploaded.exit_code == 0, uploaded.stderr
    first = json.loads(uploaded.stdout)
    assert first["elapsed_s"] > 0 and "bytes_per_s" in first  # --no-finalize's report has them as well
    resumed = cli("resume", first["batch_id"], "--endpoint-url", cli.endpoint, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    document = json.loads(resumed.stdout)
    assert document["elapsed_s"] > 0 and document["bytes_per_s"] == 0  # nothing left to send
