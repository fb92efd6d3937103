"""A batch's life beyond one clean run: one owner at a time, resume, abort, list, gc.

Crashes are real: an ``archup upload`` subprocess armed with ``ARCHUP_CRASH_AT``
SIGKILLs itself at a named point. Bucket state is read through the separate
``s3`` client, journal state through a separate sqlite3 connection.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from test_crash import (
    PART_SIZE,
    MiB,
    batch_row,
    batches_in_journal,
    check_invariants,
    list_objects,
    open_uploads,
    read_journal,
    small_files,
    write_tree,
)
from testdata import pattern_bytes
from ulid import ULID

from archup.clock import utcnow
from archup.errors import BatchBusy
from archup.journal import Journal, SQLiteJournal
from archup.lock import BatchLock

SMALL_ARGS = ("--part-size", "5MiB", "--parallel", "1")
BIG_SIZE = 11 * MiB + 5       # three parts of 5 MiB
REUSE_SIZE = 26 * MiB + 11    # six parts


def lifecycle_tree() -> dict[str, bytes]:
    """Small files first in key order, then one multipart file: with --parallel 1 the small
    files are stored before the big file's second part."""
    files = small_files(3, "a", seed=7)
    files["m/big.bin"] = pattern_bytes(BIG_SIZE, seed=31)
    return files


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("lifecycle-src"), lifecycle_tree())


@pytest.fixture(scope="module")
def other_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("other-src"), small_files(4, "o", seed=8))


@pytest.fixture(scope="module")
def reuse_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("reuse-src"), {"huge.bin": pattern_bytes(REUSE_SIZE, seed=41)})


# -- helpers ------------------------------------------------------------------


def crash(cli: Any, source: Path, point: str, *extra: str) -> str:
    """Run 'archup upload' until it SIGKILLs itself at ``point``; return the batch it left."""
    known = {batch["batch_id"] for batch in batches_in_journal(cli)}
    result = cli.subprocess("upload", *SMALL_ARGS, *extra, str(source), env={"ARCHUP_CRASH_AT": point})
    assert result.exit_code == -signal.SIGKILL, f"ARCHUP_CRASH_AT={point}: exit {result.exit_code}\n{result.stderr}"
    new = [batch["batch_id"] for batch in batches_in_journal(cli) if batch["batch_id"] not in known]
    assert len(new) == 1, new
    return new[0]


def uploaded_unfinalized(cli: Any, source: Path, *extra: str) -> str:
    """A batch with every file uploaded and no manifest yet (in-process: no crash needed)."""
    result = cli("upload", *SMALL_ARGS, "--no-finalize", "--json", *extra, str(source))
    assert result.exit_code == 0, result.stderr
    return str(json.loads(result.stdout)["batch_id"])


def finalized(cli: Any, source: Path, *extra: str) -> str:
    result = cli("upload", *SMALL_ARGS, "--json", *extra, str(source))
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "enqueued"
    return str(summary["batch_id"])


def state_of(cli: Any, batch_id: str) -> str:
    return str(batch_row(cli.journal, batch_id)["state"])


def prefix_of(cli: Any, batch_id: str) -> str:
    return f"{batch_row(cli.journal, batch_id)['prefix']}{batch_id}/"


def expire(cli: Any, batch_id: str) -> None:
    """Move a batch's expiry into the past, behind archup's back."""
    conn = sqlite3.connect(cli.journal)
    try:
        with conn:
            changed = conn.execute("UPDATE batches SET expires_at = '2000-01-01T00:00:00.000Z' WHERE batch_id = ?",
                                   (batch_id,)).rowcount
    finally:
        conn.close()
    assert changed == 1


def one_json(stdout: str) -> dict[str, Any]:
    document = json.loads(stdout)
    assert isinstance(document, dict)
    return document


# -- one owner per batch ------------------------------------------------------


