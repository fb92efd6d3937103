"""Packed shards are as crash-safe as any file: kill -9 at each packing crash point and a
resume converges (a large shard at part level); a member that changed since the scan fails
by name and its shard is planned again without it; no shard ever holds member bytes that
differ from their manifest entry; --skip-archived and every checksum mode work packed."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from test_inputs import after_scan
from test_pack import get, manifest
from test_verify import make_source

from archup.uploader import Uploader

KiB = 1024
MiB = 1024 * KiB


def files_of(count: int, seed: int, size: int = 2 * KiB, prefix: str = "d") -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"{prefix}/f{index:04d}": rng.randbytes(rng.randrange(0, size)) for index in range(count)}


def check_batch(s3: Any, bucket: str, report: dict[str, Any], expected: dict[str, bytes]) -> dict[str, Any]:
    """Every file once in the manifest; a packed one's bytes at its offset in its shard are its
    own and hash to its entry; each shard hashes to its line."""
    summary, entries, shards = manifest(s3, bucket, report)
    assert sorted(entry["path"] for entry in entries) == sorted(expected)
    bodies = {}
    for shard in shards:
        bodies[shard["key"]] = get(s3, bucket, shard["key"])
        assert hashlib.sha256(bodies[shard["key"]]).hexdigest() == shard["sha256"]
    for entry in entries:
        data = expected[entry["path"]]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), entry["path"]
        if "shard" in entry:
            assert bodies[entry["shard"]][entry["offset"]:entry["offset"] + entry["size"]] == data
        else:
            assert get(s3, bucket, entry["key"]) == data
    return summary


def rows(journal: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(journal) as conn:
        return list(conn.execute(sql))


def open_uploads(s3: Any, bucket: str) -> list[str]:
    return [upload["Key"] for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


SINGLE = ("--pack-under", "64KiB", "--shard-size", "64KiB", "--parallel", "3", "--json")
LARGE = ("--pack-under", "64KiB", "--shard-size", "16MiB", "--part-size", "5MiB", "--parallel", "3", "--json")


@pytest.mark.parametrize("point, args, count", [
    ("before-put-shard:2", SINGLE, 60),
    ("after-put-shard:2", SINGLE, 60),
    ("after-create-shard-upload", LARGE, 300),
    ("after-upload-shard-part:2", LARGE, 300),
    ("after-complete-shard", LARGE, 300),
])
def test_kill_at_a_packing_point_then_resume_converges(cli, s3, tmp_path, point, args, count) -> None:
    files = files_of(count, seed=len(point), size=(4 * KiB if args is SINGLE else 64 * KiB))
    source = make_source(tmp_path / "src", files)
    crashed = cli.subprocess("upload", *args, str(source), env={"ARCHUP_CRASH_AT": point})
    assert crashed.exit_code == -signal.SIGKILL, crashed.stderr
    (batch_id,) = rows(cli.journal, "SELECT batch_id FROM batches")[0]
    uploading = rows(cli.journal, "SELECT shard_no, key, upload_id FROM shards WHERE state = 'uploading'")
    assert uploading, "the crash left no shard uploading"
    sent_before = {row[0]: row[1] for row in rows(cli.journal, "SELECT count(*), 0 FROM shard_parts")}

    resumed = cli.subprocess("resume", batch_id, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    check_batch(s3, cli.bucket, report, files)
    assert open_uploads(s3, cli.bucket) == []
    # The shard the crash left is sent again under its own number (its plan held), not re-planned.
    states = dict(rows(cli.journal, "SELECT shard_no, state FROM shards"))
    assert all(states[shard_no] == "uploaded" for shard_no, _, _ in uploading), states
    assert "dropped" not in states.values()
    if point.startswith("after-upload-shard-part"):
        # The part the server held was reused: the resume sent less than the whole shard.
        (shard_no, _, _), = uploading
        (size,), = rows(cli.journal, f"SELECT size FROM shards WHERE shard_no = {shard_no}")
        assert sent_before and report["bytes_sent"] <= size - 5 * MiB, (report["bytes_sent"], size)


def test_a_member_changed_since_the_scan_fails_by_name_and_its_shard_is_planned_again(
        cli, s3, tmp_path, monkeypatch) -> None:
    files = files_of(40, seed=7)
    source = make_source(tmp_path / "src", files)
    changed = source / "d/f0013"
    scan = Uploader.scan
    after_scan(monkeypatch, lambda: changed.write_bytes(b"rewritten after the scan, longer than before" * 100))

    result = cli("upload", "--pack-under", "64KiB", "--shard-size", "1MiB", "--json", str(source))
    assert result.exit_code == 3, result.stderr
    report = json.loads(result.stdout)
    assert [failure["path"] for failure in report["failures"]] == ["d/f0013"]
    assert "changed since the scan" in report["failures"][0]["error"]
    assert rows(cli.journal, "SELECT shard_no, state, members FROM shards ORDER BY shard_no") == [
        (1, "dropped", 40), (2, "uploaded", 39)]
    # The stored shard holds the 39 others, each with the bytes of its journal digest.
    (key, sha), = rows(cli.journal, "SELECT key, sha256 FROM shards WHERE state = 'uploaded'")
    body = get(s3, cli.bucket, key)
    assert hashlib.sha256(body).hexdigest() == sha
    for path, digest, offset, size in rows(
            cli.journal, "SELECT rel_path, sha256, shard_offset, size FROM files WHERE shard_no = 2"):
        assert hashlib.sha256(body[offset:offset + size]).hexdigest() == digest == hashlib.sha256(
            files[path]).hexdigest()
    with pytest.raises(Exception):  # nothing was ever stored under the dropped shard's key
        s3.head_object(Bucket=cli.bucket, Key=report.get("prefix", f"staging/{report['batch_id']}/")
                       + "shards/000001.tar")

    monkeypatch.setattr(Uploader, "scan", scan)
    resumed = cli("resume", report["batch_id"], "--json")
    assert resumed.exit_code == 0, resumed.stderr
    check_batch(s3, cli.bucket, json.loads(resumed.stdout), {**files, "d/f0013": changed.read_bytes()})


def test_a_member_changed_while_its_large_shard_was_half_sent(cli, s3, tmp_path) -> None:
    """kill -9 after a part; the member in that part changes; the resume re-plans without it
    (the upload is aborted, never completed with the old bytes); a second resume sends it."""
    files = files_of(300, seed=11, size=64 * KiB)
    source = make_source(tmp_path / "src", files)
    crashed = cli.subprocess("upload", *LARGE, str(source), env={"ARCHUP_CRASH_AT": "after-upload-shard-part:2"})
    assert crashed.exit_code == -signal.SIGKILL, crashed.stderr
    (batch_id,) = rows(cli.journal, "SELECT batch_id FROM batches")[0]
    first = rows(cli.journal, "SELECT rel_path FROM files WHERE shard_no IS NOT NULL ORDER BY shard_offset LIMIT 1")
    victim = source / first[0][0]
    victim.write_bytes(b"changed after the crash")
    os.utime(victim, ns=(1_000_000_000, 1_000_000_000))

    again = cli.subprocess("resume", batch_id, "--json")
    assert again.exit_code == 3, again.stderr
    report = json.loads(again.stdout)
    assert [failure["path"] for failure in report["failures"]] == [first[0][0]]
    assert open_uploads(s3, cli.bucket) == []
    final = cli.subprocess("resume", batch_id, "--json")
    assert final.exit_code == 0, final.stderr
    check_batch(s3, cli.bucket, json.loads(final.stdout), {**files, first[0][0]: b"changed after the crash"})


@pytest.mark.parametrize("checksum", ["sha256", "crc32", "md5", "none"])
def test_every_checksum_mode_packs(cli, s3, tmp_path, checksum) -> None:
    files = {**files_of(30, seed=3), "big.bin": os.urandom(6 * MiB)}
    source = make_source(tmp_path / "src", files)
    result = cli("upload", "--checksum", checksum, "--part-size", "5MiB", *LARGE[:4], "--json", str(source))
    assert result.exit_code == 0, result.stderr
    summary = check_batch(s3, cli.bucket, json.loads(result.stdout), files)
    assert summary["files_packed"] == 30


def test_skip_archived_skips_packed_files_unchanged_since_a_packed_batch(cli, s3, tmp_path) -> None:
    files = files_of(50, seed=5)
    source = make_source(tmp_path / "src", files)
    first = cli("upload", "--skip-archived", *SINGLE, str(source))
    assert first.exit_code == 0, first.stderr
    (source / "d/f0001").write_bytes(b"a new version")
    second = cli("upload", "--skip-archived", *SINGLE, str(source))
    assert second.exit_code == 0, second.stderr
    report = json.loads(second.stdout)
    assert (report["files_uploaded"], report["files_already_archived"]) == (1, 49)
    summary = check_batch(s3, cli.bucket, report, {"d/f0001": b"a new version"})
    assert summary["files_packed"] == 1


def test_a_shard_lost_before_finalize_is_packed_again_by_the_resume(cli, s3, tmp_path) -> None:
    files = files_of(30, seed=9)
    source = make_source(tmp_path / "src", files)
    sent = cli("upload", "--no-finalize", *SINGLE, str(source))
    assert sent.exit_code == 0, sent.stderr
    batch_id = json.loads(sent.stdout)["batch_id"]
    (lost, members), *_ = rows(cli.journal, "SELECT key, members FROM shards ORDER BY shard_no")
    s3.delete_object(Bucket=cli.bucket, Key=lost)

    refused = cli("finalize", batch_id, "--json")
    assert refused.exit_code == 3, refused.stderr
    assert "shard missing from the bucket" in refused.stderr and lost.rsplit("/", 1)[1] in refused.stderr
    assert rows(cli.journal, f"SELECT state FROM shards WHERE key = '{lost}'") == [("dropped",)]
    assert rows(cli.journal, "SELECT count(*) FROM files WHERE state = 'pending'") == [(members,)]

    resumed = cli("resume", batch_id, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    check_batch(s3, cli.bucket, json.loads(resumed.stdout), files)
