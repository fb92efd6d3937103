"""Hardening, issue 29 item 7 and issue 27 item 2: names that are not valid UTF-8 are never
archived (no key could be restored to them). A directory is unreadable: named, exit 3, in
manifest-skipped.jsonl. A file is skipped by its escaped name, with no trailing '/', and its
real size and mtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_inputs import journal_files, only_batch

from archup.states import FileState


def _summary_and_skipped(cli, s3, bucket: str, result) -> tuple[dict, dict[str, str]]:  # type: ignore[no-untyped-def]
    summary = json.loads(result.stdout)
    document = json.loads(s3.get_object(Bucket=bucket, Key=summary["manifest_key"])["Body"].read())
    body = s3.get_object(Bucket=bucket, Key=document["skipped"]["key"])["Body"].read()
    return summary, {line["path"]: line["reason"] for line in map(json.loads, body.decode("utf-8").splitlines())}


def test_a_directory_whose_name_is_not_utf8_is_unreadable_named_and_exits_3(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "good.txt").write_bytes(b"good\n")
    cafe = os.fsencode(source) + b"/Caf\xe9"
    os.mkdir(cafe)
    for number in range(50):
        with open(cafe + b"/file-%02d.txt" % number, "wb") as handle:
            handle.write(b"inside a latin-1 directory\n")

    result = cli("upload", "--json", str(source))

    assert result.exit_code == 3, (result.stdout, result.stderr)
    summary, skipped = _summary_and_skipped(cli, s3, bucket, result)
    assert summary["files_unreadable"] == 1 and summary["files_uploaded"] == 1, summary
    assert skipped == {"Caf\\xe9": "directory unreadable: its name is not valid UTF-8"}
    assert summary["unreadable"] == [{"path": "Caf\\xe9",
                                      "error": "directory unreadable: its name is not valid UTF-8"}]
    text = cli("upload", str(source))  # a second run, as a person reads it
    assert text.exit_code == 3
    assert "skipped: Caf\\xe9: directory unreadable: its name is not valid UTF-8" in text.stderr, text.stderr


def test_a_file_whose_name_is_not_utf8_shows_as_the_file_it_is(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "good.txt").write_bytes(b"good\n")
    latin = os.fsencode(source) + b"/caf\xe9-latin1.txt"
    with open(latin, "wb") as handle:
        handle.write(b"twenty-one bytes....\n")
    os.utime(latin, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))

    result = cli("upload", "--json", str(source))

    assert result.exit_code == 0, (result.stdout, result.stderr)
    _, skipped = _summary_and_skipped(cli, s3, bucket, result)
    assert skipped == {"caf\\xe9-latin1.txt": "file name is not valid UTF-8"}
    record = journal_files(cli.journal, only_batch(cli.journal).batch_id)["caf\\xe9-latin1.txt"]
    assert record.state is FileState.SKIPPED
    assert (record.size, record.mtime_ns) == (21, 1_600_000_000_123_456_789)
    status = cli("status", only_batch(cli.journal).batch_id)
    assert "skipped: caf\\xe9-latin1.txt: file name is not valid UTF-8" in status.stdout, status.stdout
