"""One owner per batch, abort, list and gc, over HTTP to the moto server."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from ulid import ULID

from archup.lock import BatchLock

BIG = 6 * 1024 * 1024


def _source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    (source / "small.txt").write_text("small")
    (source / "big.bin").write_bytes(os.urandom(BIG))
    return source


def _crashed_batch(cli, source: Path) -> str:  # type: ignore[no-untyped-def]
    """A batch killed mid-multipart: its upload id is recorded, no part sent."""
    crashed = cli.subprocess("upload", "--part-size", "5MiB", str(source),
                             env={"ARCHUP_CRASH_AT": "after-record-upload-id"})
    assert crashed.exit_code == -9, crashed.stderr
    with sqlite3.connect(cli.journal) as conn:
        return str(conn.execute("SELECT batch_id FROM batches").fetchone()[0])


def _uploads(s3, bucket: str, batch_id: str) -> list:  # type: ignore[no-untyped-def]
    return s3.list_multipart_uploads(Bucket=bucket, Prefix=f"staging/{batch_id}/").get("Uploads", [])


def test_a_second_owner_is_refused_naming_the_holder(cli, tmp_path: Path) -> None:
    source = _source(tmp_path)
    batch_id = _crashed_batch(cli, source)
    with BatchLock(cli.journal, batch_id):
        busy = cli.subprocess("upload", "--batch", batch_id, "--part-size", "5MiB", str(source))
        assert busy.exit_code == 4, busy.stderr
        assert f"pid {os.getpid()}" in busy.stderr and "busy" in busy.stderr
        assert cli.subprocess("finalize", batch_id).exit_code == 4
    resumed = cli("resume", batch_id, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["files_uploaded"] == 2


def test_a_killed_owner_never_blocks(cli, tmp_path: Path) -> None:
    source = _source(tmp_path)
    batch_id = _crashed_batch(cli, source)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from archup.lock import BatchLock; "
         f"lock = BatchLock(Path({str(cli.journal)!r}), {batch_id!r}).acquire(); print('held', flush=True); "
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert cli("status", batch_id).exit_code == 0  # reading never needs the lock
    assert cli.subprocess("finalize", batch_id).exit_code == 4
    holder.kill()
    holder.wait(timeout=30)
    resumed = cli("resume", batch_id, "--json")
    assert resumed.exit_code == 0, resumed.stderr


def test_different_batches_lock_side_by_side(journal_path: Path) -> None:
    with BatchLock(journal_path, str(ULID())), BatchLock(journal_path, str(ULID())):
        pass


def test_abort_aborts_uploads_and_purge_deletes_objects(cli, s3, bucket, tmp_path: Path) -> None:
    source = _source(tmp_path)
    batch_id = _crashed_batch(cli, source)
    assert len(_uploads(s3, bucket, batch_id)) == 1
    aborted = cli("abort", batch_id, "--json", "--endpoint-url", cli.endpoint)
    assert aborted.exit_code == 0, aborted.stderr
    assert json.loads(aborted.stdout)["uploads_aborted"] == 1
    assert _uploads(s3, bucket, batch_id) == []
    assert json.loads(cli("status", batch_id, "--json").stdout)["status"] == "aborted"
    again = cli("abort", batch_id, "--purge", "--json", "--endpoint-url", cli.endpoint)
    assert again.exit_code == 0, again.stderr
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=f"staging/{batch_id}/")
    refused = cli("upload", "--batch", batch_id, str(source))
    assert refused.exit_code != 0 and "aborted" in refused.stderr


def test_abort_refuses_a_finalized_batch(cli, tmp_path: Path) -> None:
    source = _source(tmp_path)
    done = cli("upload", "--json", str(source))
    assert done.exit_code == 0, done.stderr
    batch_id = json.loads(done.stdout)["batch_id"]
    refused = cli("abort", batch_id, "--endpoint-url", cli.endpoint)
    assert refused.exit_code == 1
    assert "finalized" in refused.stderr


def test_list_shows_batches_and_filters_by_state(cli, tmp_path: Path) -> None:
    source = _source(tmp_path)
    crashed = _crashed_batch(cli, source)
    done = json.loads(cli("upload", "--new-batch", "--json", str(source)).stdout)["batch_id"]
    listing = json.loads(cli("list", "--json").stdout)["batches"]
    assert {row["batch_id"]: row["status"] for row in listing} == {crashed: "uploading", done: "enqueued"}
    only = json.loads(cli("list", "--json", "--status", "enqueued").stdout)["batches"]
    assert [row["batch_id"] for row in only] == [done]
    assert only[0]["files_uploaded"] == 2


def test_gc_expires_stale_batches_and_reports_orphans(cli, s3, bucket, tmp_path: Path) -> None:
    source = _source(tmp_path)
    stale = _crashed_batch(cli, source)
    done = json.loads(cli("upload", "--new-batch", "--json", str(source)).stdout)["batch_id"]
    with sqlite3.connect(cli.journal) as conn:
        conn.execute("UPDATE batches SET expires_at = '2000-01-01T00:00:00.000Z'")
    orphan = s3.create_multipart_upload(Bucket=bucket, Key=f"staging/{ULID()}/files/x")["UploadId"]

    report = json.loads(cli("gc", "--json", "--endpoint-url", cli.endpoint).stdout)
    assert [row["batch_id"] for row in report["expired"]] == [stale]  # the finalized one is untouched
    assert report["expired"][0]["uploads_aborted"] == 1
    assert _uploads(s3, bucket, stale) == []
    assert [row["upload_id"] for row in report["orphan_uploads"]] == [orphan]
    assert report["orphans_aborted"] == 0
    statuses = {row["batch_id"]: row["status"] for row in json.loads(cli("list", "--json").stdout)["batches"]}
    assert statuses == {stale: "expired", done: "enqueued"}

    cleaned = json.loads(cli("gc", "--json", "--abort-orphans", "--endpoint-url", cli.endpoint).stdout)
    assert cleaned["orphans_aborted"] == 1
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_gc_leaves_a_busy_batch_alone(cli, tmp_path: Path) -> None:
    source = _source(tmp_path)
    batch_id = _crashed_batch(cli, source)
    with BatchLock(cli.journal, batch_id):
        report = json.loads(cli("gc", "--json", "--older-than", "0s", "--endpoint-url", cli.endpoint).stdout)
    assert report["busy"] == [batch_id] and report["expired"] == []
    assert json.loads(cli("status", batch_id, "--json").stdout)["status"] == "uploading"
