"""Network and server faults: archup through a misbehaving network and server.

Two tools. ``faultproxy.FaultProxy`` is a reverse proxy on 127.0.0.1 in front of the
moto server that answers 500 InternalError and 503 SlowDown, resets connections in
the middle of a request body, stalls past the client's read timeout, drops answers
and gives canned S3 errors, at a seeded rate or by rule; archup talks to it over
real HTTP through the real boto3 stack (retries included), and every check of the
bucket goes to moto directly, through the separate ``s3`` client. botocore's
``Stubber`` gives exact sequences of answers to the library (``Uploader`` over a
real journal) where the order of requests is the point.

The runs through stalls pass ``--timeout 2`` (the read timeout; 60 s by default), so a
stall costs 2 s, not 60.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import random
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import boto3
import botocore.config
import botocore.exceptions
import pytest
from botocore.stub import Stubber
from conftest import Cli, both_transports
from faultproxy import (
    DEFAULT_KINDS,
    Canned,
    FaultProxy,
    RequestHead,
    Rule,
    operation_is,
)
from test_crash import write_tree
from testdata import pattern_bytes
from ulid import ULID

from archup.errors import DestinationError, ExitCode
from archup.journal import SQLiteJournal
from archup.states import BatchState, FileState
from archup.store import ChecksumMode, S3Store, StoreConfig, TransportKind, crc32_b64
from archup.store.putargs import put_args
from archup.store.retry import RetryPolicy, Verdict
from archup.uploader import Uploader, UploadOptions

MiB = 1024 * 1024
PART_SIZE = 5 * MiB
READ_TIMEOUT = 2.0
SEED = 20261128


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_endpoint, seed=SEED) as started:
        yield started


@pytest.fixture
def proxied(proxy: FaultProxy, bucket: str, journal_path: Path) -> Cli:
    """archup's CLI (in-process) with its endpoint at the proxy."""
    return Cli(proxy.url, bucket, journal_path)


def small_files(count: int, seed: int, prefix: str = "") -> dict[str, bytes]:
    """Tiny files (0 to 2 KiB, some empty) spread over a few directories."""
    rng = random.Random(seed)
    return {f"{prefix}d{index % 7}/f{index:04d}.bin": rng.randbytes(rng.choice((0, 1, 17, 300, 2048)))
            for index in range(count)}


def one_json_object(stdout: str) -> dict[str, Any]:
    document = json.loads(stdout)
    assert isinstance(document, dict), stdout
    return document


