"""Packed shards through the CLI against the moto server: --pack-under puts small files into
standard tar shards, the manifest says where each file is, the system's tar reads a shard,
and a shard never holds member bytes other than its entries' SHA-256 say."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from test_verify import make_source, upload

KiB = 1024
MiB = 1024 * KiB

FILES = {
    "a.txt": b"alpha\n" * 100,
    "dir/b.bin": bytes(range(256)) * 8,
    "dir/sub/c.bin": b"c" * 3000,
    "m\u00e9lange.txt": b"unicode name\n",
    "empty": b"",
    "deep/" + "x" * 120 + "/long-name.txt": b"a path longer than ustar's 100 bytes\n",
    "big.bin": os.urandom(300 * KiB),
}
SMALL = {path: body for path, body in FILES.items() if len(body) < 64 * KiB}


def get(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def lines(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines()]


def manifest(s3: Any, bucket: str, report: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                                    list[dict[str, Any]]]:
    summary = json.loads(get(s3, bucket, report["manifest_key"]))
    entries = lines(get(s3, bucket, summary["entries"]["key"]))
    shards = lines(get(s3, bucket, summary["shards"]["key"])) if "shards" in summary else []
    return summary, entries, shards


@pytest.fixture
def packed(cli: Any, s3: Any, tmp_path: Path) -> dict[str, Any]:
    source = make_source(tmp_path / "src", FILES)
    report = upload(cli, source, "--pack-under", "64KiB")
    report["summary"], report["entries"], report["shards"] = manifest(s3, cli.bucket, report)
    return report


@pytest.mark.localstack
def test_small_files_go_into_one_standard_tar_that_the_manifest_maps(cli, s3, packed, tmp_path) -> None:
    summary, entries, shards = packed["summary"], packed["entries"], packed["shards"]
    assert summary["format_version"] == 2
    assert (summary["files_uploaded"], summary["files_packed"], summary["shards"]["count"]) == (
        len(FILES), len(SMALL), 1)
    (shard,) = shards
    assert shard["key"] == packed["prefix"] + "shards/000001.tar" and shard["members"] == len(SMALL)
    body = get(s3, cli.bucket, shard["key"])
    assert len(body) == shard["size"] and hashlib.sha256(body).hexdigest() == shard["sha256"]

    by_path = {entry["path"]: entry for entry in entries}
    assert set(by_path) == set(FILES)
    for path, data in SMALL.items():
        entry = by_path[path]
        assert "key" not in entry and entry["shard"] == shard["key"]
        assert body[entry["offset"]:entry["offset"] + entry["size"]] == data
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    # The large file stays an object of its own.
    assert by_path["big.bin"]["key"] == packed["prefix"] + "files/big.bin"
    assert get(s3, cli.bucket, by_path["big.bin"]["key"]) == FILES["big.bin"]
    stored = [item["Key"] for item in s3.list_objects_v2(Bucket=cli.bucket, Prefix=packed["prefix"] + "files/")
              .get("Contents", [])]
    assert stored == [packed["prefix"] + "files/big.bin"]

    # Python's tarfile and the system's tar both read it: paths, sizes, mtimes; the index last.
    source = tmp_path / "src"
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        members = archive.getmembers()
        assert [m.name for m in members[:-1]] == sorted(SMALL, key=lambda p: "files/" + p)
        assert members[-1].name == ".archup-index.jsonl"
        for member in members[:-1]:
            assert archive.extractfile(member).read() == SMALL[member.name]
            assert member.mtime == int((source / member.name).stat().st_mtime)
        index = lines(archive.extractfile(members[-1]).read())
    assert [(line["path"], line["offset"], line["size"], line["sha256"]) for line in index] == [
        (e["path"], e["offset"], e["size"], e["sha256"]) for e in sorted(
            (by_path[p] for p in SMALL), key=lambda e: e["offset"])]

    shard_file = tmp_path / "shard.tar"
    shard_file.write_bytes(body)
    listing = subprocess.run(["tar", "-tvf", str(shard_file)], capture_output=True, text=True, check=True).stdout
    assert "long-name.txt" in listing and " 3000 " in listing
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(shard_file), "-C", str(out)], check=True)
    for path, data in SMALL.items():
        assert (out / path).read_bytes() == data


def test_without_shards_a_batch_is_still_version_1(cli, s3, tmp_path) -> None:
    report = upload(cli, make_source(tmp_path / "src", SMALL))
    summary, entries, shards = manifest(s3, cli.bucket, report)
    assert summary["format_version"] == 1 and "shards" not in summary and shards == []
    assert all("key" in entry for entry in entries)


def test_shards_are_about_the_shard_size(cli, s3, tmp_path) -> None:
    files = {f"f{i:03d}": os.urandom(1000 + i) for i in range(200)}
    report = upload(cli, make_source(tmp_path / "src", files), "--pack-under", "4KiB", "--shard-size", "64KiB")
    summary, entries, shards = manifest(s3, cli.bucket, report)
    assert len(shards) >= 4 and all(shard["size"] <= 64 * KiB for shard in shards)
    assert sum(shard["members"] for shard in shards) == len(files) == summary["files_packed"]
    assert [shard["key"].rsplit("/", 1)[1] for shard in shards] == [f"{n:06d}.tar" for n in range(1, len(shards) + 1)]
    bodies = {shard["key"]: get(s3, cli.bucket, shard["key"]) for shard in shards}
    for entry in entries:
        assert bodies[entry["shard"]][entry["offset"]:entry["offset"] + entry["size"]] == files[entry["path"]]


def test_a_shard_larger_than_a_part_is_sent_in_parts(cli, s3, tmp_path) -> None:
    files = {f"d/f{i:03d}": os.urandom(40 * KiB) for i in range(300)}  # about 12 MiB with headers
    report = upload(cli, make_source(tmp_path / "src", files), "--pack-under", "64KiB", "--shard-size", "64MiB",
                    "--part-size", "5MiB")
    summary, entries, shards = manifest(s3, cli.bucket, report)
    (shard,) = shards
    assert shard["part_size"] == 5 * MiB and shard["etag"].strip('"').endswith("-3"), shard
    body = get(s3, cli.bucket, shard["key"])
    assert hashlib.sha256(body).hexdigest() == shard["sha256"]
    for entry in entries:
        assert body[entry["offset"]:entry["offset"] + entry["size"]] == files[entry["path"]]


def test_the_batch_records_its_packing_and_a_rerun_keeps_it(cli, s3, tmp_path) -> None:
    source = make_source(tmp_path / "src", SMALL)
    first = cli("upload", "--json", "--no-finalize", "--pack-under", "64KiB", str(source))
    assert first.exit_code == 0, first.stderr
    batch_id = json.loads(first.stdout)["batch_id"]
    (source / "later.txt").write_bytes(b"added before the rerun\n")
    # The rerun asks for no packing: the batch keeps what it recorded, and says so.
    again = cli("upload", str(source))
    assert again.exit_code == 0, again.stderr
    assert "pack_under" in again.stderr and batch_id in again.stdout
    report = {"manifest_key": f"staging/{batch_id}/manifest.json"}
    summary, entries, shards = manifest(s3, cli.bucket, report)
    assert summary["files_packed"] == len(SMALL)  # the later file is not in this batch: the scan was done
    assert all("shard" in entry for entry in entries)


@pytest.mark.parametrize("args, message", [
    (["--pack-under", "0"], "--pack-under 0: must be more than 0"),
    (["--pack-under", "16MiB"], "at most the part size"),
    (["--pack-under", "1MiB", "--shard-size", "1KiB"], "--shard-size 1KiB: must be between"),
    (["--pack-under", "1MiB", "--shard-size", "512KiB"], "smaller than --pack-under"),
    (["--pack-under", "lots"], "lots"),
])
def test_bad_packing_options_are_one_line_usage_errors(cli, tmp_path, args, message) -> None:
    source = make_source(tmp_path / "src", SMALL)
    result = cli("upload", *args, str(source))
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def journal_rows(journal: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(journal) as conn:
        return list(conn.execute(sql))


def test_journal_records_each_members_shard_and_offset(cli, packed) -> None:
    rows = journal_rows(cli.journal, "SELECT rel_path, shard_no, shard_offset, state FROM files ORDER BY rel_path")
    assert {row[0]: (row[1] is not None, row[3]) for row in rows} == {
        path: (path in SMALL, "uploaded") for path in FILES}
    entry_offsets = {entry["path"]: entry["offset"] for entry in packed["entries"] if "shard" in entry}
    assert {row[0]: row[2] for row in rows if row[1] is not None} == entry_offsets
    assert journal_rows(cli.journal, "SELECT shard_no, state, members FROM shards") == [(1, "uploaded", len(SMALL))]


def test_a_packed_manifest_matches_the_schema_and_the_docs(cli, s3, packed) -> None:
    import jsonschema
    from test_verify import ROOT, SCHEMA_PATH

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))

    def validator(name: str) -> Any:
        return jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": f"#/$defs/{name}"})

    validator("summary").validate(packed["summary"])
    kinds = {"entry": [e for e in packed["entries"] if "key" in e],
             "packed_entry": [e for e in packed["entries"] if "shard" in e], "shard_entry": packed["shards"]}
    assert all(kinds.values())
    for name, documents in kinds.items():
        for document in documents:
            validator(name).validate(document)
            jsonschema.Draft202012Validator(schema).validate(document)
    with pytest.raises(jsonschema.ValidationError):  # a packed line is no plain entry, and the reverse
        validator("entry").validate(kinds["packed_entry"][0])
    with pytest.raises(jsonschema.ValidationError):
        validator("packed_entry").validate(kinds["entry"][0])
    docs = (ROOT / "docs" / "manifest.md").read_text(encoding="utf-8")
    for name, document in (("summary", packed["summary"]), ("packed_entry", kinds["packed_entry"][0]),
                           ("shard_entry", packed["shards"][0])):
        assert set(document) == set(schema["$defs"][name]["properties"]), name
        for field in document:
            assert f"`{field}`" in docs, f"docs/manifest.md does not document {field}"


@pytest.mark.parametrize("largest_put, etag_end", [(None, ""), (4 * MiB, "-3")])
def test_a_manifest_list_larger_than_a_part_is_never_held_whole(s3, bucket, tmp_path, monkeypatch, largest_put,
                                                                 etag_end) -> None:
    """finalize streams a list past a part from its file in one PUT, and past S3's largest
    PUT (here made 4 MiB) in part-size reads."""
    import tempfile

    from archup import finalize
    from archup.manifest import EntriesFile
    from archup.store import ChecksumMode, StoreConfig, open_store

    if largest_put is not None:
        monkeypatch.setattr(finalize, "MAX_SINGLE_PUT", largest_put)
    body = b"".join(b'{"path":"f%07d","sha256":"%s"}\n' % (i, os.urandom(32).hex().encode()) for i in range(120_000))
    assert len(body) > 2 * 5 * MiB
    for mode in ChecksumMode:
        handle = tempfile.TemporaryFile()
        handle.write(body)
        store = open_store(StoreConfig(bucket=bucket, endpoint_url=s3.meta.endpoint_url, region="us-east-1",
                                       checksum=mode))
        key = f"staging/B/{mode.value}/manifest.jsonl"
        with handle:
            handle.seek(0)
            finalize.put_list(store, key, EntriesFile(handle, hashlib.sha256(body).hexdigest(), len(body), 120_000,
                                                      0), 5 * MiB)
        head = s3.head_object(Bucket=bucket, Key=key)
        etag = head["ETag"].strip('"')
        assert ("-" in etag) == bool(etag_end) and etag.endswith(etag_end), (mode, etag)
        assert head["Metadata"]["archup-sha256"] == hashlib.sha256(body).hexdigest()
        assert get(s3, bucket, key) == body
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_an_entry_line_is_its_entry_as_compact_json() -> None:
    """finalize writes packed lines directly; they must be what the entry dict dumps to."""
    from dataclasses import replace

    from archup.journal import BatchRecord, FileRecord
    from archup.manifest import compact_line, entry_for, entry_line_for
    from archup.states import BatchState, FileState

    batch = BatchRecord("01M96Y4D6WTQ6DGEXPF5DPF9C2", BatchState.FINALIZING, "/src", "b", "staging/", None, None,
                        8 * MiB, True, None, None, "t", "t", "t", None)
    base = FileRecord(batch.batch_id, "x", "staging/B/files/x", 1024, 1_700_000_000_123_456_789, FileState.UPLOADED,
                      None, None, "ab" * 32, '"e"', None, 1, "t")
    for path in ("a.txt", "dir/m\u00e9lange \"quoted\"\\.txt", "tab\there", "\u65e5\u672c/\u8a9e"):
        for shard_no, offset in ((None, None), (1, 512), (123456, 10 ** 12)):
            record = replace(base, rel_path=path, shard_no=shard_no, shard_offset=offset)
            assert entry_line_for(batch)(record) == compact_line(entry_for(batch)(record)), (path, shard_no)