@pytest.mark.parametrize("command", ["upload", "finalize", "resume"])
def test_a_held_batch_is_refused_naming_its_holder(command: str, cli: Any, s3: Any, source: Path) -> None:
    batch_id = uploaded_unfinalized(cli, source)
    args = {"upload": ("upload", "--batch", batch_id, "--json", str(source)),
            "finalize": ("finalize", batch_id, "--json"),
            "resume": ("resume", batch_id, "--json")}[command]
    lock = BatchLock(cli.journal, batch_id).acquire()
    try:
        refused = cli.subprocess(*args)
    finally:
        lock.release()
    assert refused.exit_code == 4, refused.stderr
    assert "busy" in refused.stderr, refused.stderr
    assert f"pid {os.getpid()}" in refused.stderr and batch_id in refused.stderr, refused.stderr
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since 20" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert state_of(cli, batch_id) == "uploading"  # nothing was done behind the holder's back

    done = cli.subprocess(*args)
    assert done.exit_code == 0, done.stderr
    assert one_json(done.stdout)["batch_id"] == batch_id
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


HOLDER = """
import os, sys
from pathlib import Path
from archup.journal import Journal, SQLiteJournal
from archup.lock import BatchLock
lock = BatchLock(Path(sys.argv[1]), sys.argv[2]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_the_lock_of_a_killed_process_does_not_block(cli: Any, s3: Any, source: Path) -> None:
    batch_id = uploaded_unfinalized(cli, source)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cli.journal), batch_id],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        ready, _, _ = select.select([holder.stdout], [], [], 30)
        assert ready and holder.stdout.readline() == "locked\n"
        with pytest.raises(BatchBusy, match=f"pid {holder.pid}"):
            BatchLock(cli.journal, batch_id).acquire()
        status = cli("status", batch_id, "--json")  # reading never needs the lock
        assert status.exit_code == 0, status.stderr
        assert one_json(status.stdout)["status"] == "uploading"
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL

    # The lock file still names the dead holder; the kernel has released the lock.
    resumed = cli.subprocess("upload", "--batch", batch_id, "--json", str(source))
    assert resumed.exit_code == 0, resumed.stderr
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


def test_different_batches_of_one_journal_lock_side_by_side(cli: Any, s3: Any, source: Path,
                                                             other_source: Path) -> None:
    first = uploaded_unfinalized(cli, source)
    second = uploaded_unfinalized(cli, other_source)
    with BatchLock(cli.journal, first), BatchLock(cli.journal, second):
        pass  # both held at once
    with BatchLock(cli.journal, first):
        other = cli.subprocess("resume", second, "--json")
        assert other.exit_code == 0, other.stderr
        same = cli.subprocess("resume", first, "--json")
        assert same.exit_code == 4, same.stderr
    assert state_of(cli, first) == "uploading"
    check_invariants(s3, cli.bucket, cli.journal, other_source, second)


# -- resume -------------------------------------------------------------------


@pytest.mark.localstack
def test_resume_finishes_a_crashed_batch(cli: Any, s3: Any, source: Path) -> None:
    batch_id = crash(cli, source, "after-put-object:2")
    assert state_of(cli, batch_id) == "uploading"
    resumed = cli("resume", batch_id, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    summary = one_json(resumed.stdout)
    assert summary["batch_id"] == batch_id and summary["status"] == "enqueued"
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


def test_plain_upload_resumes_the_unfinished_batch_and_says_so(cli: Any, s3: Any, source: Path) -> None:
    batch_id = crash(cli, source, "after-put-object:2")
    rerun = cli("upload", *SMALL_ARGS, str(source))
    assert rerun.exit_code == 0, rerun.stderr
    said = [line for line in rerun.stderr.splitlines() if "resuming unfinished batch" in line]
    assert len(said) == 1 and batch_id in said[0], rerun.stderr
    assert batch_id in rerun.stdout
    assert [batch["batch_id"] for batch in batches_in_journal(cli)] == [batch_id]
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


def test_plain_upload_with_json_resumes_quietly(cli: Any, s3: Any, source: Path) -> None:
    batch_id = crash(cli, source, "after-put-object:2")
    rerun = cli("upload", *SMALL_ARGS, "--json", str(source))
    assert rerun.exit_code == 0, rerun.stderr
    assert "resuming" not in rerun.stderr
    assert one_json(rerun.stdout)["batch_id"] == batch_id
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


def test_new_batch_starts_another_and_leaves_the_unfinished_one(cli: Any, s3: Any, source: Path) -> None:
    crashed = crash(cli, source, "after-put-object:2")
    fresh = cli("upload", *SMALL_ARGS, "--new-batch", "--json", str(source))
    assert fresh.exit_code == 0, fresh.stderr
    fresh_id = one_json(fresh.stdout)["batch_id"]
    assert fresh_id != crashed
    check_invariants(s3, cli.bucket, cli.journal, source, fresh_id)
    assert state_of(cli, crashed) == "uploading"
    # A plain upload resumes the unfinished batch, never the sealed one.
    rerun = cli("upload", *SMALL_ARGS, "--json", str(source))
    assert rerun.exit_code == 0, rerun.stderr
    assert one_json(rerun.stdout)["batch_id"] == crashed
    check_invariants(s3, cli.bucket, cli.journal, source, crashed)


def test_a_rerun_with_other_options_resumes_the_batch_as_started_and_says_so(cli: Any, s3: Any,
                                                                            tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", small_files(4, "n", seed=5))
    batch_id = crash(cli, source, "after-put-object:2")
    rerun = cli("upload", "--part-size", "7MiB", "--parallel", "1", "--storage-class", "STANDARD_IA", str(source))
    assert rerun.exit_code == 0, rerun.stderr
    notes = [line for line in rerun.stderr.splitlines() if "keeps the options it was started with" in line]
    assert len(notes) == 1 and batch_id in notes[0], rerun.stderr
    assert "(storage_class, part_size differ this time; --new-batch starts one with these)" in notes[0]
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


def test_batch_and_new_batch_together_are_refused(cli: Any, source: Path) -> None:
    result = cli("upload", "--batch", str(ULID()), "--new-batch", str(source))
    assert result.exit_code == 2
    assert "--batch and --new-batch" in result.stderr
    assert batches_in_journal(cli) == []


@pytest.mark.localstack
@pytest.mark.parametrize("rerun_part_size", ["5MiB", "7MiB"])
def test_a_resumed_multipart_upload_reuses_the_stored_parts(cli: Any, s3: Any, reuse_source: Path,
                                                           rerun_part_size: str) -> None:
    """Parts are reused, also by a rerun asking for another part size: the file keeps the
    part size its upload began with (5 MiB)."""
    batch_id = crash(cli, reuse_source, "after-upload-part:3")
    # Parts 1 and 2 are recorded; part 3 reached the server only.
    recorded = read_journal(cli.journal, "SELECT part_number, size FROM parts WHERE batch_id = ?", (batch_id,))
    assert sorted(tuple(row) for row in recorded) == [(1, PART_SIZE), (2, PART_SIZE)]
    rerun = cli.subprocess("upload", "--part-size", rerun_part_size, "--parallel", "1", "--json", str(reuse_source))
    assert rerun.exit_code == 0, rerun.stderr
    kept = read_journal(cli.journal, "SELECT part_size FROM files WHERE batch_id = ? AND size > ?",
                        (batch_id, PART_SIZE))
    assert [row[0] for row in kept] == [PART_SIZE]
    summary = one_json(rerun.stdout)
    assert summary["batch_id"] == batch_id
    assert summary["bytes_sent"] <= REUSE_SIZE - 2 * PART_SIZE, summary["bytes_sent"]
    check_invariants(s3, cli.bucket, cli.journal, reuse_source, batch_id)


def test_a_recorded_part_is_reused_only_if_its_etag_and_checksum_match(cli: Any, s3: Any,
                                                                       reuse_source: Path) -> None:
    """Parts 1 and 2 are recorded; the journal's ETag of part 1 no longer matches what ListParts
    says, and its checksum of part 2 no longer matches the bytes read again: both are sent again,
    the others reused, and the object is exactly the file."""
    batch_id = crash(cli, reuse_source, "after-upload-part:3")
    with sqlite3.connect(cli.journal) as conn:
        conn.execute("UPDATE parts SET etag = '\"0123456789abcdef0123456789abcdef\"' "
                     "WHERE batch_id = ? AND part_number = 1", (batch_id,))
        conn.execute("UPDATE parts SET checksum = 'AAAAAA==' WHERE batch_id = ? AND part_number = 2", (batch_id,))
    rerun = cli.subprocess("upload", *SMALL_ARGS, "--json", str(reuse_source))
    assert rerun.exit_code == 0, rerun.stderr
    summary = one_json(rerun.stdout)
    assert summary["batch_id"] == batch_id
    assert summary["bytes_sent"] == REUSE_SIZE  # nothing reused: 1 and 2 refused, 3 was never recorded
    check_invariants(s3, cli.bucket, cli.journal, reuse_source, batch_id)


@pytest.mark.localstack
@pytest.mark.parametrize("point", ["after-record-upload-id:1", "after-upload-part:2"])
def test_an_upload_the_server_lost_is_sent_again_from_scratch(point: str, cli: Any, s3: Any,
                                                              source: Path) -> None:
    batch_id = crash(cli, source, point)
    rows = read_journal(cli.journal, "SELECT key, upload_id FROM files WHERE batch_id = ? AND upload_id IS NOT NULL",
                        (batch_id,))
    assert len(rows) == 1
    s3.abort_multipart_upload(Bucket=cli.bucket, Key=rows[0]["key"], UploadId=rows[0]["upload_id"])

    rerun = cli.subprocess("upload", *SMALL_ARGS, "--json", str(source))
    assert rerun.exit_code == 0, rerun.stderr
    summary = one_json(rerun.stdout)
    assert summary["batch_id"] == batch_id
    assert summary["bytes_sent"] >= BIG_SIZE  # the whole file again
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


# -- abort --------------------------------------------------------------------


def test_abort_after_a_crash_mid_multipart(cli: Any, s3: Any, source: Path) -> None:
    batch_id = crash(cli, source, "after-upload-part:2")
    prefix = prefix_of(cli, batch_id)
    assert len(open_uploads(s3, cli.bucket, prefix)) == 1
    assert len(list_objects(s3, cli.bucket, f"{prefix}files/")) == 3  # the small files
    staged = list_objects(s3, cli.bucket, prefix)

    aborted = cli("abort", batch_id, "--json")
    assert aborted.exit_code == 0, aborted.stderr
    report = one_json(aborted.stdout)
    assert report["state"] == "aborted" and report["uploads_aborted"] == 1 and report["objects_deleted"] == 0
    assert open_uploads(s3, cli.bucket, prefix) == []
    assert state_of(cli, batch_id) == "aborted"
    assert [b["status"] for b in batches_in_journal(cli) if b["batch_id"] == batch_id] == ["aborted"]
    status = cli("status", batch_id, "--json")
    assert status.exit_code == 0 and one_json(status.stdout)["status"] == "aborted", status.stdout
    # The file whose upload was aborted is failed, saying why, and no longer holds the upload id.
    big = read_journal(cli.journal, "SELECT state, upload_id, error FROM files WHERE batch_id = ? AND rel_path = ?",
                       (batch_id, "m/big.bin"))
    assert [(row["state"], row["upload_id"]) for row in big] == [("failed", None)]
    assert "aborted" in big[0]["error"], big[0]["error"]
    assert list_objects(s3, cli.bucket, prefix).keys() == staged.keys()  # kept without --purge

    # Nothing is left to abort: a second abort says so instead of counting the same upload again.
    again = cli("abort", batch_id, "--json")
    assert again.exit_code == 0, again.stderr
    report = one_json(again.stdout)
    assert (report["state"], report["uploads_aborted"]) == ("aborted", 0), report

    purged = cli("abort", batch_id, "--purge", "--endpoint-url", cli.endpoint, "--json")
    assert purged.exit_code == 0, purged.stderr
    assert one_json(purged.stdout)["objects_deleted"] == len(staged)
    assert list_objects(s3, cli.bucket, prefix) == {}

    for refused in (cli("upload", *SMALL_ARGS, "--batch", batch_id, str(source)), cli("resume", batch_id)):
        assert refused.exit_code not in (0, 2), refused.stderr
        assert "aborted" in refused.stderr and batch_id in refused.stderr, refused.stderr
    assert state_of(cli, batch_id) == "aborted"
    assert list_objects(s3, cli.bucket, prefix) == {} and open_uploads(s3, cli.bucket) == []


def test_abort_does_not_count_the_completed_upload_of_an_uploaded_file(cli: Any, s3: Any,
                                                                       source: Path) -> None:
    batch_id = uploaded_unfinalized(cli, source)
    # The multipart file is uploaded and the journal keeps the id of its completed upload.
    rows = read_journal(cli.journal, "SELECT state FROM files WHERE batch_id = ? AND upload_id IS NOT NULL",
                        (batch_id,))
    assert [row["state"] for row in rows] == ["uploaded"]
    aborted = cli("abort", batch_id, "--json")
    assert aborted.exit_code == 0, aborted.stderr
    report = one_json(aborted.stdout)
    assert (report["state"], report["uploads_aborted"]) == ("aborted", 0), report
    uploaded = read_journal(cli.journal, "SELECT state FROM files WHERE batch_id = ?", (batch_id,))
    assert [row["state"] for row in uploaded] == ["uploaded"] * 4  # abort never touches an uploaded file


def test_abort_refuses_a_batch_already_sealed_in_the_bucket(cli: Any, s3: Any, source: Path) -> None:
    """manifest.json is written, the journal still says finalizing: the batch is sealed in the
    bucket. Abort refuses, deletes nothing and names the finalize that records the seal."""
    batch_id = crash(cli, source, "after-manifest-summary:1")
    prefix = prefix_of(cli, batch_id)
    assert state_of(cli, batch_id) == "finalizing"
    staged = list_objects(s3, cli.bucket, prefix)
    assert f"{prefix}manifest.json" in staged
    for args in (("abort", batch_id, "--purge", "--json"), ("abort", batch_id, "--json")):
        refused = cli(*args)
        assert refused.exit_code == 1, refused.stdout
        assert one_json(refused.stdout)["exit_code"] == 1
        assert "sealed" in refused.stderr and f"archup finalize {batch_id}" in refused.stderr, refused.stderr
        assert list_objects(s3, cli.bucket, prefix) == staged, "abort changed a sealed batch"
        assert state_of(cli, batch_id) == "finalizing"

    adopted = cli("finalize", batch_id, "--json")
    assert adopted.exit_code == 0, adopted.stderr
    # Adopted, not written again.
    assert list_objects(s3, cli.bucket, prefix)[f"{prefix}manifest.json"] == staged[f"{prefix}manifest.json"]
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


def test_abort_finds_an_upload_the_journal_never_recorded(cli: Any, s3: Any, source: Path) -> None:
    batch_id = crash(cli, source, "after-create-multipart:1")
    prefix = prefix_of(cli, batch_id)
    assert len(open_uploads(s3, cli.bucket, prefix)) == 1
    assert read_journal(cli.journal, "SELECT upload_id FROM files WHERE batch_id = ? AND upload_id IS NOT NULL",
                        (batch_id,)) == []
    aborted = cli("abort", batch_id, "--json")
    assert aborted.exit_code == 0, aborted.stderr
    assert one_json(aborted.stdout)["uploads_aborted"] == 1
    assert open_uploads(s3, cli.bucket, prefix) == []


def test_abort_of_a_finalized_batch_is_refused(cli: Any, s3: Any, source: Path) -> None:
    batch_id = finalized(cli, source)
    objects = list_objects(s3, cli.bucket, prefix_of(cli, batch_id))
    for args in (("abort", batch_id), ("abort", batch_id, "--purge")):
        refused = cli(*args)
        assert refused.exit_code == 1, refused.stderr
        assert "finalized" in refused.stderr and batch_id in refused.stderr, refused.stderr
    assert state_of(cli, batch_id) == "enqueued"
    assert list_objects(s3, cli.bucket, prefix_of(cli, batch_id)).keys() == objects.keys()
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


# -- list ---------------------------------------------------------------------


def test_list_shows_every_batch_with_its_state_and_counts(cli: Any, source: Path, other_source: Path) -> None:
    sealed = finalized(cli, source)
    unfinished = uploaded_unfinalized(cli, other_source)
    dropped = uploaded_unfinalized(cli, source, "--new-batch")
    assert cli("abort", dropped).exit_code == 0

    listed = cli("list", "--json")
    assert listed.exit_code == 0, listed.stderr
    rows = {row["batch_id"]: row for row in one_json(listed.stdout)["batches"]}
    assert {batch_id: rows[batch_id]["status"] for batch_id in rows} == {
        sealed: "enqueued", unfinished: "uploading", dropped: "aborted"}
    assert (rows[sealed]["files_total"], rows[sealed]["files_uploaded"]) == (4, 4)
    assert rows[sealed]["bytes_uploaded"] == rows[sealed]["bytes_total"] == sum(
        len(data) for data in lifecycle_tree().values())
    assert (rows[unfinished]["files_total"], rows[unfinished]["files_uploaded"]) == (4, 4)
    assert rows[unfinished]["source_root"] == str(other_source.resolve())

    for status, expected in (("enqueued", [sealed]), ("uploading", [unfinished]), ("aborted", [dropped]),
                             ("expired", [])):
        filtered = cli("list", "--status", status, "--json")
        assert filtered.exit_code == 0, filtered.stderr
        assert [row["batch_id"] for row in one_json(filtered.stdout)["batches"]] == expected

    text = cli("list")
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert len(lines) == 3
    for batch_id, status in ((sealed, "enqueued"), (unfinished, "uploading"), (dropped, "aborted")):
        assert any(batch_id in line and status in line for line in lines), text.stdout
    assert cli("list", "--status", "bogus").exit_code == 2


# -- gc -----------------------------------------------------------------------


def test_gc_expires_stale_batches_and_leaves_the_rest(cli: Any, s3: Any, moto_endpoint: str, source: Path,
                                                      other_source: Path) -> None:
    stale = crash(cli, source, "after-upload-part:2")
    fresh = crash(cli, source, "after-upload-part:2", "--new-batch")
    sealed = finalized(cli, other_source)
    sealed_objects = list_objects(s3, cli.bucket, prefix_of(cli, sealed))
    expire(cli, stale)

    collected = cli("gc", "--endpoint-url", moto_endpoint, "--json")
    assert collected.exit_code == 0, collected.stderr
    report = one_json(collected.stdout)
    assert [(item["batch_id"], item["uploads_aborted"]) for item in report["expired"]] == [(stale, 1)]
    assert report["busy"] == [] and report["errors"] == [] and report["orphan_uploads"] == []
    assert state_of(cli, stale) == "expired"
    assert open_uploads(s3, cli.bucket, prefix_of(cli, stale)) == []
    # The unexpired batch keeps its upload and stays resumable; the sealed one is untouched.
    assert state_of(cli, fresh) == "uploading"
    assert len(open_uploads(s3, cli.bucket, prefix_of(cli, fresh))) == 1
    assert state_of(cli, sealed) == "enqueued"
    assert list_objects(s3, cli.bucket, prefix_of(cli, sealed)) == sealed_objects

    refused = cli("resume", stale)
    assert refused.exit_code != 0 and "expired" in refused.stderr, refused.stderr

    # --older-than 0s: everything unfinished is stale; the sealed batch still is not touched.
    swept = cli("gc", "--older-than", "0s", "--json")
    assert swept.exit_code == 0, swept.stderr
    assert [item["batch_id"] for item in one_json(swept.stdout)["expired"]] == [fresh]
    assert state_of(cli, fresh) == "expired" and state_of(cli, sealed) == "enqueued"
    assert open_uploads(s3, cli.bucket) == []
    check_invariants(s3, cli.bucket, cli.journal, other_source, sealed)


def test_gc_expires_a_batch_stuck_finalizing_without_a_manifest(cli: Any, s3: Any, source: Path) -> None:
    batch_id = crash(cli, source, "after-manifest-entries:1")  # entries written, no summary
    prefix = prefix_of(cli, batch_id)
    assert state_of(cli, batch_id) == "finalizing"
    assert f"{prefix}manifest.json" not in list_objects(s3, cli.bucket, prefix)
    expire(cli, batch_id)
    collected = cli("gc", "--json")
    assert collected.exit_code == 0, collected.stderr
    report = one_json(collected.stdout)
    assert report["errors"] == [] and report["sealed"] == [], report
    assert [(item["batch_id"], item["uploads_aborted"]) for item in report["expired"]] == [(batch_id, 0)]
    assert state_of(cli, batch_id) == "expired"
    refused = cli("finalize", batch_id)
    assert refused.exit_code != 0 and "expired" in refused.stderr, refused.stderr
    assert f"{prefix}manifest.json" not in list_objects(s3, cli.bucket, prefix)


def test_gc_never_expires_a_batch_sealed_in_the_bucket(cli: Any, s3: Any, source: Path) -> None:
    """The journal says finalizing, but manifest.json is written: the batch is sealed in the
    bucket, and gc must not expire it (a resume records the seal)."""
    batch_id = crash(cli, source, "after-manifest-summary:1")
    prefix = prefix_of(cli, batch_id)
    expire(cli, batch_id)
    collected = cli("gc", "--json")
    assert collected.exit_code == 0, collected.stderr
    report = one_json(collected.stdout)
    assert (report["expired"], report["sealed"], report["errors"]) == ([], [batch_id], []), report
    assert state_of(cli, batch_id) == "finalizing"
    assert f"{prefix}manifest.json" in list_objects(s3, cli.bucket, prefix)
    text = cli("gc", "--older-than", "0s")
    assert text.exit_code == 0, text.stderr
    assert f"sealed {batch_id}" in text.stdout and f"archup finalize {batch_id}" in text.stdout, text.stdout
    assert state_of(cli, batch_id) == "finalizing"
    resumed = cli("resume", batch_id, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


def test_gc_reports_orphan_uploads_and_aborts_them_only_when_asked(cli: Any, s3: Any, source: Path,
                                                                   other_source: Path) -> None:
    finalized(cli, other_source)  # gc looks under the destinations the journal knows
    # A live batch's unrecorded upload (crash right after CreateMultipartUpload) is its own, not an orphan.
    live = crash(cli, source, "after-create-multipart:1")
    live_uploads = open_uploads(s3, cli.bucket, prefix_of(cli, live))
    assert len(live_uploads) == 1
    # Of a batch begun two days ago: gc --abort-orphans leaves younger ones (another host's, in flight).
    orphan_key = f"staging/{ULID.from_datetime(utcnow() - timedelta(days=2))}/files/x"
    orphan_id = s3.create_multipart_upload(Bucket=cli.bucket, Key=orphan_key)["UploadId"]
    orphan = {"bucket": cli.bucket, "key": orphan_key, "upload_id": orphan_id}

    reported = cli("gc", "--json")
    assert reported.exit_code == 0, reported.stderr
    report = one_json(reported.stdout)
    assert report["orphan_uploads"] == [orphan] and report["orphans_aborted"] == 0
    assert sorted(open_uploads(s3, cli.bucket)) == sorted([*live_uploads, (orphan_key, orphan_id)])
    text = cli("gc")
    assert text.exit_code == 0 and orphan_key in text.stdout

    aborted = cli("gc", "--abort-orphans", "--json")
    assert aborted.exit_code == 0, aborted.stderr
    report = one_json(aborted.stdout)
    assert report["orphan_uploads"] == [orphan] and report["orphans_aborted"] == 1
    assert open_uploads(s3, cli.bucket) == live_uploads
    assert state_of(cli, live) == "uploading"

    # And the live batch, resumed, sweeps its own unrecorded upload.
    resumed = cli("resume", live, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    check_invariants(s3, cli.bucket, cli.journal, source, live)


@pytest.mark.parametrize("changed", [False, True], ids=["same-bytes", "rewritten-since"])
def test_a_put_whose_commit_a_crash_lost_is_settled_by_head_not_sent_again(
        cli: Any, s3: Any, tmp_path: Path, changed: bool) -> None:
    """Killed right after a PutObject returned, before the journal committed it: the resume
    finds the object (listing from the first pending key), HEADs it and compares its
    archup-sha256 with the file read now. Equal: recorded uploaded, not sent again.
    Rewritten since (same size): sent again, and the object holds the new bytes."""
    files = small_files(6, "s", seed=21)
    source = write_tree(tmp_path / "src", files)
    batch_id = crash(cli, source, "after-put-object:1")
    (first, *_) = sorted(files)
    assert read_journal(cli.journal, "SELECT state FROM files WHERE rel_path = ?", (first,))[0][0] == "pending"
    stored = f"staging/{batch_id}/files/{first}"
    assert s3.get_object(Bucket=cli.bucket, Key=stored)["Body"].read() == files[first]
    if changed:
        files[first] = bytes(reversed(files[first]))
        (source / first).write_bytes(files[first])

    resumed = cli("resume", batch_id, "--json")

    assert resumed.exit_code == 0, resumed.stderr
    others = sum(len(data) for rel_path, data in files.items() if rel_path != first)
    assert json.loads(resumed.stdout)["bytes_sent"] == others + (len(files[first]) if changed else 0)
    assert s3.get_object(Bucket=cli.bucket, Key=stored)["Body"].read() == files[first]
    check_invariants(s3, cli.bucket, cli.journal, source, batch_id)


def test_gc_never_takes_the_upload_of_a_batch_begun_after_it_listed_the_batches(
        cli: Any, s3: Any, source: Path, other_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload starting beside gc: its batch is not in the list gc read at the start, but its
    multipart upload is under the prefix when gc lists them. Its owner is looked up then."""
    finalized(cli, other_source)
    live = crash(cli, source, "after-create-multipart:1")
    live_uploads = open_uploads(s3, cli.bucket, prefix_of(cli, live))
    assert len(live_uploads) == 1
    real_list = SQLiteJournal.list_batches

    def as_read_before_the_live_batch_began(self: Journal, state: Any = None) -> list[Any]:
        return [batch for batch in real_list(self, state) if batch.batch_id != live]

    monkeypatch.setattr(SQLiteJournal, "list_batches", as_read_before_the_live_batch_began)
    aborted = cli("gc", "--abort-orphans", "--json")
    assert aborted.exit_code == 0, aborted.stderr
    report = one_json(aborted.stdout)
    assert report["orphan_uploads"] == [] and report["orphans_aborted"] == 0
    assert open_uploads(s3, cli.bucket) == live_uploads


