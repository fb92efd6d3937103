"""What status, --dry-run and --metrics-file say of a packed batch (--pack-under), through the
CLI against the moto server: files and shards per state, the objects and requests a batch
takes packed and unpacked (and the archive classes' per-object overhead packing avoids), and
the shards and packed files of an upload's batch for monitoring."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from test_metrics import parse, value
from test_pack import FILES, SMALL, manifest
from test_verify import make_source, upload

KiB = 1024
MiB = 1024 * KiB
OVERHEAD = 40 * KiB  # billed per GLACIER / DEEP_ARCHIVE object: 32 KiB at its rate, 8 KiB at STANDARD's


def status(cli: Any, batch_id: str) -> dict[str, Any]:
    result = cli("status", batch_id, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def dry_run(cli: Any, source: Path, *args: str) -> dict[str, Any]:
    result = cli("upload", "--dry-run", "--json", *args, str(source))
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# -- status ----------------------------------------------------------------------


def test_status_shows_files_and_shards_of_a_packed_batch(cli, s3, tmp_path) -> None:
    report = upload(cli, make_source(tmp_path / "src", FILES), "--pack-under", "64KiB")
    _, _, (shard,) = manifest(s3, cli.bucket, report)
    document = status(cli, report["batch_id"])
    assert document["files"] == {"pending": 0, "uploading": 0, "uploaded": len(FILES), "failed": 0, "skipped": 0,
                                 "total": len(FILES)}
    assert (document["pack_under"], document["shard_size"], document["files_packed"]) == (64 * KiB, 8 * MiB,
                                                                                         len(SMALL))
    assert document["shards"] == {"uploading": 0, "uploaded": 1, "dropped": 0, "total": 1}
    assert document["shard_bytes"] == {"uploading": 0, "uploaded": shard["size"], "dropped": 0,
                                       "total": shard["size"]}

    text = cli("status", report["batch_id"])
    assert text.exit_code == 0, text.stderr
    lines = {line.split(None, 1)[0] if not line.startswith("shard bytes") else "shard bytes": line
             for line in text.stdout.splitlines()}
    assert lines["shards"].endswith(f"1 uploaded, 1 total; {len(SMALL)} files packed"), text.stdout
    assert lines["shard bytes"].endswith(f"{shard['size']} of {shard['size']} uploaded"), text.stdout


def test_status_of_an_unpacked_batch_has_no_shards(cli, tmp_path) -> None:
    report = upload(cli, make_source(tmp_path / "src", SMALL))
    document = status(cli, report["batch_id"])
    assert not {"shards", "shard_bytes", "files_packed", "pack_under"} & set(document)
    assert "shard" not in cli("status", report["batch_id"]).stdout


def test_status_counts_the_shards_of_a_batch_not_finalized(cli, s3, tmp_path) -> None:
    files = {f"f{i:03d}": os.urandom(1000 + i) for i in range(60)}
    report = upload(cli, make_source(tmp_path / "src", files), "--pack-under", "4KiB", "--shard-size", "64KiB",
                    "--no-finalize")
    document = status(cli, report["batch_id"])
    assert document["status"] != "enqueued"
    shards = document["shards"]
    assert shards["uploaded"] == shards["total"] >= 2 and document["files_packed"] == len(files)
    listed = s3.list_objects_v2(Bucket=cli.bucket, Prefix=f"staging/{report['batch_id']}/shards/")["Contents"]
    assert (len(listed), sum(item["Size"] for item in listed)) == (shards["uploaded"],
                                                                   document["shard_bytes"]["uploaded"])


# -- dry run ---------------------------------------------------------------------


def test_dry_run_counts_objects_and_requests_packed_and_unpacked(cli, s3, tmp_path) -> None:
    source = make_source(tmp_path / "src", FILES)
    plain = dry_run(cli, source)
    assert plain["unpacked"] == {"objects": len(FILES), "requests": len(FILES), "multipart_objects": 0}
    assert "packed" not in plain and "archive_overhead" not in plain

    planned = dry_run(cli, source, "--pack-under", "64KiB")
    assert planned["unpacked"] == plain["unpacked"]
    # big.bin stays an object of its own; the six small files make one shard.
    assert planned["packed"] == {"objects": 2, "requests": 2, "multipart_objects": 0, "shards": 1,
                                 "files_packed": len(SMALL), "pack_under": 64 * KiB, "shard_size": 8 * MiB}
    assert "archive_overhead" not in planned  # STANDARD bills no per-object overhead

    text = cli("upload", "--dry-run", "--pack-under", "64KiB", str(source))
    assert text.exit_code == 0, text.stderr
    assert f"each file an object: {len(FILES)} objects ({len(FILES)} requests)" in text.stdout
    assert f"2 objects (2 requests): {len(SMALL)} files in 1 shard" in text.stdout


def test_dry_run_lays_shards_out_as_the_upload_does(cli, s3, tmp_path) -> None:
    files = {f"f{i:03d}": os.urandom(1000 + 37 * i) for i in range(200)}
    files["dir/" + "n" * 150] = b"a long name takes a pax header"
    source = make_source(tmp_path / "src", files)
    args = ("--pack-under", "8KiB", "--shard-size", "64KiB")
    planned = dry_run(cli, source, *args)["packed"]
    report = upload(cli, source, *args)
    summary, _, shards = manifest(s3, cli.bucket, report)
    assert len(shards) >= 5
    own = sum(1 for body in files.values() if len(body) >= 8 * KiB)  # objects of their own
    assert own and summary["files_packed"] == len(files) - own
    assert (planned["shards"], planned["objects"], planned["requests"], planned["files_packed"]) == (
        len(shards), len(shards) + own, len(shards) + own, summary["files_packed"])


def test_dry_run_lays_shards_out_in_key_order(cli, s3, tmp_path) -> None:
    # In key order no two neighbours fit in 64 KiB (four shards); another order (by size: a
    # and c, then b, then d) would make three.
    files = {"a": os.urandom(20 * KiB), "b": os.urandom(50 * KiB), "c": os.urandom(20 * KiB),
             "d": os.urandom(50 * KiB)}
    source = make_source(tmp_path / "src", files)
    args = ("--pack-under", "60KiB", "--shard-size", "64KiB")
    planned = dry_run(cli, source, *args)["packed"]
    _, _, shards = manifest(s3, cli.bucket, upload(cli, source, *args))
    assert planned["shards"] == len(shards) == 4


def test_dry_run_counts_parts_of_large_files_and_large_shards(cli, tmp_path) -> None:
    files = {f"d/f{i:03d}": os.urandom(40 * KiB) for i in range(160)}  # one shard of about 6.6 MiB
    files["big.bin"] = b"\x01" * (11 * MiB)  # three parts of 5 MiB
    source = make_source(tmp_path / "src", files)
    planned = dry_run(cli, source, "--pack-under", "64KiB", "--shard-size", "64MiB", "--part-size", "5MiB")
    # Unpacked: 160 PutObjects, and big.bin's create, three parts and complete.
    assert planned["unpacked"] == {"objects": 161, "requests": 160 + 3 + 2, "multipart_objects": 1}
    # Packed: the shard is larger than a part, so it goes in two parts too.
    assert planned["packed"] | {"files_packed": 160} == {
        "objects": 2, "requests": (3 + 2) + (2 + 2), "multipart_objects": 2, "shards": 1, "files_packed": 160,
        "pack_under": 64 * KiB, "shard_size": 64 * MiB}


def test_dry_run_in_an_archive_class_shows_the_overhead_avoided(cli, tmp_path) -> None:
    source = make_source(tmp_path / "src", FILES)
    planned = dry_run(cli, source, "--pack-under", "64KiB", "--storage-class", "deep_archive")
    avoided = len(FILES) - 2
    assert planned["archive_overhead"] == {
        "storage_class": "DEEP_ARCHIVE", "bytes_per_object": OVERHEAD,
        "unpacked_bytes": len(FILES) * OVERHEAD, "packed_bytes": 2 * OVERHEAD,
        "objects_avoided": avoided, "bytes_avoided": avoided * OVERHEAD,
        "archive_rate_bytes_avoided": avoided * 32 * KiB, "standard_rate_bytes_avoided": avoided * 8 * KiB,
        "requests_avoided": avoided, "request_usd_avoided": avoided * 0.05 / 1000, "request_usd_per_1000": 0.05,
        "price_note": "AWS's published price noted 2026-12-06; check the S3 pricing page"}

    glacier = dry_run(cli, source, "--pack-under", "64KiB", "--storage-class", "GLACIER")["archive_overhead"]
    assert (glacier["bytes_avoided"], glacier["request_usd_avoided"]) == (avoided * OVERHEAD, None)
    # Without packing there is nothing avoided, only the overhead to expect.
    unpacked = dry_run(cli, source, "--storage-class", "GLACIER")["archive_overhead"]
    assert (unpacked["unpacked_bytes"], unpacked["bytes_avoided"]) == (len(FILES) * OVERHEAD, 0)

    text = cli("upload", "--dry-run", "--pack-under", "64KiB", "--storage-class", "DEEP_ARCHIVE", str(source))
    assert text.exit_code == 0, text.stderr
    assert "DEEP_ARCHIVE bills 40.0 KiB more per object (32 KiB at its rate, 8 KiB at STANDARD's): " \
           "280 KiB each file an object, 80.0 KiB packed" in text.stdout, text.stdout
    assert "packing avoids 200 KiB of billed overhead (160 KiB at DEEP_ARCHIVE's rate, 40.0 KiB at STANDARD's) " \
           "and 5 requests, $0.0003 once at $0.05 per 1,000 requests" in text.stdout, text.stdout


# -- metrics ---------------------------------------------------------------------


def test_metrics_of_a_packed_upload_count_shards_and_packed_files(cli, s3, tmp_path) -> None:
    metrics_file = tmp_path / "archup.prom"
    report = upload(cli, make_source(tmp_path / "src", FILES), "--pack-under", "64KiB",
                    "--metrics-file", str(metrics_file))
    _, _, (shard,) = manifest(s3, cli.bucket, report)
    families = parse(metrics_file)
    assert value(families, "archup_last_run_files", state="uploaded") == len(FILES)
    assert value(families, "archup_last_run_files_packed") == len(SMALL)
    assert [value(families, "archup_last_run_shards", state=state) for state in ("uploaded", "uploading",
                                                                                   "dropped")] == [1, 0, 0]
    assert value(families, "archup_last_run_shard_bytes", state="uploaded") == shard["size"]

    plain_file = tmp_path / "plain.prom"
    upload(cli, make_source(tmp_path / "plain", SMALL), "--metrics-file", str(plain_file))
    assert not {"archup_last_run_shards", "archup_last_run_files_packed"} & set(parse(plain_file))
