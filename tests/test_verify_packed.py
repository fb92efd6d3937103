"""archup verify of a packed batch (--pack-under) over HTTP to a moto server: the shards
against the shard list and the bucket, each packed entry inside its shard, and with --deep
every member re-hashed at its offset and the shard's own index held against the entries."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from test_forged_manifest import reseal
from test_pack import FILES, SMALL, get, manifest
from test_verify import make_source, problems, run_verify, upload, verify_json

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def packed(cli: Any, s3: Any, tmp_path: Path) -> dict[str, Any]:
    """A finalized packed batch of FILES: its upload report, summary, entries and shard."""
    report = upload(cli, make_source(tmp_path / "src", FILES), "--pack-under", "64KiB")
    report["summary"], report["entries"], shards = manifest(s3, cli.bucket, report)
    (report["shard"],) = shards
    report["by_path"] = {entry["path"]: entry for entry in report["entries"]}
    return report


def rewrite(s3: Any, bucket: str, key: str, body: bytes) -> None:
    """Put other bytes at a key, keeping its metadata (what a careless rewrite does)."""
    metadata = s3.head_object(Bucket=bucket, Key=key)["Metadata"]
    s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata)


def flip(body: bytes, at: int) -> bytes:
    return body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1:]


@pytest.mark.localstack
def test_a_packed_batch_verifies_plain_and_deep(cli, packed) -> None:
    batch_id = packed["batch_id"]
    for args in ([], ["--deep"]):
        code, document = verify_json(cli, batch_id, *args)
        assert (code, document) == (0, {"batch_id": batch_id, "source": "manifest", "checked": len(FILES),
                                         "ok": True, "differences": [], "files_packed": len(SMALL),
                                         "shards_checked": 1})
    human = run_verify(cli, batch_id, "--deep")
    assert human.exit_code == 0, human.stderr
    assert human.stdout.strip().splitlines() == [
        f"batch {batch_id}: {len(FILES)} file(s) re-hashed ({len(SMALL)} of them in 1 shard(s)) against the "
        "manifest: 0 difference(s)"]


def test_a_flipped_byte_in_a_shard_is_caught_and_deep_names_the_member(cli, s3, bucket, packed) -> None:
    shard, entry = packed["shard"], packed["by_path"]["dir/b.bin"]
    body = get(s3, bucket, shard["key"])
    damaged = flip(body, entry["offset"] + 100)
    rewrite(s3, bucket, shard["key"], damaged)

    # Same size, same metadata: the listing's ETag shows the rewrite, not which file it hit.
    code, document = verify_json(cli, packed["batch_id"])
    assert (code, problems(document)) == (3, [(None, "etag_mismatch")])
    assert document["differences"][0]["key"] == shard["key"]

    code, document = verify_json(cli, packed["batch_id"], "--deep")
    assert code == 3
    assert problems(document) == [(None, "etag_mismatch"), (None, "checksum_mismatch"),
                                  ("dir/b.bin", "checksum_mismatch")]
    whole, member = document["differences"][1:]
    assert (whole["key"], whole["expected"], whole["actual"]) == (
        shard["key"], shard["sha256"], hashlib.sha256(damaged).hexdigest())
    data = damaged[entry["offset"]:entry["offset"] + entry["size"]]
    assert member == {"key": shard["key"], "path": "dir/b.bin", "problem": "checksum_mismatch",
                      "expected": hashlib.sha256(FILES["dir/b.bin"]).hexdigest(),
                      "actual": hashlib.sha256(data).hexdigest()}

    human = run_verify(cli, packed["batch_id"], "--deep")
    assert human.exit_code == 3
    assert f"checksum_mismatch: dir/b.bin (in 000001.tar): expected {member['expected']}" in human.stdout


def test_a_missing_shard_is_caught_without_deep(cli, s3, bucket, packed) -> None:
    shard = packed["shard"]
    s3.delete_object(Bucket=bucket, Key=shard["key"])
    code, document = verify_json(cli, packed["batch_id"])
    assert code == 3
    assert document["differences"] == [{"key": shard["key"], "path": None, "problem": "missing",
                                        "expected": shard["size"], "actual": None}]
    # Its members are not looked for under files/: only the shard is missing.
    assert document["checked"] == len(FILES) and document["shards_checked"] == 1

    human = run_verify(cli, packed["batch_id"])
    assert human.exit_code == 3
    assert f"missing: {shard['key']}: expected {shard['size']} bytes, found no object" in human.stdout


def test_a_shard_of_another_size_and_extra_shard_objects_are_reported(cli, s3, bucket, packed) -> None:
    shard = packed["shard"]
    s3.put_object(Bucket=bucket, Key=shard["key"], Body=get(s3, bucket, shard["key"])[:-512])
    intruder = packed["prefix"] + "shards/000099.tar"
    s3.put_object(Bucket=bucket, Key=intruder, Body=b"x" * 10)
    code, document = verify_json(cli, packed["batch_id"])
    assert code == 3
    assert [(d["key"], d["problem"], d["expected"], d["actual"]) for d in document["differences"]] == [
        (shard["key"], "size_mismatch", shard["size"], shard["size"] - 512),
        (intruder, "unexpected", None, 10)]


def test_rewritten_shard_metadata_is_reported(cli, s3, bucket, packed) -> None:
    shard = packed["shard"]
    s3.put_object(Bucket=bucket, Key=shard["key"], Body=get(s3, bucket, shard["key"]),
                  Metadata={"archup-sha256": "0" * 64})
    code, document = verify_json(cli, packed["batch_id"])
    assert (code, problems(document)) == (3, [(None, "metadata_checksum_mismatch")])
    assert document["differences"][0]["expected"] == shard["sha256"]


def forget_and_unrecord(cli: Any, batch_id: str) -> None:
    """The journal no longer holds the batch's files nor its seal: the manifest is the only record."""
    assert cli("gc", "--forget-after", "0s", "--json").exit_code == 0
    with closing(sqlite3.connect(cli.journal)) as conn:
        conn.execute("UPDATE batches SET summary_sha256 = NULL WHERE batch_id = ?", (batch_id,))
        conn.commit()


