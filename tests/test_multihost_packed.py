"""Several hosts, one packed batch (--pack-under) on a shared PostgreSQL journal.

Each host is its own archup process against the suite's PostgreSQL server and the moto server
over HTTP. What every test checks at the end is the record, read through separate clients:
one manifest in which every file appears once, each packed file's bytes at its offset in its
shard, each large file an object of its own, and no multipart upload left open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_multihost import Hosts
from ulid import ULID

from archup.journal import FileRecord, NewFile, encode_files
from archup.journal.postgres import PostgresJournal, packed_chunks
from archup.packing import ShardPlanner
from archup.states import FileState, ShardState

KiB = 1024
MiB = 1024 * KiB
PACKING = ("--pack-under", "16KiB", "--shard-size", "64KiB")


def make_tree(root: Path, small: int = 400, large: int = 2, seed: int = 5) -> dict[str, bytes]:
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(small):
        files[f"d{i % 9}/f{i:04d}.bin"] = rng.randbytes(rng.choice((0, 1, rng.randint(2, 6000))))
    for i in range(large):
        files[f"big/b{i}.bin"] = rng.randbytes(6 * MiB + 777 * i)
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return files


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "src"
    return root, make_tree(root)


def check_packed_record(s3: Any, bucket: str, batch_id: str, files: dict[str, bytes]) -> dict[str, Any]:
    """One manifest listing every file once; a packed file's bytes at its offset in its shard, the
    others objects of their own; every shard listed stored with its size and SHA-256; no open
    multipart upload."""
    prefix = f"staging/{batch_id}/"

    def get(key: str) -> bytes:
        return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    summary = json.loads(get(f"{prefix}manifest.json"))
    assert summary["files_uploaded"] == len(files)
    lines = [json.loads(line) for line in get(summary["entries"]["key"]).decode().splitlines() if line]
    assert sorted(entry["path"] for entry in lines) == sorted(files)  # each file once
    shards = {s["key"]: s for s in (json.loads(line) for line in get(summary["shards"]["key"]).decode().splitlines()
                                    if line)}
    bodies = {key: get(key) for key in shards}
    for key, shard in shards.items():
        assert len(bodies[key]) == shard["size"] and hashlib.sha256(bodies[key]).hexdigest() == shard["sha256"]
    members: dict[str, int] = {}
    for entry in lines:
        body = files[entry["path"]]
        assert entry["sha256"] == hashlib.sha256(body).hexdigest(), entry["path"]
        if "shard" in entry:
            data = bodies[entry["shard"]][entry["offset"]:entry["offset"] + entry["size"]]
            assert data == body, entry["path"]
            members[entry["shard"]] = members.get(entry["shard"], 0) + 1
        else:
            assert len(body) >= 16 * KiB and get(entry["key"]) == body, entry["path"]
    assert members == {key: shard["members"] for key, shard in shards.items()}
    assert summary["files_packed"] == sum(members.values()) == sum(len(b) < 16 * KiB for b in files.values())
    stored = {item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}shards/").get("Contents", [])}
    assert set(shards) <= stored
    assert s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) == []
    return summary


def chunks_of_shards(url: str, batch_id: str) -> dict[int, set[int]]:
    """The chunks of each uploaded shard's members."""
    journal = PostgresJournal(url)
    try:
        rows = journal.db.query("SELECT f.shard_no, f.chunk_no FROM files f JOIN shards s ON s.batch_id = f.batch_id "
                                "AND s.shard_no = f.shard_no WHERE f.batch_id = %s AND s.state = 'uploaded'",
                                (batch_id,))
    finally:
        journal.close()
    chunks: dict[int, set[int]] = {}
    for row in rows:
        chunks.setdefault(int(row["shard_no"]), set()).add(int(row["chunk_no"]))
    return chunks