def get_bytes(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def list_keys(s3: Any, bucket: str, prefix: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys |= {item["Key"] for item in page.get("Contents", [])}
    return keys


def open_uploads(s3: Any, bucket: str) -> list[str]:
    return [upload["Key"] for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def assert_sealed_with_exactly(s3: Any, bucket: str, batch_id: str, files: dict[str, bytes]) -> None:
    """Every file's object holds exactly its bytes; the manifest lists exactly the files; the
    summary seals the entries; no multipart upload is left open. All read from moto directly."""
    prefix = f"staging/{batch_id}/"
    assert list_keys(s3, bucket, prefix + "files/") == {prefix + "files/" + rel for rel in files}
    for rel_path, data in files.items():
        assert get_bytes(s3, bucket, prefix + "files/" + rel_path) == data, rel_path
    entries_body = get_bytes(s3, bucket, prefix + "manifest.jsonl")
    entries = [json.loads(line) for line in entries_body.decode().splitlines()]
    assert sorted(entry["path"] for entry in entries) == sorted(files)
    for entry in entries:
        assert entry["sha256"] == hashlib.sha256(files[entry["path"]]).hexdigest(), entry["path"]
        assert entry["size"] == len(files[entry["path"]])
    summary = json.loads(get_bytes(s3, bucket, prefix + "manifest.json"))
    assert summary["batch_id"] == batch_id
    assert summary["entries"]["sha256"] == hashlib.sha256(entries_body).hexdigest()
    assert summary["files_uploaded"] == len(files)
    assert open_uploads(s3, bucket) == []


def only_batch(journal_path: Path) -> str:
    journal = SQLiteJournal(journal_path)
    try:
        batches = journal.list_batches()
        assert len(batches) == 1, batches
        return batches[0].batch_id
    finally:
        journal.close()


def assert_journal_consistent(journal_path: Path, s3: Any, bucket: str, files: dict[str, bytes]) -> dict[str, int]:
    """Read back through a new connection: the journal is intact, and every file it calls
    uploaded has its object with exactly the bytes and SHA-256 it recorded. Returns the counts."""
    journal = SQLiteJournal(journal_path)
    try:
        assert journal.integrity_check() == "ok"
        (batch,) = journal.list_batches()
        counts: dict[str, int] = {}
        for record in journal.iter_files(batch.batch_id):
            counts[record.state.value] = counts.get(record.state.value, 0) + 1
            if record.state is FileState.UPLOADED:
                assert get_bytes(s3, bucket, record.key) == files[record.rel_path], record.rel_path
                assert record.sha256 == hashlib.sha256(files[record.rel_path]).hexdigest()
        assert sum(counts.values()) == len(files)
        return counts
    finally:
        journal.close()


def on_path(operation: str, suffix: str) -> Any:
    return lambda head: head.operation == operation and head.path.endswith(suffix)


# -- the proxy itself ----------------------------------------------------------------------------


def test_proxy_forwards_faithfully_and_each_fault_reaches_the_client(proxy: FaultProxy, s3: Any,
                                                                       bucket: str) -> None:
    """Without faults every request and answer passes unchanged (a 6 MiB body, a file object
    with Expect: 100-continue, a chunked body); each forced fault reaches a client without
    retries as the documented error, and only lost-response lets the server do the work."""
    import boto3

    client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1", config=botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=1.0, connect_timeout=1.0))
    big = pattern_bytes(6 * MiB + 5, seed=1)
    client.put_object(Bucket=bucket, Key="big", Body=big)
    assert get_bytes(s3, bucket, "big") == big
    assert get_bytes(client, bucket, "big") == big
    with open(__file__, "rb") as handle:  # a file object: botocore sends Expect: 100-continue
        client.put_object(Bucket=bucket, Key="this-file", Body=handle)
    assert get_bytes(s3, bucket, "this-file") == Path(__file__).read_bytes()

    host, port = urllib.parse.urlsplit(proxy.url).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("PUT", f"/{bucket}/chunked", body=iter([b"abc", b"", b"defgh"]),
                       headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    assert connection.getresponse().status == 200
    connection.close()
    assert get_bytes(s3, bucket, "chunked") == b"abcdefgh"
    clean = proxy.snapshot()
    assert clean.requests == clean.forwarded and not clean.faults

    expected: dict[str, tuple[type[Exception], str | None, bool]] = {
        "500": (botocore.exceptions.ClientError, "InternalError", False),
        "503": (botocore.exceptions.ClientError, "SlowDown", False),
        "reset": (botocore.exceptions.ConnectionClosedError, None, False),
        "stall": (botocore.exceptions.ReadTimeoutError, None, False),
        "lost-response": (botocore.exceptions.ConnectionClosedError, None, True),
    }
    for kind, (error_class, code, stored) in expected.items():
        key = f"faulted-{kind}"
        proxy.add_rule(Rule(on_path("PutObject", "/" + key), kind, times=1))
        with pytest.raises(error_class) as caught:
            client.put_object(Bucket=bucket, Key=key, Body=pattern_bytes(300_000, seed=2))
        if code is not None:
            assert isinstance(caught.value, botocore.exceptions.ClientError)
            assert caught.value.response["Error"]["Code"] == code
        assert (key in list_keys(s3, bucket, key)) is stored, kind
    stats = proxy.snapshot()
    assert stats.faults == {kind: 1 for kind in expected}
    assert stats.stalls_abandoned_by_client == 1
    assert stats.upstream_errors == 0


# -- a whole batch through a faulty network ----------------------------------------------------


MULTIPART_SIZES = (PART_SIZE, 6 * MiB + 123, 11 * MiB, 15 * MiB + 7)


@both_transports
def test_batch_of_300_files_through_ten_percent_faults_completes_byte_identical(
        proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str, tmp_path: Path, journal_path: Path) -> None:
    """10 % of the requests fail (500, 503 SlowDown, reset mid-body, stall past the read
    timeout), plus one forced fault of each kind on the multipart operations. With --retries 10
    (what a user on a bad network does) the batch completes, every object byte-identical."""
    files = small_files(300 - len(MULTIPART_SIZES), seed=SEED)
    for index, size in enumerate(MULTIPART_SIZES):
        files[f"large/part-{index}.bin"] = pattern_bytes(size, seed=index)
    source = write_tree(tmp_path / "src", files)
    # Faults the random draw may miss: every multipart operation meets one.
    proxy.add_rule(Rule(operation_is("CreateMultipartUpload"), "503", times=1))
    proxy.add_rule(Rule(operation_is("UploadPart"), "reset", times=1))
    proxy.add_rule(Rule(operation_is("UploadPart"), "stall", times=1))
    proxy.add_rule(Rule(operation_is("CompleteMultipartUpload"), "500", times=1))
    proxy.set_rate(0.10)

    result = proxied("upload", "--json", "--parallel", "8", "--part-size", "5MiB", "--retries", "10",
                     "--timeout", str(READ_TIMEOUT), "--connect-timeout", str(READ_TIMEOUT), str(source))
    stats = proxy.snapshot()

    assert result.exit_code == 0, (result.stdout, result.stderr, stats)
    summary = one_json_object(result.stdout)
    assert summary["status"] == "enqueued"
    assert summary["files_uploaded"] == len(files) == 300
    assert summary["total_bytes"] == sum(len(data) for data in files.values())
    assert_sealed_with_exactly(s3, bucket, summary["batch_id"], files)
    assert assert_journal_consistent(journal_path, s3, bucket, files) == {"uploaded": 300}
    # The faults really happened, every kind, at about the rate asked.
    assert all(stats.faults[kind] >= 2 for kind in DEFAULT_KINDS), stats.faults
    assert stats.stalls_abandoned_by_client == stats.faults["stall"]  # each one was a client read timeout
    assert 0.05 * stats.requests <= sum(stats.faults.values()) <= 0.2 * stats.requests, stats
    assert stats.upstream_errors == 0


# -- bodies changed on the way: the validating and corrupting modes ------------------------------


def test_validating_proxy_refuses_a_body_that_does_not_match_its_claimed_checksum(moto_endpoint: str, s3: Any,
                                                                                   bucket: str) -> None:
    """What S3 does: every claimed checksum is computed over the body received; a mismatch is
    400 BadDigest and the server never sees the request. A matching one is forwarded."""
    import base64

    from awscrt import checksums

    body = pattern_bytes(100_000, seed=3)
    right = {
        "x-amz-checksum-crc32": base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode(),
        "x-amz-checksum-crc64nvme": base64.b64encode(checksums.crc64nvme(body).to_bytes(8, "big")).decode(),
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(body).digest()).decode(),
        "Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode(),
    }
    with FaultProxy(moto_endpoint, validate=True) as proxy:
        host, port = urllib.parse.urlsplit(proxy.url).netloc.split(":")
        for name, value in right.items():
            for claimed, status in ((value, 200), (value[:-4] + ("AAA=" if value[-4:] != "AAA=" else "BBB="), 400)):
                key = f"{name}-{status}"
                connection = http.client.HTTPConnection(host, int(port), timeout=10)
                connection.request("PUT", f"/{bucket}/{key}", body=body, headers={name: claimed})
                answer = connection.getresponse()
                text = answer.read()
                connection.close()
                assert answer.status == status, (name, text)
                assert (b"<Code>BadDigest</Code>" in text) is (status == 400)
                assert (key in list_keys(s3, bucket, key)) is (status == 200), name
        stats = proxy.snapshot()
    assert stats.bad_digests == len(right)
    assert stats.validated == {name.lower(): 2 for name in right}


def _corrupting_run(moto_endpoint: str, bucket: str, journal_path: Path, tmp_path: Path,
                    *, validate: bool) -> tuple[Any, dict[str, bytes], Any]:
    files = small_files(150, seed=SEED + 5)
    for index, size in enumerate(MULTIPART_SIZES):
        files[f"large/part-{index}.bin"] = pattern_bytes(size, seed=100 + index)
    source = write_tree(tmp_path / "src", files)
    with FaultProxy(moto_endpoint, seed=SEED, validate=validate, corrupt=0.10) as proxy:
        result = Cli(proxy.url, bucket, journal_path)(
            "upload", "--json", "--parallel", "8", "--part-size", "5MiB", "--retries", "10", str(source))
        return result, files, proxy.snapshot()


@both_transports
def test_ten_percent_of_bodies_changed_on_the_way_the_batch_still_ends_byte_identical(
        moto_endpoint: str, s3: Any, bucket: str, tmp_path: Path, journal_path: Path) -> None:
    """A network that changes one byte of 10 % of the request bodies, in front of a server that
    checks bodies as S3 does: every changed body is refused (BadDigest) and sent again, none
    reaches the server, and the batch ends sealed with every object byte-identical (downloaded)."""
    result, files, stats = _corrupting_run(moto_endpoint, bucket, journal_path, tmp_path, validate=True)
    assert result.exit_code == 0, (result.stdout, result.stderr, stats)
    summary = one_json_object(result.stdout)
    assert summary["status"] == "enqueued" and summary["files_uploaded"] == len(files)
    assert_sealed_with_exactly(s3, bucket, summary["batch_id"], files)
    assert 0.05 * stats.requests <= stats.corrupted <= 0.2 * stats.requests, stats
    assert stats.bad_digests == stats.corrupted  # each changed body was caught by its own checksum
    assert stats.corrupted_forwarded == 0  # no changed body ever reached the server
    # Every kind of body archup sends claims a checksum: the parts' CRC64NVME, the single PUTs'
    # SHA-256, CompleteMultipartUpload's Content-MD5.
    assert {"x-amz-checksum-crc64nvme", "x-amz-checksum-sha256", "content-md5"} <= set(stats.validated)
    assert stats.by_operation[("UploadPart", "bad-digest")] >= 1, stats.by_operation
    assert stats.by_operation[("PutObject", "bad-digest")] >= 1, stats.by_operation


def test_without_the_servers_check_changed_bodies_would_be_stored(
        moto_endpoint: str, s3: Any, bucket: str, tmp_path: Path, journal_path: Path) -> None:
    """The control for the test above: the same corruption with the check off reaches the
    server and leaves objects that differ from their files, so the check is what saves them."""
    result, files, stats = _corrupting_run(moto_endpoint, bucket, journal_path, tmp_path, validate=False)
    assert stats.corrupted_forwarded == stats.corrupted > 0
    batch_id = only_batch(journal_path)
    prefix = f"staging/{batch_id}/files/"
    # A reader that does not check the stored checksum (an object stored with the checksum
    # the client claimed, as S3 keeps it, would otherwise fail the read instead of differing).
    raw = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                       config=botocore.config.Config(response_checksum_validation="when_required"))
    differing = [rel for rel, data in files.items()
                 if prefix + rel in list_keys(s3, bucket, prefix + rel) and get_bytes(raw, bucket, prefix + rel) != data]
    assert differing, "corruption never reached an object"


def test_an_endpoint_that_refuses_crc64nvme_gets_full_object_crc32(
        proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str, tmp_path: Path, journal_path: Path) -> None:
    """CreateMultipartUpload with CRC64NVME answered 400 InvalidRequest (an endpoint that does
    not know it): the upload is created again with CRC32, and so is every later one."""
    files = {f"big-{n}.bin": pattern_bytes(11 * MiB + n, seed=n) for n in range(2)}
    source = write_tree(tmp_path / "src", files)
    refusal = proxy.add_rule(Rule(
        lambda head: head.operation == "CreateMultipartUpload" and head.header("x-amz-checksum-algorithm") == "CRC64NVME",
        Canned(400, "InvalidRequest", "Checksum algorithm CRC64NVME is not supported.")))
    result = proxied("upload", "--json", "--parallel", "1", "--part-size", "5MiB", str(source))
    assert result.exit_code == 0, result.stderr
    summary = one_json_object(result.stdout)
    assert refusal.hits == 1  # asked once; CRC32 from then on
    for rel_path, data in files.items():
        head = s3.head_object(Bucket=bucket, Key=summary["prefix"] + "files/" + rel_path, ChecksumMode="ENABLED")
        assert (head["ChecksumType"], head["ChecksumCRC32"]) == ("FULL_OBJECT", crc32_b64(zlib.crc32(data)))
    journal = SQLiteJournal(journal_path)
    try:
        kinds = {journal.get_file(summary["batch_id"], rel).checksum_kind for rel in files}
    finally:
        journal.close()
    assert kinds == {"CRC32/FULL_OBJECT"}
    assert_sealed_with_exactly(s3, bucket, summary["batch_id"], files)


# -- retries ---------------------------------------------------------------------------------


@both_transports
def test_retries_option_is_the_number_of_retries(proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str,
                                                 tmp_path: Path) -> None:
    """--retries 2: three attempts in all. A request refused three times fails its file (exit 3)."""
    source = write_tree(tmp_path / "src", {"a.txt": b"alpha\n", "b.txt": b"bravo\n"})
    rule = proxy.add_rule(Rule(on_path("PutObject", "/files/a.txt"), "500", times=3))

    result = proxied("upload", "--retries", "2", str(source))

    assert rule.hits == 3
    assert result.exit_code == ExitCode.PARTIAL, (result.stdout, result.stderr)
    assert "failed: a.txt" in result.stderr and "InternalError" in result.stderr, result.stderr


# -- 200 with an error body on CompleteMultipartUpload -----------------------------------------


COMPLETE_ERROR_IN_200 = Canned(200, "InternalError", "We encountered an internal error. Please try again.")


def test_200_with_error_body_on_complete_is_retried_then_succeeds(proxy: FaultProxy, proxied: Cli, s3: Any,
                                                                  bucket: str, tmp_path: Path) -> None:
    """Real HTTP: a 200 whose body is an S3 error is an error (botocore retries it); the retried
    Complete reaches the server and the object is whole."""
    files = {"big.bin": pattern_bytes(PART_SIZE + 1000, seed=3), "small.txt": b"small\n"}
    source = write_tree(tmp_path / "src", files)
    rule = proxy.add_rule(Rule(operation_is("CompleteMultipartUpload"), COMPLETE_ERROR_IN_200, times=1))

    result = proxied("upload", "--json", "--part-size", "5MiB", str(source))

    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert rule.hits == 1 and proxy.snapshot().canned["InternalError"] == 1
    assert_sealed_with_exactly(s3, bucket, one_json_object(result.stdout)["batch_id"], files)



def test_200_with_error_body_on_every_complete_fails_the_file(proxy: FaultProxy, proxied: Cli, s3: Any,
                                                              bucket: str, tmp_path: Path,
                                                              journal_path: Path) -> None:
    """Real HTTP: every Complete answered 200-with-error: the file is failed by name (exit 3),
    never recorded uploaded, its upload aborted, the batch not sealed."""
    files = {"big.bin": pattern_bytes(PART_SIZE + 1000, seed=4), "small.txt": b"small\n"}
    source = write_tree(tmp_path / "src", files)
    rule = proxy.add_rule(Rule(operation_is("CompleteMultipartUpload"), COMPLETE_ERROR_IN_200))

    result = proxied("upload", "--part-size", "5MiB", "--retries", "2", str(source))

    assert result.exit_code == ExitCode.PARTIAL, (result.stdout, result.stderr)
    assert rule.hits >= 1
    assert "failed: big.bin" in result.stderr and "InternalError" in result.stderr
    batch_id = only_batch(journal_path)
    assert assert_journal_consistent(journal_path, s3, bucket, files) == {"uploaded": 1, "failed": 1}
    assert list_keys(s3, bucket, f"staging/{batch_id}/") == {f"staging/{batch_id}/batch.json",
                                                             f"staging/{batch_id}/files/small.txt"}
    assert open_uploads(s3, bucket) == []


# -- answers lost after the server did the work ------------------------------------------------




@pytest.mark.parametrize("operation", [
    "PutObject",
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
])
def test_answer_lost_after_the_server_did_the_work(proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str,
                                                  tmp_path: Path, operation: str) -> None:
    """The server does the request, the answer never arrives (the connection is reset), and
    botocore sends it again: a PUT or part again is harmless; a Complete again meets NoSuchUpload
    and archup recognises its own completed object; the batch completes with nothing left open."""
    files = {"big.bin": pattern_bytes(PART_SIZE + 4321, seed=8), "small.txt": b"small\n"}
    source = write_tree(tmp_path / "src", files)
    rule = proxy.add_rule(Rule(operation_is(operation), "lost-response", times=1))

    result = proxied("upload", "--json", "--part-size", "5MiB", str(source))

    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert rule.hits == 1 and proxy.snapshot().faults["lost-response"] == 1
    assert_sealed_with_exactly(s3, bucket, one_json_object(result.stdout)["batch_id"], files)


# -- exact sequences (botocore Stubber, the library over a real journal) ----------------------


STUB_BUCKET = "stub-bucket"


class Stubbed:
    """An Uploader's world: a source directory, a real journal, an S3Store whose client answers
    from a Stubber (no request leaves the process)."""

    def __init__(self, tmp_path: Path, files: dict[str, bytes]) -> None:
        self.files = files
        self.source = write_tree(tmp_path / "src", files)
        # Stubbed answers skip botocore's retries: each one is what is left after them. The
        # Stubber answers botocore's requests only: the files' PUTs go through botocore too.
        self.store = S3Store(StoreConfig(bucket=STUB_BUCKET, endpoint_url="http://127.0.0.1:9", region="us-east-1",
                                         transport=TransportKind.BOTOCORE))
        self.stubber = Stubber(self.store.client)
        self.stubber.activate()
        self.journal = SQLiteJournal(tmp_path / "journal" / "journal.db")
        self.batch_id = self.journal.init_batch(str(ULID()), source_root=str(self.source), bucket=STUB_BUCKET,
                                                prefix="staging/", part_size=PART_SIZE).batch_id

    def run(self) -> Any:
        # One worker: the stubbed answers are consumed in exactly the order listed.
        options = UploadOptions(parallel=1, part_size=PART_SIZE, multipart_threshold=PART_SIZE)
        return Uploader(self.journal, self.store, self.batch_id, options).run()

    def assert_all_answers_used(self) -> None:
        self.stubber.assert_no_pending_responses()

    def record(self, rel_path: str) -> Any:
        return self.journal.get_file(self.batch_id, rel_path)

    def ok(self, method: str, answer: dict[str, Any] | None = None) -> None:
        self.stubber.add_response(method, answer or {})

    def error(self, method: str, code: str, status: int, message: str = "stubbed") -> None:
        self.stubber.add_client_error(method, service_error_code=code, service_message=message,
                                      http_status_code=status)

    def multipart_until_complete(self, upload_id: str, parts: int) -> None:
        self.ok("create_multipart_upload", {"UploadId": upload_id})
        for number in range(1, parts + 1):
            self.ok("upload_part", {"ETag": f'"{hashlib.md5(str(number).encode()).hexdigest()}"'})

    def close(self) -> None:
        self.stubber.deactivate()
        self.journal.close()


@pytest.fixture
def stubbed(tmp_path: Path) -> Iterator[Any]:
    made: list[Stubbed] = []

    def make(files: dict[str, bytes]) -> Stubbed:
        made.append(Stubbed(tmp_path, files))
        return made[-1]

    yield make
    for world in made:
        world.close()



def test_stubbed_200_error_on_complete_fails_the_file_and_aborts(stubbed: Any) -> None:
    """CompleteMultipartUpload ends in InternalError, as a 200 with an error body does once
    botocore has turned it into a 500 and run out of retries (the Stubber answers after that
    conversion; test_200_with_error_body_* send the real 200 over HTTP): the upload is aborted,
    the file failed, never uploaded."""
    world = stubbed({"big.bin": pattern_bytes(2 * PART_SIZE, seed=5)})
    world.multipart_until_complete("upload-1", parts=2)
    world.error("complete_multipart_upload", "InternalError", 500)
    world.ok("abort_multipart_upload")

    result = world.run()

    assert (result.files_uploaded, result.files_failed, result.fatal) == (0, 1, None)
    record = world.record("big.bin")
    assert record.state is FileState.FAILED and "InternalError" in (record.error or "")
    assert world.journal.get_batch(world.batch_id).state is BatchState.FAILED
    world.assert_all_answers_used()  # the AbortMultipartUpload was sent


def test_stubbed_no_such_upload_on_upload_part_restarts_the_file_in_the_same_run(stubbed: Any) -> None:
    """UploadPart answers NoSuchUpload (the upload vanished: expired by a lifecycle rule, aborted
    by someone else): nothing to abort; the file starts over with a new upload in the same run."""
    data = pattern_bytes(2 * PART_SIZE, seed=6)
    world = stubbed({"big.bin": data})
    world.ok("create_multipart_upload", {"UploadId": "upload-1"})
    world.ok("upload_part", {"ETag": '"e1"'})
    world.error("upload_part", "NoSuchUpload", 404)
    # No AbortMultipartUpload: a new upload, both parts sent again, completed.
    world.multipart_until_complete("upload-2", parts=2)
    world.ok("complete_multipart_upload", {"ETag": '"abc-2"'})

    result = world.run()

    assert (result.files_uploaded, result.files_failed, result.fatal) == (1, 0, None)
    record = world.record("big.bin")
    assert record.state is FileState.UPLOADED and record.sha256 == hashlib.sha256(data).hexdigest()
    world.assert_all_answers_used()


def test_stubbed_an_upload_lost_twice_in_one_run_fails_the_file_for_the_next_run(stubbed: Any) -> None:
    """Lost again after the restart: failed by name (a resumable exit 3), not restarted for ever;
    the next run sends it again."""
    data = pattern_bytes(2 * PART_SIZE, seed=6)
    world = stubbed({"big.bin": data})
    for upload_id in ("upload-1", "upload-2"):
        world.ok("create_multipart_upload", {"UploadId": upload_id})
        world.ok("upload_part", {"ETag": '"e1"'})
        world.error("upload_part", "NoSuchUpload", 404)

    first = world.run()

    assert (first.files_uploaded, first.files_failed, first.fatal) == (0, 1, None)
    record = world.record("big.bin")
    assert record.state is FileState.FAILED and "NoSuchUpload" in (record.error or "")
    world.assert_all_answers_used()

    world.multipart_until_complete("upload-3", parts=2)
    world.ok("complete_multipart_upload", {"ETag": '"abc-2"'})
    second = world.run()

    assert (second.files_uploaded, second.files_failed, second.fatal) == (1, 0, None)
    world.assert_all_answers_used()


@pytest.mark.parametrize(("code", "status"), [("ExpiredToken", 400), ("AccessDenied", 403)])
def test_stubbed_credentials_failing_mid_batch_stop_the_run_and_resume(stubbed: Any, code: str,
                                                                       status: int) -> None:
    """Two PUTs succeed, the third is refused for the credentials: the run stops with a
    DestinationError (no further request: the Stubber holds no more answers), the two stay
    uploaded, nothing else is; the next run sends exactly the three others."""
    files = {f"f{index}.txt": f"file {index}\n".encode() for index in range(5)}
    world = stubbed(files)
    world.ok("put_object", {"ETag": '"1"'})
    world.ok("put_object", {"ETag": '"2"'})
    world.error("put_object", code, status)

    first = world.run()

    assert isinstance(first.fatal, DestinationError) and code in str(first.fatal)
    assert first.files_uploaded == 2 and first.files_failed == 0
    assert world.journal.get_batch(world.batch_id).state is BatchState.FAILED
    states = [record.state for record in world.journal.iter_files(world.batch_id)]
    assert sorted(state.value for state in states) == ["pending"] * 3 + ["uploaded"] * 2
    assert world.journal.integrity_check() == "ok"
    world.assert_all_answers_used()

    for index in range(3):
        world.ok("put_object", {"ETag": f'"{index + 3}"'})
    second = world.run()

    assert (second.files_uploaded, second.files_failed, second.fatal) == (3, 0, None)
    assert all(record.state is FileState.UPLOADED for record in world.journal.iter_files(world.batch_id))
    world.assert_all_answers_used()


# -- credentials and clocks failing in the middle of a real batch -------------------------------


class FromFirst:
    """Matches every request from the first one of ``operation`` on (credentials expire, a
    policy changes, the clock jumps: from then on, every request)."""

    def __init__(self, operation: str) -> None:
        self.operation = operation
        self.started = False

    def __call__(self, head: RequestHead) -> bool:
        self.started = self.started or head.operation == self.operation
        return self.started


@both_transports
@pytest.mark.parametrize(("code", "status", "hint"), [
    ("ExpiredToken", 400, "refresh the credentials"),
    ("AccessDenied", 403, "may not write"),
    ("RequestTimeTooSkewed", 403, "clock"),
])
def test_credentials_or_clock_failing_mid_batch_exit_5_and_the_batch_resumes(
        proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str, tmp_path: Path, journal_path: Path,
        code: str, status: int, hint: str) -> None:
    """From the first UploadPart of a large file on, every request is refused (after some small
    files are stored, while a multipart upload is open): the run stops, exit 5, one line naming
    the cause and what to do; the journal is consistent (each file it calls uploaded has its
    bytes); the same command, once the cause is gone, resumes the same batch and seals it with
    exactly the files and no multipart upload left open."""
    files = {**small_files(20, seed=1, prefix="a/"), "b-big.bin": pattern_bytes(PART_SIZE + 77, seed=7),
             **small_files(20, seed=2, prefix="c/")}
    source = write_tree(tmp_path / "src", files)
    proxy.add_rule(Rule(FromFirst("UploadPart"), Canned(status, code, f"stubbed {code}")))

    first = proxied("upload", "--parallel", "4", "--part-size", "5MiB", str(source))

    assert first.exit_code == ExitCode.DESTINATION, (first.stdout, first.stderr)
    errors = [line for line in first.stderr.splitlines() if line.startswith("archup: error:")]
    assert len(errors) == 1 and code in errors[0] and hint in errors[0], first.stderr
    assert "Traceback" not in first.stderr
    counts = assert_journal_consistent(journal_path, s3, bucket, files)
    assert 1 <= counts.get("uploaded", 0) < len(files), counts
    batch_id = only_batch(journal_path)

    proxy.clear_rules()
    second = proxied("upload", "--json", "--parallel", "4", "--part-size", "5MiB", str(source))

    assert second.exit_code == 0, (second.stdout, second.stderr)
    assert one_json_object(second.stdout)["batch_id"] == batch_id
    assert_sealed_with_exactly(s3, bucket, batch_id, files)


@pytest.mark.parametrize(("status", "code"), [(501, "NotImplemented"), (403, "AccessDenied")],
                         ids=["not-implemented", "access-denied"])
def test_a_server_that_will_not_list_multipart_uploads_still_resumes_and_seals(
        proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str, tmp_path: Path, journal_path: Path,
        status: int, code: str) -> None:
    """s3rver cannot list multipart uploads; an upload-only IAM policy may not. Neither the
    resume's sweep for orphans nor finalize's may then stop the batch: they are skipped (with
    a warning when denied), and the recorded upload is still continued from its parts."""
    files = {**small_files(6, seed=3), "big.bin": pattern_bytes(2 * PART_SIZE + 5, seed=9)}
    source = write_tree(tmp_path / "src", files)
    args = ("upload", "--parallel", "1", "--part-size", "5MiB", str(source))
    crashed = proxied.subprocess(*args, env={"ARCHUP_CRASH_AT": "after-upload-part"})
    assert crashed.exit_code == -9, crashed.stderr
    assert open_uploads(s3, bucket) != []
    proxy.add_rule(Rule(operation_is("ListMultipartUploads"), Canned(status, code, f"stubbed {code}")))

    resumed = proxied(*args[:-1], "--json", str(source))

    assert resumed.exit_code == 0, (resumed.stdout, resumed.stderr)
    assert proxy.snapshot().canned[code] >= 2  # the resume's sweep and finalize's both asked
    assert ("AccessDenied" in resumed.stderr) is (code == "AccessDenied")  # a warning says what was skipped
    assert_sealed_with_exactly(s3, bucket, only_batch(journal_path), files)


def _carries_a_checksum(head: RequestHead) -> bool:
    return any(name.lower().startswith(("x-amz-checksum-", "x-amz-sdk-checksum")) for name, _ in head.headers)


@pytest.mark.parametrize("then", ["finalize", "resume"])
def test_finalize_and_resume_keep_the_checksum_mode_the_batch_began_with(
        proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str, tmp_path: Path, journal_path: Path,
        then: str) -> None:
    """An endpoint that rejects checksum headers, used with --checksum none: 'archup finalize'
    and 'archup resume' (no flag given) must not send one: the journal recorded the mode."""
    files = small_files(5, seed=4)
    source = write_tree(tmp_path / "src", files)
    rule = proxy.add_rule(Rule(_carries_a_checksum, Canned(400, "InvalidRequest", "checksum headers not supported")))
    args = ("upload", "--checksum", "none", "--parallel", "1")
    if then == "finalize":
        first = proxied(*args, "--no-finalize", str(source))
        assert first.exit_code == 0, first.stderr
    else:
        first = proxied.subprocess(*args, str(source), env={"ARCHUP_CRASH_AT": "after-put-object:2"})
        assert first.exit_code == -9, first.stderr
    batch_id = only_batch(journal_path)

    second = proxied(then, batch_id)

    assert second.exit_code == 0, second.stderr
    assert rule.hits == 0
    assert_sealed_with_exactly(s3, bucket, batch_id, files)


CLOCK_SKEWED = Canned(403, "RequestTimeTooSkewed",
                      "The difference between the request time and the current time is too large.",
                      headers=(("Date", "Sat, 01 Jan 2000 00:00:00 GMT"),))


def test_clock_skewed_from_the_start_names_the_clock(proxy: FaultProxy, proxied: Cli, tmp_path: Path,
                                                     journal_path: Path) -> None:
    """Every request refused with RequestTimeTooSkewed (a HEAD, as S3 answers it, with no body):
    exit 5, and the one error line says that the clock is the problem."""
    source = write_tree(tmp_path / "src", {"a.txt": b"alpha\n"})
    proxy.add_rule(Rule(lambda head: True, CLOCK_SKEWED))

    result = proxied("upload", str(source))

    assert result.exit_code == ExitCode.DESTINATION, (result.stdout, result.stderr)
    assert proxy.snapshot().canned["RequestTimeTooSkewed"] >= 1
    assert "clock" in result.stderr, result.stderr


# -- the manifest write answered 412 ---------------------------------------------------------


def manifest_put(head: RequestHead) -> bool:
    return head.operation == "PutObject" and head.path.endswith("/manifest.json") \
        and head.header("If-None-Match") == "*"


PRECONDITION_FAILED = Canned(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold")


def test_manifest_write_lost_then_412_for_archups_own_manifest_is_adopted(
        proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str, tmp_path: Path) -> None:
    """The server stores the manifest but its answer is lost; botocore's retry gets 412 (it
    exists now): it is archup's own, identical manifest, so finalize succeeds, once."""
    files = {"a.txt": b"alpha\n", "b.txt": b"bravo\n"}
    source = write_tree(tmp_path / "src", files)
    rule = proxy.add_rule(Rule(manifest_put, "lost-response", times=1))

    result = proxied("upload", "--json", str(source))

    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert rule.hits == 1 and proxy.snapshot().faults["lost-response"] == 1
    summary = one_json_object(result.stdout)
    assert summary["status"] == "enqueued"
    assert_sealed_with_exactly(s3, bucket, summary["batch_id"], files)
    # The retry really met a 412: the server keeps If-None-Match (a retry could not overwrite).
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        s3.put_object(Bucket=bucket, Key=summary["manifest_key"], Body=b"{}", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_manifest_written_by_someone_else_meanwhile_is_a_conflict(
        proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str, tmp_path: Path, journal_path: Path) -> None:
    """Between finalize's look and its write, another writer puts a different manifest.json:
    the write gets 412, finalize refuses to claim the batch (exit 1, the batch not enqueued)
    and leaves the other manifest untouched."""
    source = write_tree(tmp_path / "src", {"a.txt": b"alpha\n"})
    foreign = b'{"batch_id": "someone else", "entries": {"sha256": "0"}}\n'
    written: list[str] = []

    def concurrent_writer(head: RequestHead) -> bool:
        if not manifest_put(head):
            return False
        key = head.path.split("/", 2)[2]
        s3.put_object(Bucket=bucket, Key=key, Body=foreign)
        written.append(key)
        return True

    proxy.add_rule(Rule(concurrent_writer, PRECONDITION_FAILED, times=1))

    result = proxied("upload", str(source))

    assert result.exit_code == ExitCode.ERROR, (result.stdout, result.stderr)
    assert "already exists and describes other contents" in result.stderr
    assert len(written) == 1 and get_bytes(s3, bucket, written[0]) == foreign
    journal = SQLiteJournal(journal_path)
    try:
        (batch,) = journal.list_batches()
        assert batch.state is not BatchState.ENQUEUED and batch.manifest_key is None
    finally:
        journal.close()


def test_manifest_write_refused_412_with_no_manifest_there_is_not_success(
        proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str, tmp_path: Path, journal_path: Path) -> None:
    """The manifest write is answered 412 but no manifest exists (a conflicting write that did
    not stick, a confused server): finalize must not claim the batch sealed."""
    source = write_tree(tmp_path / "src", {"a.txt": b"alpha\n"})
    rule = proxy.add_rule(Rule(manifest_put, PRECONDITION_FAILED))

    result = proxied("upload", "--json", str(source))

    assert rule.hits >= 1
    batch_id = only_batch(journal_path)
    assert f"staging/{batch_id}/manifest.json" not in list_keys(s3, bucket, f"staging/{batch_id}/")
    assert result.exit_code != 0, (result.stdout, result.stderr)
    journal = SQLiteJournal(journal_path)
    try:
        assert journal.get_batch(batch_id).state is not BatchState.ENQUEUED
    finally:
        journal.close()


# -- the manifest's checksum ---------------------------------------------------------------------


@pytest.mark.parametrize(("checksum", "header"), [
    ("sha256", "x-amz-checksum-sha256"), ("md5", "Content-MD5"), ("crc32", "x-amz-checksum-crc32"), ("none", None)])
def test_the_manifest_put_carries_its_checksum_in_every_mode_but_none(
        checksum: str, header: str | None, moto_endpoint: str, s3: Any, bucket: str, tmp_path: Path,
        journal_path: Path) -> None:
    """The manifest seals the batch: its PUT proves its body as every other PUT does (the proxy
    checks the claim, as S3 does), and --checksum none sends only what the operation requires."""
    source = write_tree(tmp_path / "src", {"a.txt": b"alpha\n", "b.txt": b"bravo\n"})
    heads: list[RequestHead] = []
    with FaultProxy(moto_endpoint, validate=True) as validating:
        validating.add_rule(Rule(lambda head: heads.append(head) is not None, "500"))  # records, never matches
        result = Cli(validating.url, bucket, journal_path)("upload", "--json", "--checksum", checksum, str(source))
    assert result.exit_code == 0, (result.stdout, result.stderr)
    (put,) = [head for head in heads if manifest_put(head)]
    body = get_bytes(s3, bucket, one_json_object(result.stdout)["manifest_key"])
    expected = {
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(body).digest()).decode(),
        "Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode(),
        "x-amz-checksum-crc32": crc32_b64(zlib.crc32(body)),
    }
    for name, value in expected.items():
        assert put.header(name) == (value if name == header else None), name


# -- the retry policy (archup/store/retry.py), on its own -----------------------------------------


class _Refused(Exception):
    pass


def _policy_run(verdicts: list[str], *, attempts: int) -> tuple[list[float], int, BaseException | str]:
    """RetryPolicy.run over attempts that fail with the listed verdicts (then succeed): the
    waits it slept, the attempts made, and what it returned or raised."""
    waits: list[float] = []
    policy = RetryPolicy(attempts=attempts, sleep=waits.append, jitter=lambda: 0.5)
    made = 0

    def send() -> str:
        nonlocal made
        made += 1
        if made <= len(verdicts):
            raise _Refused(f"attempt {made}")
        return "sent"

    def failed(raised: Exception, last: bool) -> tuple[Exception, Verdict]:
        return raised, cast(Verdict, verdicts[made - 1])

    try:
        outcome: BaseException | str = policy.run(send, failed)
    except _Refused as error:
        outcome = error
    return waits, made, outcome


def test_the_retry_policy_backs_off_resends_and_gives_up() -> None:
    # Full jitter (here half of the cap): 1, 2, 4 ... seconds at most, up to 20.
    assert _policy_run(["back-off", "back-off", "back-off"], attempts=5) == ([0.5, 1.0, 2.0], 4, "sent")
    assert [RetryPolicy(jitter=lambda: 1.0).backoff(attempt) for attempt in (1, 5, 6, 9)] == [1.0, 16.0, 20.0, 20.0]
    # A changed body goes again at once; a refusal stops at once.
    assert _policy_run(["resend", "resend"], attempts=3) == ([], 3, "sent")
    waits, made, outcome = _policy_run(["back-off", "fail"], attempts=5)
    assert (waits, made, str(outcome)) == ([0.5], 2, "attempt 2")
    # --retries 2: three attempts in all, the third's error raised.
    waits, made, outcome = _policy_run(["back-off"] * 5, attempts=3)
    assert (waits, made, str(outcome)) == ([0.5, 1.0], 3, "attempt 3")


@pytest.mark.parametrize(("status", "code", "alone", "after_botocore"), [
    (500, "InternalError", "back-off", "fail"),
    (502, "502", "back-off", "fail"),
    (503, "SlowDown", "back-off", "fail"),
    (429, "TooManyRequests", "back-off", "fail"),      # only the status says it is throttling
    (400, "RequestTimeout", "back-off", "fail"),
    (400, "BadDigest", "resend", "resend"),            # botocore never retries a 400
    (400, "XAmzContentSHA256Mismatch", "resend", "resend"),
    (403, "RequestTimeTooSkewed", "fail", "fail"),     # the clock: no attempt can succeed
    (403, "AccessDenied", "fail", "fail"),
    (503, "ExpiredToken", "fail", "fail"),
    (404, "NoSuchKey", "fail", "fail"),
    (412, "PreconditionFailed", "fail", "fail"),
])
def test_the_retry_policy_reads_each_answer_once_for_both_transports(status: int, code: str, alone: str,
                                                                     after_botocore: str) -> None:
    assert RetryPolicy.answer_verdict(status, code) == alone
    assert RetryPolicy.answer_verdict(status, code, client_retried=True) == after_botocore


def test_botocore_is_set_up_from_the_retry_policy() -> None:
    config = StoreConfig(bucket="b", max_attempts=7, retry_mode="adaptive")
    assert RetryPolicy.of(config).botocore_retries() == {"mode": "adaptive", "total_max_attempts": 7}
    store = S3Store(config)
    assert store.client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 7}


def test_one_put_builder_gives_botocore_parameters_and_the_same_http_headers() -> None:
    config = StoreConfig(bucket="b", checksum=ChecksumMode.MD5, storage_class="GLACIER", sse="aws:kms",
                         sse_kms_key_id="key-1", user_metadata=(("owner", "ops"),), tags=(("keep", "10y"),))
    body = b"body"
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    archived = put_args(config, body, metadata={"archup-sha256": "ab"}, content_type="text/plain", archive=True)
    assert archived.boto() == {
        "Metadata": {"owner": "ops", "archup-sha256": "ab"}, "ContentType": "text/plain",
        "ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "key-1", "StorageClass": "GLACIER",
        "Tagging": "keep=10y", "ContentMD5": md5}
    assert archived.headers() == [
        ("x-amz-meta-owner", "ops"), ("x-amz-meta-archup-sha256", "ab"), ("Content-Type", "text/plain"),
        ("x-amz-server-side-encryption", "aws:kms"), ("x-amz-server-side-encryption-aws-kms-key-id", "key-1"),
        ("x-amz-storage-class", "GLACIER"), ("x-amz-tagging", "keep=10y"), ("Content-MD5", md5)]
    # Not a source file's object (the manifest): encryption and the checksum, no archive options.
    manifest = put_args(config, body, content_type="application/json", if_none_match=True)
    assert manifest.boto() == {"Metadata": {}, "ContentType": "application/json", "ServerSideEncryption": "aws:kms",
                               "SSEKMSKeyId": "key-1", "ContentMD5": md5, "IfNoneMatch": "*"}
    sha256 = put_args(replace(config, checksum=ChecksumMode.SHA256), body)
    assert sha256.boto()["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(body).digest()).decode()
    assert ("x-amz-sdk-checksum-algorithm", "SHA256") in sha256.headers()  # botocore writes its own
    none = put_args(replace(config, checksum=ChecksumMode.NONE), body)
    assert not [name for name, _ in none.headers() if "checksum" in name or name == "Content-MD5"]