def encode(entries: list[dict[str, Any]]) -> bytes:
    return b"".join((json.dumps(e, ensure_ascii=False, separators=(",", ":")) + "\n").encode() for e in entries)


def test_forged_entries_outside_their_shard_or_naming_none_are_reported(cli, s3, bucket, packed) -> None:
    forget_and_unrecord(cli, packed["batch_id"])
    shard = packed["shard"]
    entries = [dict(entry) for entry in packed["entries"]]
    by_path = {entry["path"]: entry for entry in entries}
    by_path["a.txt"]["offset"] = shard["size"] - 10  # its 600 bytes would run past the shard's end
    by_path["dir/sub/c.bin"]["shard"] = packed["prefix"] + "shards/000777.tar"
    reseal(s3, bucket, packed["manifest_key"], encode(entries))

    code, document = verify_json(cli, packed["batch_id"], "--deep")
    assert code == 3
    original = packed["by_path"]
    assert [(d["path"], d["problem"], d["expected"], d["actual"]) for d in document["differences"]] == [
        ("a.txt", "outside_shard", shard["size"], shard["size"] - 10 + len(FILES["a.txt"])),
        ("dir/sub/c.bin", "shard_unknown", "a shard of the list", packed["prefix"] + "shards/000777.tar"),
        # The shard lists one member more than the entries name; its own index still says
        # where a.txt and c.bin really are, which no entry inside the shard matches.
        (None, "shard_members_mismatch", len(SMALL), len(SMALL) - 1),
        ("a.txt", "shard_index_mismatch", None, _line(original["a.txt"])),
        ("dir/sub/c.bin", "shard_index_mismatch", None, _line(original["dir/sub/c.bin"])),
    ]


def _line(entry: dict[str, Any]) -> str:
    return json.dumps({"path": entry["path"], "offset": entry["offset"], "size": entry["size"],
                       "sha256": entry["sha256"]}, ensure_ascii=False, separators=(",", ":"))


