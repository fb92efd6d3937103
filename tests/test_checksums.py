"""Checksums of multipart objects (issue 4, point 1): the full-object CRC32 the server keeps,
the whole file's SHA-256 in the object's metadata (hashed before the upload), and an upload
that keeps the checksum kind it was created with when a later run resumes it."""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from pathlib import Path
from typing import Any

import pytest
from testdata import pattern_bytes

import archup.source
from archup.checksums import crc_b64, crc_of
from archup.store import MultipartChecksum, crc32_combine

MiB = 1024 * 1024
BIG_SIZE = 16 * MiB + 3  # four parts of 5 MiB (the last one 1 MiB + 3 bytes)


def test_crc32_combine_is_the_crc32_of_the_concatenation() -> None:
    rng = random.Random(7)
    lengths = [0, 1, 3, 4, 5, 255, 4096, 65_537, 1_000_003]
    for first in lengths:
        for second in lengths:
            a, b = rng.randbytes(first), rng.randbytes(second)
            assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b), (first, second)


def test_crc32_combine_folds_many_equal_parts() -> None:
    parts = [pattern_bytes(5 * MiB, seed=n) for n in range(3)] + [b"tail"]
    crc = 0
    for part in parts:
        crc = crc32_combine(crc, zlib.crc32(part), len(part))
    assert crc == zlib.crc32(b"".join(parts))


def _source(tmp_path: Path) -> tuple[Path, bytes]:
    big = pattern_bytes(BIG_SIZE, seed=42)
    source = tmp_path / "src"
    source.mkdir()
    (source / "big.bin").write_bytes(big)
    (source / "small.txt").write_bytes(b"small")
    return source, big


def _head(s3: Any, bucket: str, summary: dict[str, Any]) -> dict[str, Any]:
    return s3.head_object(Bucket=bucket, Key=summary["prefix"] + "files/big.bin", ChecksumMode="ENABLED")


def _assert_composite_sha256(head: dict[str, Any]) -> None:
    """A checksum of the parts' SHA-256s (S3 says COMPOSITE and suffixes the part count;
    moto says neither), and no full-object CRC32."""
    assert head.get("ChecksumType", "COMPOSITE") == "COMPOSITE"
    assert "ChecksumSHA256" in head and "ChecksumCRC32" not in head


def _open_uploads(s3: Any, bucket: str) -> list[str]:
    return [upload["Key"] for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@pytest.mark.localstack
def test_composite_sha256_parts_when_full_object_checksums_are_off(cli: Any, s3: Any, bucket: str,
                                                                   tmp_path: Path) -> None:
    source, big = _source(tmp_path)
    result = cli("upload", "--part-size", "5MiB", "--no-full-object-checksum", "--prehash", "--json", str(source))
    assert result.exit_code == 0, result.stderr
    head = _head(s3, bucket, json.loads(result.stdout))
    _assert_composite_sha256(head)
    assert head["Metadata"]["archup-sha256"] == hashlib.sha256(big).hexdigest()


@pytest.mark.localstack
@pytest.mark.parametrize(("first", "then", "kind"), [
    (("--no-full-object-checksum",), (), "COMPOSITE"),
    ((), ("--no-full-object-checksum",), "FULL_OBJECT"),
], ids=["composite-resumed-by-default-run", "full-object-resumed-by-composite-run"])
def test_a_resumed_upload_keeps_the_checksum_kind_it_was_created_with(
        cli: Any, s3: Any, bucket: str, tmp_path: Path, first: tuple[str, ...], then: tuple[str, ...],
        kind: str) -> None:
    source, big = _source(tmp_path)
    args = ("--part-size", "5MiB", "--parallel", "1", "--prehash", "--json")
    # Killed after the second part is stored (the first is recorded in the journal).
    crashed = cli.subprocess("upload", *args, *first, str(source), env={"ARCHUP_CRASH_AT": "after-upload-part:2"})
    assert crashed.exit_code == -9, crashed.stderr
    assert _open_uploads(s3, bucket) != []

    rerun = cli.subprocess("upload", *args, *then, str(source))
    assert rerun.exit_code == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["bytes_sent"] <= BIG_SIZE - 5 * MiB + len(b"small")  # the recorded part was reused
    head = _head(s3, bucket, summary)
    if kind == "FULL_OBJECT":
        assert head["ChecksumType"] == "FULL_OBJECT"
        assert head["ChecksumCRC64NVME"] == crc_b64("CRC64NVME", crc_of("CRC64NVME", big))
    else:
        _assert_composite_sha256(head)
    assert head["Metadata"]["archup-sha256"] == hashlib.sha256(big).hexdigest()
    body = s3.get_object(Bucket=bucket, Key=summary["prefix"] + "files/big.bin")["Body"].read()
    assert body == big
    assert _open_uploads(s3, bucket) == []


def test_a_file_that_differs_from_its_prehash_is_failed_not_archived(cli: Any, s3: Any, bucket: str,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The metadata's SHA-256 comes from a read before the upload; if the upload pass reads
    other bytes (a change that left size, mtime and inode alone), the upload is aborted and
    the file failed, never archived with metadata that lies."""
    source, big = _source(tmp_path)
    honest = archup.source.hash_handle
    monkeypatch.setattr(archup.source, "hash_handle", lambda handle, record, stop=None: "0" * 64)
    result = cli("upload", "--part-size", "5MiB", "--prehash", "--json", str(source))
    assert result.exit_code == 3, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files_failed"] == 1
    assert "SHA-256 differs" in result.stderr + result.stdout
    prefix = f"staging/{summary['batch_id']}/files/"
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    assert [item["Key"].rsplit("/", 1)[-1] for item in listed] == ["small.txt"]
    assert _open_uploads(s3, bucket) == []

    monkeypatch.setattr(archup.source, "hash_handle", honest)
    rerun = cli("upload", "--part-size", "5MiB", "--prehash", "--json", str(source))
    assert rerun.exit_code == 0, rerun.stderr
    assert _head(s3, bucket, json.loads(rerun.stdout))["Metadata"]["archup-sha256"] == hashlib.sha256(big).hexdigest()


@pytest.mark.parametrize("kind", [MultipartChecksum("CRC32", full_object=True), MultipartChecksum("SHA256"),
                                  MultipartChecksum("CRC64NVME", full_object=True), MultipartChecksum(None)])
def test_the_checksum_kind_survives_the_journal(kind: MultipartChecksum) -> None:
    assert MultipartChecksum.decode(kind.encode()) == kind