def test_gc_leaves_a_busy_batch_alone(cli: Any, s3: Any, source: Path) -> None:
    batch_id = crash(cli, source, "after-upload-part:2")
    expire(cli, batch_id)
    with BatchLock(cli.journal, batch_id):
        collected = cli("gc", "--json")
        assert collected.exit_code == 0, collected.stderr
        report = one_json(collected.stdout)
        assert report["busy"] == [batch_id] and report["expired"] == []
        busy_abort = cli("abort", batch_id)
        assert busy_abort.exit_code == 4 and f"pid {os.getpid()}" in busy_abort.stderr, busy_abort.stderr
        assert state_of(cli, batch_id) == "uploading"
        assert len(open_uploads(s3, cli.bucket, prefix_of(cli, batch_id))) == 1
    collected = cli("gc", "--json")
    assert [item["batch_id"] for item in one_json(collected.stdout)["expired"]] == [batch_id]
    assert open_uploads(s3, cli.bucket) == []


# -- --batch with a new id ---------------------------------------------------------------------


def test_batch_with_a_new_id_creates_that_batch(cli: Any, s3: Any, other_source: Path) -> None:
    """What the first of several hosts does; on the single-host journal too."""
    wanted = str(ULID())
    result = cli("upload", *SMALL_ARGS, "--batch", wanted, "--json", str(other_source))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["batch_id"] == wanted
    assert json.loads(result.stdout)["status"] == "enqueued"


def test_a_new_batch_id_for_a_source_with_an_unfinished_batch_is_refused(cli: Any, s3: Any, source: Path) -> None:
    """A mistyped id never silently starts a second upload of the same source and destination."""
    unfinished = uploaded_unfinalized(cli, source)
    typo = str(ULID())
    result = cli("upload", *SMALL_ARGS, "--batch", typo, "--json", str(source))
    assert result.exit_code == 2, result.stderr
    error = json.loads(result.stdout)["error"]
    assert unfinished in error and typo in error and "unfinished" in error
    journal = SQLiteJournal(cli.journal)
    try:
        assert journal.find_batch(typo) is None
    finally:
        journal.close()