def test_a_forged_shard_list_is_held_to_its_seal_and_its_lines(cli, s3, bucket, packed) -> None:
    forget_and_unrecord(cli, packed["batch_id"])
    seal = packed["summary"]["shards"]
    body = get(s3, bucket, seal["key"]) + b'{"key":"elsewhere/000002.tar","size":1,"sha256":"' + b"0" * 64 \
        + b'","members":0}\nnot json\n'
    s3.put_object(Bucket=bucket, Key=seal["key"], Body=body)
    code, document = verify_json(cli, packed["batch_id"])
    assert code == 3
    assert problems(document) == [(None, "shard_entry_invalid"), (None, "shard_entry_invalid"),
                                  (None, "shards_checksum_mismatch"), (None, "shards_size_mismatch"),
                                  (None, "shards_count_mismatch")]
    assert "is not under " + packed["prefix"] + "shards/" in document["differences"][0]["actual"]

    s3.delete_object(Bucket=bucket, Key=seal["key"])
    code, document = verify_json(cli, packed["batch_id"])
    assert (code, problems(document)) == (3, [(None, "shards_missing")])


def test_a_damaged_index_member_is_caught_by_deep(cli, s3, bucket, packed) -> None:
    shard, entry = packed["shard"], packed["by_path"]["empty"]
    body = get(s3, bucket, shard["key"])
    # The index member's line for "empty" carries its SHA-256: change one digit of it.
    digest = entry["sha256"].encode()
    at = body.rindex(digest)
    assert at > max(e["offset"] + e["size"] for e in packed["entries"] if "shard" in e)
    forged_digest = (b"0" if digest[:1] != b"0" else b"1") + digest[1:]
    damaged = body[:at] + forged_digest + body[at + 64:]
    rewrite(s3, bucket, shard["key"], damaged)

    code, document = verify_json(cli, packed["batch_id"], "--deep")
    assert code == 3
    # Every member's bytes are intact; the shard as a whole and its index are not.
    assert problems(document) == [(None, "etag_mismatch"), (None, "checksum_mismatch"),
                                  ("empty", "shard_index_mismatch")]
    assert document["differences"][2]["actual"] == _line({**entry, "sha256": forged_digest.decode()})


def test_before_finalize_the_journals_shards_are_checked(cli, s3, bucket, tmp_path) -> None:
    report = upload(cli, make_source(tmp_path / "src", FILES), "--pack-under", "64KiB", "--no-finalize")
    batch_id, prefix = report["batch_id"], f"staging/{report['batch_id']}/"
    code, document = verify_json(cli, batch_id, "--deep")
    assert (code, document["source"], document["ok"], document["files_packed"], document["shards_checked"]) == (
        0, "journal", True, len(SMALL), 1)

    key = prefix + "shards/000001.tar"
    body = get(s3, bucket, key)
    with closing(sqlite3.connect(cli.journal)) as conn:
        (offset,) = conn.execute("SELECT shard_offset FROM files WHERE rel_path = 'dir/sub/c.bin'").fetchone()
    rewrite(s3, bucket, key, flip(body, offset + 2999))
    code, document = verify_json(cli, batch_id, "--deep")
    assert code == 3 and document["source"] == "journal"
    assert problems(document) == [(None, "etag_mismatch"), (None, "checksum_mismatch"),
                                  ("dir/sub/c.bin", "checksum_mismatch")]

    s3.delete_object(Bucket=bucket, Key=key)
    code, document = verify_json(cli, batch_id)
    assert (code, problems(document)) == (3, [(None, "missing")])


def test_a_multipart_shard_is_re_hashed_across_chunks(cli, s3, bucket, tmp_path) -> None:
    files = {f"d/f{i:03d}": os.urandom(40 * KiB) for i in range(160)}  # about 6.5 MiB: two parts
    report = upload(cli, make_source(tmp_path / "src", files), "--pack-under", "64KiB", "--shard-size", "64MiB",
                    "--part-size", "5MiB")
    _, entries, (shard,) = manifest(s3, bucket, report)
    assert shard["part_size"] == 5 * MiB
    code, document = verify_json(cli, report["batch_id"], "--deep")
    assert (code, document["ok"], document["files_packed"]) == (0, True, len(files))

    # A member whose bytes straddle the 1 MiB boundary of the stream's chunks.
    straddling = next(e for e in entries if e["offset"] < MiB < e["offset"] + e["size"])
    body = get(s3, bucket, shard["key"])
    s3.put_object(Bucket=bucket, Key=shard["key"], Body=flip(body, MiB + 1))
    code, document = verify_json(cli, report["batch_id"], "--deep")
    assert code == 3
    assert [p for p in problems(document) if p[0] is not None] == [(straddling["path"], "checksum_mismatch")]