def test_a_packed_batchs_chunks_are_the_shards_the_planner_makes() -> None:
    """The scan cuts a packed batch's chunks where the uploader's planner cuts shards: fed one
    chunk after the other, the planner makes one shard of each chunk's small files."""
    rng = random.Random(3)
    new = [NewFile(f"p/{'x' * rng.choice((1, 90, 150))}{i:05d}", f"k/{i:05d}", rng.choice((0, 700, 5000, 40_000)),
                   1_700_000_000_000_000_000) for i in range(3000)]
    rows = json.loads(encode_files(new).rows_json)
    chunk_of = packed_chunks(rows, 16 * KiB, 64 * KiB, 375)
    assert chunk_of == sorted(chunk_of) and len(set(chunk_of)) > 20
    planned: list[list[str]] = []
    planner = ShardPlanner(64 * KiB, lambda members, _heads: planned.append([m.rel_path for m in members]))
    for rel_path, key, size, mtime_ns, *_ in rows:
        if size < 16 * KiB:
            planner.add(FileRecord("b", rel_path, key, size, mtime_ns, FileState.PENDING, None, None, None, None,
                                   None, 0, ""))
    planner.flush()
    small_by_chunk: dict[int, list[str]] = {}
    for (rel_path, _key, size, *_), chunk in zip(rows, chunk_of):
        if size < 16 * KiB:
            small_by_chunk.setdefault(chunk, []).append(rel_path)
    assert planned == list(small_by_chunk.values())
    large = [chunk for (_path, _key, size, *_), chunk in zip(rows, chunk_of) if size >= 16 * KiB]
    assert max(large.count(chunk) for chunk in set(large)) <= 375


def test_the_journal_numbers_a_packed_batchs_chunks_by_bytes(pg_url: str) -> None:
    journal = PostgresJournal(pg_url)
    try:
        from archup.journal import BatchSettings

        batch_id = str(ULID())
        journal.init_batch(batch_id, source_root="/src", bucket="b", prefix="staging/", part_size=8 * MiB,
                           settings=BatchSettings(pack_under=16 * KiB, shard_size=64 * KiB))
        new = [NewFile(f"f{i:04d}", f"staging/{batch_id}/files/f{i:04d}", 3000, 1) for i in range(200)]
        assert journal.add_files(batch_id, new) == 200
        more = [NewFile(f"g{i:04d}", f"staging/{batch_id}/files/g{i:04d}", 3000, 1) for i in range(10)]
        assert journal.add_files(batch_id, more) == 10
        rows = journal.db.query("SELECT c.chunk_no, c.files, count(f.*) AS n FROM chunks c JOIN files f "
                                "ON f.batch_id = c.batch_id AND f.chunk_no = c.chunk_no WHERE c.batch_id = %s "
                                "GROUP BY c.chunk_no, c.files ORDER BY c.chunk_no", (batch_id,))
        expected = packed_chunks(json.loads(encode_files(new).rows_json), 16 * KiB, 64 * KiB, 25)
        sizes = [expected.count(chunk) for chunk in sorted(set(expected))]
        assert [int(r["n"]) for r in rows] == [int(r["files"]) for r in rows] == sizes + [10]
        assert [int(r["chunk_no"]) for r in rows] == list(range(len(sizes) + 1))  # the next group goes on
        assert 15 <= sizes[0] <= 20  # about 64 KiB of 3,000-byte files, each with its header and index line
    finally:
        journal.close()


