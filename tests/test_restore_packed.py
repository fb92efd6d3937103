"""archup restore of packed batches (upload --pack-under) through the CLI against the moto
server: the tree comes back exact; one packed file costs its own bytes; a shard most of
whose members are wanted is one GET; forged entries and damaged shards write nothing
unverified; a re-run reads no shard again; archived shards are thawed once each."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from tcpproxy import TcpProxy
from test_restore import entries, reseal, restore, tree
from test_verify import make_source, upload

from archup.errors import TransferError
from archup.manifest.reader import Entry, ShardEntry
from archup.restore import GET_COST, _PackedPlan, _ShardStream, fetch_whole

KiB = 1024
MiB = 1024 * KiB

FILES = {
    "a.txt": b"alpha\n" * 100,
    "dir/b.bin": bytes(range(256)) * 8,
    "dir/sub/c.bin": b"c" * 3000,
    "m\u00e9lange.txt": b"unicode name\n",
    "empty": b"",
    "deep/" + "x" * 120 + "/long-name.txt": b"a path longer than ustar's 100 bytes\n",
    "big.bin": os.urandom(300 * KiB),  # an object of its own
}
# Six members of one shard, each much larger than the 64 KiB a single restore may add.
MEMBERS = {f"m/{n}.bin": os.urandom(150 * KiB + n) for n in range(6)}


@pytest.fixture
def packed(cli: Any, tmp_path: Path) -> dict[str, Any]:
    return upload(cli, make_source(tmp_path / "src", FILES), "--pack-under", "64KiB")


@pytest.fixture
def members(cli: Any, tmp_path: Path) -> dict[str, Any]:
    return upload(cli, make_source(tmp_path / "src", MEMBERS), "--pack-under", "256KiB")


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the S3 server that counts the bytes it forwards and keeps the
    requests; read its counts after close()."""
    address = urlsplit(moto_endpoint)
    with TcpProxy(address.hostname or "127.0.0.1", address.port or 80, record=True) as started:
        yield started


