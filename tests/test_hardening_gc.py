"""Hardening, issue 29 item 8: gc --abort-orphans aborts only orphan uploads whose batch
began longer ago than --older-than (24 h by default): hosts with journals of their own on one
bucket see each other's uploads in flight as orphans."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from test_crash import open_uploads
from test_lifecycle import finalized, other_source  # noqa: F401 -- a fixture
from ulid import ULID

from archup.clock import utcnow


def _orphan(s3: Any, bucket: str, age: timedelta, name: str = "x") -> tuple[str, str]:
    key = f"staging/{ULID.from_datetime(utcnow() - age)}/files/{name}"
    return key, s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]


def test_gc_aborts_only_orphans_older_than_24h_by_default(cli: Any, s3: Any, other_source: Path) -> None:  # noqa: F811
    finalized(cli, other_source)  # gc looks under the destinations the journal knows
    in_flight = _orphan(s3, cli.bucket, timedelta(minutes=5), "another-hosts-file")
    undated = ("staging/not-a-batch/files/y",
               s3.create_multipart_upload(Bucket=cli.bucket, Key="staging/not-a-batch/files/y")["UploadId"])
    stale = _orphan(s3, cli.bucket, timedelta(days=2))

    result = cli("gc", "--abort-orphans", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["orphans_aborted"] == 1
    assert sorted(open_uploads(s3, cli.bucket)) == sorted([in_flight, undated])
    assert stale not in open_uploads(s3, cli.bucket)
    kept = {orphan["key"]: orphan["reason"] for orphan in report["orphans_kept"]}
    assert kept == {in_flight[0]: "its batch began less than 24h ago",
                    undated[0]: "its key names no batch archup can date"}

    text = cli("gc", "--abort-orphans")
    assert text.exit_code == 0
    assert f"{in_flight[0]} ({in_flight[1]}) kept: its batch began less than 24h ago" in text.stdout


def test_gc_older_than_sets_the_age_of_orphans_it_aborts(cli: Any, s3: Any, other_source: Path) -> None:  # noqa: F811
    finalized(cli, other_source)
    young = _orphan(s3, cli.bucket, timedelta(minutes=10))
    older = _orphan(s3, cli.bucket, timedelta(hours=2))
    result = cli("gc", "--abort-orphans", "--older-than", "1h", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["orphans_aborted"] == 1
    assert open_uploads(s3, cli.bucket) == [young]
    assert older not in open_uploads(s3, cli.bucket)