def test_three_hosts_seal_one_packed_batch_each_file_once(pg_url: str, moto_endpoint: str, bucket: str, s3,
                                                          tree) -> None:  # type: ignore[no-untyped-def]
    source, files = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    procs = [hosts.start(*PACKING) for _ in range(3)]
    results = [proc.communicate(timeout=240) for proc in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    summaries = [json.loads(out) for out, _ in results]
    assert len({s["finalized_at"] for s in summaries}) == 1 and {s["files_uploaded"] for s in summaries} == {len(files)}
    summary = check_packed_record(s3, bucket, hosts.batch_id, files)
    assert summary["shards"]["count"] >= 10
    # Three hosts claim chunks out of order; still no shard spans two chunks (the planner ends
    # a shard where each claimed chunk ends), so a takeover never needs two hosts' chunks.
    spanning = {shard: held for shard, held in chunks_of_shards(pg_url, hosts.batch_id).items() if len(held) > 1}
    assert spanning == {}
    journal = PostgresJournal(pg_url)
    try:
        state = journal.get_state(hosts.batch_id)
        assert state.shards == {ShardState.UPLOADED: summary["shards"]["count"]}
        assert sum(w.files_done for w in journal.list_workers(hosts.batch_id)) >= len(files)
    finally:
        journal.close()


def test_on_one_host_each_chunk_of_small_files_is_one_shard(pg_url: str, moto_endpoint: str, bucket: str, s3,
                                                            tree) -> None:  # type: ignore[no-untyped-def]
    """One host claims the chunks in order, so the planner meets each chunk's small files alone:
    a shard is a chunk's, never two chunks' (what a takeover of a dead host's shard relies on)."""
    source, files = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    code, _, err = hosts.run(*PACKING)
    assert code == 0, err
    summary = check_packed_record(s3, bucket, hosts.batch_id, files)
    chunks = chunks_of_shards(pg_url, hosts.batch_id)
    assert len(chunks) == summary["shards"]["count"] >= 10
    assert all(len(held) == 1 for held in chunks.values()), chunks
    assert len({chunk for held in chunks.values() for chunk in held}) == len(chunks)


@pytest.mark.parametrize("point", ["after-put-shard", "before-put-shard"])
def test_a_host_killed_mid_shard_is_taken_over_and_every_member_lands_once(
        pg_url: str, moto_endpoint: str, bucket: str, s3, tree, point: str) -> None:  # type: ignore[no-untyped-def]
    """One host dies (SIGKILL) at its first shard, stored or not, while another sends: its
    chunks' leases run out, a host claims them, finds the shard uploading and sends it again
    from its recorded plan. Then a rerun (a host arriving late) and every earlier host end with
    the one seal; the dead host's shard is stored once, complete, or dropped and re-planned."""
    source, files = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()), lease=3.0)
    victim = hosts.start(*PACKING, env={"ARCHUP_CRASH_AT": f"{point}:1"})
    # The other host starts once the victim holds a chunk: else it may claim them all first, and
    # the victim, never reaching its shard, would end cleanly (a bounded poll, not a sleep).
    journal = PostgresJournal(pg_url)
    try:
        deadline = time.monotonic() + 120
        while not journal.db.query("SELECT 1 FROM chunks WHERE owner IS NOT NULL LIMIT 1", ()):
            assert time.monotonic() < deadline, "the victim never claimed a chunk"
            with contextlib.suppress(subprocess.TimeoutExpired):  # waits on the victim's end, 20 ms a turn
                victim.wait(0.02)
                pytest.fail(f"the victim ended (exit {victim.returncode}) before claiming a chunk")
    finally:
        journal.close()
    other = hosts.start(*PACKING)
    victim.communicate(timeout=240)
    assert victim.returncode == -signal.SIGKILL
    journal = PostgresJournal(pg_url)
    try:
        left_uploading = [s.shard_no for s in journal.iter_shards(hosts.batch_id, [ShardState.UPLOADING])]
    finally:
        journal.close()
    assert left_uploading  # the shard it died in (read before a lease of 3 s ran out)
    code, summary, err = hosts.run(*PACKING)
    assert code == 0, err
    out, err = other.communicate(timeout=240)
    assert other.returncode == 0, err
    assert json.loads(out)["finalized_at"] == summary["finalized_at"]
    check_packed_record(s3, bucket, hosts.batch_id, files)
    journal = PostgresJournal(pg_url)
    try:
        # The shard(s) the dead host left uploading ended stored, or dropped with their members re-planned.
        for shard_no in left_uploading:
            assert journal.get_shard(hosts.batch_id, shard_no).state in (ShardState.UPLOADED, ShardState.DROPPED)
        assert [s.shard_no for s in journal.iter_shards(hosts.batch_id, [ShardState.UPLOADING])] == []
        members = [r for r in journal.iter_files(hosts.batch_id) if r.shard_no is not None]
        assert all(r.state is FileState.UPLOADED for r in members)
        assert len({r.rel_path for r in members}) == len(members) == sum(len(b) < 16 * KiB for b in files.values())
    finally:
        journal.close()