def through(cli: Any, proxy: TcpProxy, batch_id: str, target: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """archup restore --json from the bucket alone, every request through the proxy."""
    result = cli("restore", batch_id, str(target), "--json", "--journal", str(target.parent / "no-journal.db"),
                 "--bucket", cli.bucket, "--endpoint-url", f"http://127.0.0.1:{proxy.port}", *args)
    proxy.close()  # every connection ended: the counts no longer move
    return result.exit_code, json.loads(result.stdout)


def gets(proxy: TcpProxy, under: str) -> list[tuple[str, str | None]]:
    """(key, Range header) of each GET through the proxy of an object whose key contains ``under``."""
    found = []
    for method, target, headers in proxy.requests():
        key = unquote(urlsplit(target).path).split("/", 2)[-1]
        if method == "GET" and under in key:
            found.append((key, headers.get("range")))
    return found


def shard_list(s3: Any, bucket: str, batch: dict[str, Any]) -> list[dict[str, Any]]:
    body = s3.get_object(Bucket=bucket, Key=batch["prefix"] + "manifest-shards.jsonl")["Body"].read()
    return [json.loads(line) for line in body.splitlines()]


def no_temporaries(root: Path) -> bool:
    return not list(root.rglob(".archup-restore-*"))


@pytest.mark.localstack
def test_a_packed_batch_comes_back_exact_and_a_rerun_reads_no_shard(cli, s3, packed, tmp_path, proxy) -> None:
    summary = json.loads(s3.get_object(Bucket=cli.bucket, Key=packed["manifest_key"])["Body"].read())
    assert summary["format_version"] == 2 and summary["files_packed"] == len(FILES) - 1
    target = tmp_path / "out"
    code, report = restore(cli, packed["batch_id"], target, journal=False)
    assert code == 0, report
    assert tree(target) == FILES
    assert (report["files_restored"], report["bytes_restored"], report["files_failed"]) == (
        len(FILES), sum(map(len, FILES.values())), 0)
    for path in FILES:
        assert (target / path).stat().st_mtime_ns == (tmp_path / "src" / path).stat().st_mtime_ns, path
    assert no_temporaries(target)

    # Again, through the proxy: every file in place and verified, no shard and no file read.
    code, report = through(cli, proxy, packed["batch_id"], target)
    assert code == 0, report
    assert (report["files_present"], report["files_restored"], report["bytes_restored"]) == (len(FILES), 0, 0)
    assert gets(proxy, "/shards/") == [] and gets(proxy, "/files/") == []
    assert tree(target) == FILES


@pytest.mark.localstack
def test_one_packed_file_transfers_its_own_bytes_and_little_else(cli, s3, members, tmp_path, proxy) -> None:
    (shard,) = shard_list(s3, cli.bucket, members)
    assert shard["members"] == len(MEMBERS) and shard["size"] > 6 * 150 * KiB
    entry = next(line for line in entries(s3, cli.bucket, members) if line["path"] == "m/3.bin")
    size = len(MEMBERS["m/3.bin"])
    target = tmp_path / "out"
    code, report = through(cli, proxy, members["batch_id"], target, "--include", "m/3.bin")
    assert code == 0, report
    assert tree(target) == {"m/3.bin": MEMBERS["m/3.bin"]}
    # One ranged GET of exactly its bytes in the shard, and everything the restore received
    # from the server (the manifest, listings, headers included) within its size + 64 KiB.
    assert gets(proxy, "/shards/") == [(shard["key"], f"bytes={entry['offset']}-{entry['offset'] + size - 1}")]
    print(f"one packed file of {size} bytes: {proxy.bytes_to_client} bytes received from the server")
    assert size < proxy.bytes_to_client <= size + 64 * KiB


@pytest.mark.localstack
def test_a_shard_most_of_whose_members_are_wanted_is_one_whole_get(cli, s3, members, tmp_path, proxy) -> None:
    (shard,) = shard_list(s3, cli.bucket, members)
    target = tmp_path / "out"
    code, report = through(cli, proxy, members["batch_id"], target, "--exclude", "m/4.bin", "--exclude", "m/5.bin")
    assert code == 0, report
    wanted = {path: body for path, body in MEMBERS.items() if path not in ("m/4.bin", "m/5.bin")}
    assert tree(target) == wanted and report["files_restored"] == 4
    assert gets(proxy, "/shards/") == [(shard["key"], None)]  # the whole object, once
    assert proxy.bytes_to_client >= shard["size"]


def test_a_rerun_fetches_only_the_members_not_in_place(cli, s3, members, moto_endpoint, tmp_path, proxy) -> None:
    """Files already in place do not count towards reading their shard whole: with four of
    six members there, the other two come as ranged GETs of their own bytes."""
    (shard,) = shard_list(s3, cli.bucket, members)
    target = tmp_path / "out"
    code, report = through(cli, proxy, members["batch_id"], target, "--exclude", "m/4.bin", "--exclude", "m/5.bin")
    assert code == 0 and report["files_restored"] == 4
    address = urlsplit(moto_endpoint)
    with TcpProxy(address.hostname or "127.0.0.1", address.port or 80, record=True) as again:
        code, report = through(cli, again, members["batch_id"], target)
    assert code == 0, report
    assert (report["files_present"], report["files_restored"]) == (4, 2)
    assert tree(target) == MEMBERS
    ranges = sorted(range_ for _, range_ in gets(again, "/shards/"))
    places = {line["path"]: line["offset"] for line in entries(s3, cli.bucket, members)}
    assert ranges == sorted(f"bytes={places[path]}-{places[path] + len(MEMBERS[path]) - 1}"
                            for path in ("m/4.bin", "m/5.bin"))
    assert again.bytes_to_client < shard["size"]


def test_the_rule_for_a_whole_shard() -> None:
    # More than half of the members needed: whole.
    assert fetch_whole(members=6, needed=4, needed_bytes=4 * MiB, shard_size=7 * MiB)
    assert fetch_whole(members=1, needed=1, needed_bytes=100, shard_size=3 * KiB)
    # Half or fewer: ranged, unless the shard brings at most GET_COST per GET saved beyond them.
    assert not fetch_whole(members=6, needed=3, needed_bytes=3 * MiB, shard_size=7 * MiB)
    assert fetch_whole(members=100, needed=40, needed_bytes=40 * KiB, shard_size=40 * KiB + 39 * GET_COST)
    assert not fetch_whole(members=100, needed=40, needed_bytes=40 * KiB, shard_size=40 * KiB + 39 * GET_COST + 1)
    # One file of several is never a whole shard; nothing needed, no GET at all.
    assert not fetch_whole(members=2, needed=1, needed_bytes=10, shard_size=2 * KiB)
    assert not fetch_whole(members=4, needed=0, needed_bytes=0, shard_size=2 * KiB)


def _packed_lines(s3: Any, bucket: str, batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {line["path"]: line for line in entries(s3, bucket, batch)}


@pytest.mark.localstack
def test_forged_packed_entries_write_nothing_and_the_others_come_back(cli, s3, packed, tmp_path) -> None:
    prefix = packed["prefix"]
    (shard,) = shard_list(s3, cli.bucket, packed)
    lines = _packed_lines(s3, cli.bucket, packed)
    lines["a.txt"]["offset"] = shard["size"] - 10                      # runs past the shard's end
    lines["dir/b.bin"]["shard"] = prefix + "shards/000099.tar"         # no such shard in the list
    lines["dir/sub/c.bin"]["shard"] = prefix + "files/big.bin"         # an object, not a listed shard
    lines["m\u00e9lange.txt"]["sha256"] = hashlib.sha256(b"forged").hexdigest()  # other bytes
    reseal(s3, cli.bucket, packed, list(lines.values()))
    forged = {"a.txt": "run past the end", "dir/b.bin": "not in the sealed shard list",
              "dir/sub/c.bin": "not in the sealed shard list", "m\u00e9lange.txt": "SHA-256"}

    target = tmp_path / "out"
    code, report = restore(cli, packed["batch_id"], target, journal=False)
    assert code == 3, report
    reasons = {failure["path"]: failure["reason"] for failure in report["failures"]}
    assert set(reasons) == set(forged)
    for path, reason in forged.items():
        assert reason in reasons[path], reasons[path]
    assert tree(target) == {path: body for path, body in FILES.items() if path not in forged}
    assert no_temporaries(target)

    # The same forged digest alone (a ranged GET, not the whole shard): refused too.
    code, report = restore(cli, packed["batch_id"], tmp_path / "one", "--include", "m*lange.txt", journal=False)
    assert code == 3 and [failure["path"] for failure in report["failures"]] == ["m\u00e9lange.txt"]
    assert "SHA-256" in report["failures"][0]["reason"] and tree(tmp_path / "one") == {}


def test_a_shard_list_that_names_an_object_outside_shards_is_refused(cli, s3, packed, tmp_path) -> None:
    """A re-sealed shard list cannot make restore read the batch's other objects as a shard."""
    prefix = packed["prefix"]
    summary = json.loads(s3.get_object(Bucket=cli.bucket, Key=packed["manifest_key"])["Body"].read())
    big = s3.head_object(Bucket=cli.bucket, Key=prefix + "files/big.bin")
    shards = shard_list(s3, cli.bucket, packed) + [
        {"key": prefix + "files/big.bin", "size": big["ContentLength"], "sha256": "0" * 64, "etag": big["ETag"],
         "members": 1, "part_size": None}]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in shards)
    s3.put_object(Bucket=cli.bucket, Key=summary["shards"]["key"], Body=body)
    summary["shards"].update(sha256=hashlib.sha256(body).hexdigest(), bytes=len(body), count=len(shards))
    s3.put_object(Bucket=cli.bucket, Key=packed["manifest_key"], Body=json.dumps(summary).encode())
    lines = _packed_lines(s3, cli.bucket, packed)
    lines["a.txt"].update(shard=prefix + "files/big.bin", offset=0, size=1000,
                          sha256=hashlib.sha256(FILES["big.bin"][:1000]).hexdigest())
    reseal(s3, cli.bucket, packed, list(lines.values()))

    code, report = restore(cli, packed["batch_id"], tmp_path / "out", journal=False)
    assert code == 3
    assert [(f["path"], "is outside" in f["reason"]) for f in report["failures"]] == [("a.txt", True)]
    assert not (tmp_path / "out" / "a.txt").exists()


@pytest.mark.localstack
def test_a_damaged_shard_fails_the_damaged_member_alone(cli, s3, packed, tmp_path) -> None:
    (shard,) = shard_list(s3, cli.bucket, packed)
    line = _packed_lines(s3, cli.bucket, packed)["dir/b.bin"]
    body = bytearray(s3.get_object(Bucket=cli.bucket, Key=shard["key"])["Body"].read())
    body[line["offset"] + 10] ^= 0xFF  # one of its bytes flipped in the bucket, the size unchanged
    s3.put_object(Bucket=cli.bucket, Key=shard["key"], Body=bytes(body))

    # All wanted: the whole shard, in one GET; that file alone: a ranged GET of its bytes.
    for target, args in ((tmp_path / "whole", ()), (tmp_path / "ranged", ("--include", "dir/b.bin"))):
        code, report = restore(cli, packed["batch_id"], target, *args, journal=False)
        assert code == 3, report
        assert [failure["path"] for failure in report["failures"]] == ["dir/b.bin"]
        assert "SHA-256" in report["failures"][0]["reason"]
        assert not (target / "dir" / "b.bin").exists() and no_temporaries(target)
    assert tree(tmp_path / "whole") == {path: body for path, body in FILES.items() if path != "dir/b.bin"}
    assert tree(tmp_path / "ranged") == {}


def test_dry_run_names_packed_files(cli, packed, tmp_path) -> None:
    result = cli("restore", packed["batch_id"], str(tmp_path / "out"), "--dry-run", "--endpoint-url", cli.endpoint)
    assert result.exit_code == 0, result.stderr
    assert "fetch  a.txt" in result.stdout and "fetch  big.bin" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.localstack
@pytest.mark.parametrize("point", ["restore-before-rename:3", "restore-after-rename:4"])
def test_kill_9_mid_shard_then_the_same_command_ends_with_the_exact_tree(cli, tmp_path, point) -> None:
    files = {**FILES, **MEMBERS}
    batch = upload(cli, make_source(tmp_path / "src", files), "--pack-under", "256KiB")
    target = tmp_path / "out"
    args = ("restore", batch["batch_id"], str(target), "--json", "--endpoint-url", cli.endpoint, "--parallel", "2")
    crashed = cli.subprocess(*args, env={"ARCHUP_CRASH_AT": point})
    assert crashed.exit_code == -signal.SIGKILL, crashed.stderr
    in_place = {name: body for name, body in tree(target).items() if not name.split("/")[-1].startswith(".")}
    assert in_place and all(files[name] == body for name, body in in_place.items())

    rerun = cli.subprocess(*args)
    assert rerun.exit_code == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert tree(target) == files
    assert (report["files_present"], report["files_restored"]) == (len(in_place), len(files) - len(in_place))


def test_an_archived_shard_is_thawed_once_for_all_its_members(cli, s3, tmp_path) -> None:
    batch = upload(cli, make_source(tmp_path / "src", FILES), "--pack-under", "64KiB", "--storage-class", "GLACIER")
    (shard,) = shard_list(s3, cli.bucket, batch)
    target = tmp_path / "out"
    code, report = restore(cli, batch["batch_id"], target, journal=False)
    assert code == 75, report
    # The shard and big.bin: two objects, two requests, for seven files.
    assert (report["objects_thawing"], report["thaw_requests"], report["files_failed"]) == (2, 2, 0)
    assert tree(target) == {}
    head = s3.head_object(Bucket=cli.bucket, Key=shard["key"])
    assert "ongoing-request" in head["ResponseMetadata"]["HTTPHeaders"]["x-amz-restore"]

    code, report = restore(cli, batch["batch_id"], target, journal=False)
    assert code == 0 and report["thaw_requests"] == 0
    assert tree(target) == FILES


def test_wait_thaws_a_shard_and_restores_its_members_in_one_run(cli, tmp_path) -> None:
    batch = upload(cli, make_source(tmp_path / "src", FILES), "--pack-under", "64KiB",
                   "--storage-class", "DEEP_ARCHIVE")
    code, report = restore(cli, batch["batch_id"], tmp_path / "out", "--wait", "--restore-tier", "Bulk")
    assert code == 0, report
    assert report["thaw_requests"] == 2 and tree(tmp_path / "out") == FILES


def test_the_plan_of_many_packed_entries_lives_on_disk() -> None:
    """30,000 packed entries set aside and read back a shard at a time: the Python heap
    holds a page of them, not all (tracemalloc sees Python's allocations, not SQLite's
    bounded page cache). The same entries held in a list take some 9 MiB."""
    count, per_shard = 30_000, 300
    plan = _PackedPlan("b/shards/")
    try:
        for number in range(count // per_shard):
            plan.add_shard(ShardEntry(f"b/shards/{number:06d}.tar", 10 * MiB, "0" * 64, None, per_shard, None))
        tracemalloc.start()
        for n in range(count):
            # Not in shard order, as a manifest in path order may list them.
            entry = Entry(f"f/{n:07d}", f"b/shards/{n % (count // per_shard):06d}.tar", 100, "1" * 64, None, None,
                          0, offset=1024 * (n // (count // per_shard)))
            assert plan.add(entry) is None
        plan.loaded()
        seen = 0
        for group in plan.groups():
            offsets = [member.offset for member in plan.members(group.key)]
            assert offsets == sorted(offsets) and len(offsets) == group.wanted == per_shard
            seen += len(offsets)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        plan.close()
    assert seen == count
    assert peak < 2 * MiB, peak


class _BreakingStore:
    """Each of the first ``breaks`` GETs breaks after 100 bytes; the later ones do not."""

    def __init__(self, data: bytes, breaks: int) -> None:
        self.data = data
        self.breaks = breaks
        self.gets: list[tuple[int, str | None]] = []

    def open_object(self, key: str, *, start: int = 0, length: int | None = None,
                    if_match: str | None = None) -> Any:
        self.gets.append((start, if_match))
        return _Body(self.data[start:], 100 if len(self.gets) <= self.breaks else None)


class _Body:
    def __init__(self, data: bytes, break_after: int | None) -> None:
        self.data = data
        self.break_after = break_after
        self.read = 0

    def readinto(self, view: memoryview) -> int:
        if self.break_after is not None and self.read >= self.break_after:
            raise TransferError("GetObject shard: ConnectionResetError", "ConnectionResetError")
        count = min(len(view), len(self.data) - self.read, 64)
        view[:count] = self.data[self.read:self.read + count]
        self.read += count
        return count

    def close(self) -> None:
        pass


def test_a_shard_stream_resumes_where_it_broke_then_gives_up_without_more_requests() -> None:
    data = os.urandom(1000)
    store = _BreakingStore(data, breaks=_ShardStream.RESUMES)
    stream = _ShardStream(store, "b/shards/000001.tar", '"etag"')
    buffer = bytearray(4096)
    received = bytearray()
    while count := stream.readinto(memoryview(buffer)):
        received += buffer[:count]
    assert bytes(received) == data and stream.hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    # Each resume from the byte it reached, pinned to the same ETag.
    assert [start for start, _ in store.gets] == [0, 128, 256, 384] and {etag for _, etag in store.gets} == {'"etag"'}

    store = _BreakingStore(data, breaks=100)
    stream = _ShardStream(store, "b/shards/000001.tar", None)
    with pytest.raises(TransferError):
        while stream.readinto(memoryview(buffer)):
            pass
    with pytest.raises(TransferError):
        stream.readinto(memoryview(buffer))
    assert len(store.gets) == 1 + _ShardStream.RESUMES  # broken: no request after the last resume
