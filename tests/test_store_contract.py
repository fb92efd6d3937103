"""One contract for every ObjectStore: the S3 store against the moto server (HTTP, the real
boto3 stack) and the in-memory store for unit tests pass the same tests (restic's backend
test suite, River's driver suite)."""

from __future__ import annotations

import hashlib
import os
import socketserver
import threading
import zlib
from collections.abc import Callable

import pytest

from archup.checksums import crc32_combine, crc_b64, crc_combine, crc_of
from archup.errors import DestinationError, TransferError
from archup.store import (
    ARCHIVED_STATE,
    MultipartChecksum,
    ObjectInfo,
    ObjectReader,
    ObjectStore,
    S3Store,
    StoreConfig,
    TransportKind,
    UploadedPart,
    open_store,
    thaw_state,
)
from archup.store.memory import MemoryStore
from archup.store.wrappers import RateLimitedStore

MiB = 1024 * 1024
FULL_CRC32 = MultipartChecksum("CRC32", full_object=True)


@pytest.fixture(params=["s3-crt", "s3-botocore", "memory"])
def make_store(request: pytest.FixtureRequest) -> Callable[..., ObjectStore]:
    """A store over a fresh bucket of the kind under test; ``exists=False``: a bucket that is not
    there; ``storage_class``: the class of source files' objects (--storage-class)."""
    def make(*, exists: bool = True, storage_class: str | None = None) -> ObjectStore:
        if request.param == "memory":
            return MemoryStore(exists=exists, storage_class=storage_class)
        endpoint = request.getfixturevalue("moto_endpoint")
        bucket = request.getfixturevalue("bucket") if exists else "archup-no-such-bucket"
        kind = TransportKind(request.param.removeprefix("s3-"))  # what sends PutObject
        return open_store(StoreConfig(bucket=bucket, endpoint_url=endpoint, region="us-east-1", transport=kind,
                                      storage_class=storage_class))
    return make


@pytest.fixture
def store(make_store: Callable[..., ObjectStore]) -> ObjectStore:
    return make_store()


def _etag(body: bytes) -> str:
    return f'"{hashlib.md5(body).hexdigest()}"'


def test_put_then_head_get_and_read_back(store: ObjectStore) -> None:
    body = b"archived bytes\n" * 100
    etag = store.put_object("p/files/a.txt", body, sha256_digest=hashlib.sha256(body).digest(),
                            metadata={"archup-sha256": hashlib.sha256(body).hexdigest()}, content_type="text/plain",
                            archive=True)
    assert etag == _etag(body)
    info = store.head("p/files/a.txt")
    assert info is not None and (info.size, info.etag) == (len(body), etag)
    assert info.metadata["archup-sha256"] == hashlib.sha256(body).hexdigest()
    assert store.get_bytes("p/files/a.txt") == body
    assert store.head("p/files/absent") is None


def test_open_object_reads_from_a_byte_and_is_pinned_to_an_etag(store: ObjectStore) -> None:
    body = bytes(range(256)) * 40
    etag = store.put_object("k", body, metadata={"m": "v"})
    reader = store.open_object("k")
    assert reader is not None and reader.etag == etag and reader.metadata == {"m": "v"}
    try:
        assert b"".join(reader.chunks(1000)) == body
    finally:
        reader.close()
    tail = store.open_object("k", start=5000, if_match=etag)
    assert tail is not None and b"".join(tail.chunks(4096)) == body[5000:]
    tail.close()
    store.put_object("k", b"replaced")
    with pytest.raises(TransferError) as refused:
        store.open_object("k", start=10, if_match=etag)
    assert refused.value.code == "PreconditionFailed"
    assert store.open_object("absent") is None


def test_put_file_streams_a_body_from_its_start(store: ObjectStore, tmp_path) -> None:
    body = bytes(range(256)) * 9000
    with open(tmp_path / "list.jsonl", "w+b") as handle:
        handle.write(body)  # left at its end: put_file reads from the start
        etag = store.put_file("m/manifest.jsonl", handle, len(body), sha256_digest=hashlib.sha256(body).digest(),
                              metadata={"archup-sha256": hashlib.sha256(body).hexdigest()},
                              content_type="application/jsonl")
    assert etag == _etag(body)
    info = store.head("m/manifest.jsonl")
    assert info is not None and info.size == len(body) and info.metadata["archup-sha256"] == hashlib.sha256(
        body).hexdigest()
    assert store.get_bytes("m/manifest.jsonl") == body


def test_put_if_absent_writes_once(store: ObjectStore) -> None:
    first = store.put_if_absent("m/manifest.json", b'{"a": 1}')
    assert first == _etag(b'{"a": 1}')
    assert store.put_if_absent("m/manifest.json", b'{"a": 2}') is None
    assert store.get_bytes("m/manifest.json") == b'{"a": 1}'


def test_get_of_a_missing_key_is_a_transfer_error(store: ObjectStore) -> None:
    with pytest.raises(TransferError) as missing:
        store.get_bytes("nothing/here")
    assert missing.value.code == "NoSuchKey"


def test_listing_is_in_utf8_order_under_a_prefix_and_after_a_key(store: ObjectStore) -> None:
    keys = ["b/files/z", "b/files/a", "b/files/é", "b/files/a/b", "b/files/~", "other/x"]
    for key in keys:
        store.put_object(key, key.encode())
    listed = [info.key for info in store.list_objects("b/files/")]
    assert listed == sorted((k for k in keys if k.startswith("b/files/")), key=lambda k: k.encode("utf-8"))
    assert [info.key for info in store.list_objects("b/files/", start_after="b/files/a/b")] == listed[2:]
    sizes = {info.key: info.size for info in store.list_objects("b/")}
    assert sizes["b/files/é"] == len("b/files/é".encode())


def test_delete_prefix_deletes_past_one_request(store: ObjectStore) -> None:
    for number in range(1003):  # DeleteObjects takes 1,000 keys a request
        store.put_object(f"d/{number:04d}", b"")
    store.put_object("keep/me", b"x")
    assert store.delete_prefix("d/") == 1003
    assert list(store.list_objects("d/")) == []
    assert store.head("keep/me") is not None


def _parts(store: ObjectStore, key: str, upload_id: str, bodies: list[bytes]) -> list[UploadedPart]:
    return [store.upload_part(key, upload_id, number, body, FULL_CRC32, crc=zlib.crc32(body))
            for number, body in enumerate(bodies, start=1)]


def test_multipart_upload_completes_with_a_full_object_crc32(store: ObjectStore) -> None:
    bodies = [os.urandom(5 * MiB), os.urandom(1000)]
    upload_id = store.create_multipart("mp/files/big", FULL_CRC32, metadata={"archup-part-size": str(5 * MiB)},
                                       content_type="application/octet-stream")
    parts = _parts(store, "mp/files/big", upload_id, bodies)
    listed = store.list_parts("mp/files/big", upload_id)
    assert listed is not None
    assert listed.parts == {1: (5 * MiB, parts[0].etag), 2: (1000, parts[1].etag)}
    # moto's ListParts does not report the checksum kind: archup records it with the upload id.
    assert listed.checksum in (FULL_CRC32, MultipartChecksum(None))
    assert [key for key, uid in store.list_multipart_uploads("mp/") if uid == upload_id] == ["mp/files/big"]
    full = crc32_combine(zlib.crc32(bodies[0]), zlib.crc32(bodies[1]), len(bodies[1]))
    etag = store.complete_multipart("mp/files/big", upload_id, parts, FULL_CRC32, full_crc=full,
                                    size=sum(map(len, bodies)))
    digests = b"".join(hashlib.md5(body).digest() for body in bodies)
    assert etag == f'"{hashlib.md5(digests).hexdigest()}-2"'
    assert store.get_bytes("mp/files/big") == b"".join(bodies)
    info = store.head("mp/files/big")
    assert info is not None and info.metadata == {"archup-part-size": str(5 * MiB)}
    assert store.list_parts("mp/files/big", upload_id) is None  # completed: no longer an upload
    assert list(store.list_multipart_uploads("mp/")) == []


FULL_CRC64 = MultipartChecksum("CRC64NVME", full_object=True)


def test_new_uploads_default_to_a_full_object_crc64nvme_which_completes(store: ObjectStore) -> None:
    assert store.multipart_checksum() == FULL_CRC64  # --checksum sha256, full-object on: the defaults
    bodies = [os.urandom(5 * MiB), os.urandom(777)]
    upload_id = store.create_multipart("mp/files/crc64", FULL_CRC64)
    parts = [store.upload_part("mp/files/crc64", upload_id, number, bytearray(body), FULL_CRC64)
             for number, body in enumerate(bodies, start=1)]
    assert [part.checksum for part in parts] == [crc_b64("CRC64NVME", crc_of("CRC64NVME", body)) for body in bodies]
    full = crc_combine("CRC64NVME", crc_of("CRC64NVME", bodies[0]), crc_of("CRC64NVME", bodies[1]), len(bodies[1]))
    store.complete_multipart("mp/files/crc64", upload_id, parts, FULL_CRC64, full_crc=full, size=sum(map(len, bodies)))
    assert store.get_bytes("mp/files/crc64") == b"".join(bodies)


def test_a_small_non_last_part_is_refused_at_completion(store: ObjectStore) -> None:
    upload_id = store.create_multipart("mp/small", FULL_CRC32)
    bodies = [b"a" * 1000, b"b" * 1000]
    parts = _parts(store, "mp/small", upload_id, bodies)
    with pytest.raises(TransferError) as refused:
        store.complete_multipart("mp/small", upload_id, parts, FULL_CRC32,
                                 full_crc=zlib.crc32(b"".join(bodies)), size=2000)
    assert refused.value.code == "EntityTooSmall"
    store.abort_multipart("mp/small", upload_id)


def test_an_aborted_upload_is_gone_for_every_request(store: ObjectStore) -> None:
    upload_id = store.create_multipart("mp/aborted", FULL_CRC32)
    parts = _parts(store, "mp/aborted", upload_id, [b"x" * 100])
    store.abort_multipart("mp/aborted", upload_id)
    store.abort_multipart("mp/aborted", upload_id)  # already gone: not an error
    assert store.list_parts("mp/aborted", upload_id) is None
    with pytest.raises(TransferError) as lost_part:
        store.upload_part("mp/aborted", upload_id, 2, b"y", FULL_CRC32)
    assert lost_part.value.code in ("NoSuchUpload", "500")  # S3 says NoSuchUpload; moto fails with a 500
    with pytest.raises(TransferError) as lost_completion:
        store.complete_multipart("mp/aborted", upload_id, parts, FULL_CRC32, full_crc=zlib.crc32(b"x" * 100),
                                 size=100)
    assert lost_completion.value.code in ("NoSuchUpload", "500")
    assert list(store.list_multipart_uploads("mp/")) == []


def test_a_missing_bucket_is_a_destination_error(make_store: Callable[..., ObjectStore]) -> None:
    missing = make_store(exists=False)
    with pytest.raises(DestinationError, match="does not exist"):
        missing.check_bucket()
    with pytest.raises(DestinationError):
        missing.put_object("k", b"x")


def test_the_rate_limited_wrapper_passes_everything_through(store: ObjectStore) -> None:
    """On a clock that stands still (the requests take no time), the second 1000-byte body at
    1000 B/s is due exactly one second after the first."""
    waits: list[float] = []
    limited = RateLimitedStore(store, 1000, clock=lambda: 100.0, sleep=waits.append)
    limited.put_object("r/a", b"x" * 1000)
    limited.put_object("r/b", b"x" * 1000)  # due one second after the first
    assert limited.get_bytes("r/a") == b"x" * 1000 and limited.bucket == store.bucket
    assert waits == [1.0]



def _read_all(reader: ObjectReader, buffer_size: int) -> bytes:
    """Every byte of a reader through readinto, into one reused buffer."""
    buffer = bytearray(buffer_size)
    view = memoryview(buffer)
    got = bytearray()
    while count := reader.readinto(view):
        got += view[:count]
    reader.close()
    return bytes(got)


def test_open_object_reads_a_range_into_the_callers_buffer(store: ObjectStore) -> None:
    body = os.urandom(10_000)
    # Sent with its SHA-256 (the default --checksum): a ranged GET must not be checked against it.
    etag = store.put_object("rng/files/a", body, sha256_digest=hashlib.sha256(body).digest(), archive=True)
    whole = store.open_object("rng/files/a")
    assert whole is not None and whole.size == len(body)
    assert _read_all(whole, 4096) == body
    middle = store.open_object("rng/files/a", start=1000, length=3000, if_match=etag)
    assert middle is not None and (middle.size, middle.etag) == (3000, etag)
    assert _read_all(middle, 1024) == body[1000:4000]
    head = store.open_object("rng/files/a", length=1)
    assert head is not None and head.size == 1 and b"".join(head.chunks(100)) == body[:1]
    head.close()
    tail = store.open_object("rng/files/a", start=9_000, length=5_000)  # past the end: what there is
    assert tail is not None and tail.size == 1_000 and _read_all(tail, 4096) == body[9_000:]
    with pytest.raises(TransferError) as beyond:
        store.open_object("rng/files/a", start=len(body), length=10)
    assert beyond.value.code == "InvalidRange"
    store.put_object("rng/files/a", b"changed")
    with pytest.raises(TransferError) as changed:
        store.open_object("rng/files/a", start=10, length=10, if_match=etag)
    assert changed.value.code == "PreconditionFailed"
    assert store.open_object("rng/absent", start=5, length=5) is None


def test_readinto_fills_a_slice_and_returns_zero_at_the_end(store: ObjectStore) -> None:
    body = bytes(range(256)) * 4
    store.put_object("ri/k", body)
    reader = store.open_object("ri/k", start=24, length=1000)
    assert reader is not None and reader.size == 1000
    buffer = bytearray(b"\xff" * 2048)
    filled = 0
    while count := reader.readinto(memoryview(buffer)[filled:filled + 300]):
        filled += count
    assert filled == 1000 and bytes(buffer[:1000]) == body[24:1024] and buffer[1000:] == b"\xff" * 1048
    assert reader.readinto(bytearray(10)) == 0
    reader.close()


def _thaw(store: ObjectStore, key: str) -> None:
    """What hours of waiting do: the memory store finishes the restore under way; moto
    restores at once (its HEAD says ongoing-request="false" straight after RestoreObject)."""
    if isinstance(store, MemoryStore):
        store.finish_thaw(key)


def test_an_archived_object_is_read_after_a_restore(make_store: Callable[..., ObjectStore]) -> None:
    store = make_store(storage_class="GLACIER")
    body = os.urandom(3000)
    store.put_object("gl/files/a", body, sha256_digest=hashlib.sha256(body).digest(), archive=True)
    store.put_if_absent("gl/manifest.json", b"{}")  # not a source file's object: stays readable
    store.put_object("gl/marker", b"m")
    for readable in ("gl/manifest.json", "gl/marker"):
        info = store.head(readable)
        assert info is not None and info.storage_class is None and thaw_state(info) == "readable"
    assert store.get_bytes("gl/manifest.json") == b"{}"

    info = store.head("gl/files/a")
    assert info is not None and (info.storage_class, info.restore) == ("GLACIER", None)
    assert thaw_state(info) == "archived"
    assert [item.storage_class for item in store.list_objects("gl/files/")] == ["GLACIER"]
    with pytest.raises(TransferError) as refused:
        store.open_object("gl/files/a", start=10, length=10)
    assert refused.value.code == ARCHIVED_STATE
    with pytest.raises(TransferError) as refused_whole:
        store.get_bytes("gl/files/a")
    assert refused_whole.value.code == ARCHIVED_STATE

    assert store.restore_object("gl/files/a", days=1, tier="Standard") == "started"
    info = store.head("gl/files/a")
    assert info is not None and info.restore is not None and thaw_state(info) in ("thawing", "readable")
    if thaw_state(info) == "thawing":
        assert store.restore_object("gl/files/a", days=1, tier="Standard") == "in-progress"
        with pytest.raises(TransferError) as still_cold:
            store.open_object("gl/files/a")
        assert still_cold.value.code == ARCHIVED_STATE
    _thaw(store, "gl/files/a")
    info = store.head("gl/files/a")
    assert info is not None and info.storage_class == "GLACIER" and thaw_state(info) == "readable"
    assert 'ongoing-request="false"' in str(info.restore) and "expiry-date=" in str(info.restore)
    reader = store.open_object("gl/files/a", start=100, length=2000)
    assert reader is not None and _read_all(reader, 512) == body[100:2100]
    assert store.restore_object("gl/files/a", days=2, tier="Standard") == "ready"


def test_a_restore_of_an_object_that_is_not_archived_is_refused(make_store: Callable[..., ObjectStore]) -> None:
    store = make_store()
    store.put_object("st/files/a", b"standard", archive=True)
    with pytest.raises(TransferError) as refused:
        store.restore_object("st/files/a", days=1, tier="Bulk")
    assert refused.value.code == ARCHIVED_STATE
    with pytest.raises(TransferError) as missing:
        store.restore_object("st/files/absent", days=1, tier="Bulk")
    assert missing.value.code == "NoSuchKey"


def test_a_multipart_object_takes_the_storage_class(make_store: Callable[..., ObjectStore]) -> None:
    store = make_store(storage_class="DEEP_ARCHIVE")
    upload_id = store.create_multipart("da/files/big", FULL_CRC32)
    parts = _parts(store, "da/files/big", upload_id, [b"x" * 100])
    store.complete_multipart("da/files/big", upload_id, parts, FULL_CRC32, full_crc=zlib.crc32(b"x" * 100),
                             size=100)
    info = store.head("da/files/big")
    assert info is not None and info.storage_class == "DEEP_ARCHIVE" and thaw_state(info) == "archived"


@pytest.mark.parametrize(("storage_class", "restore", "archive_status", "state"), [
    (None, None, None, "readable"),
    ("STANDARD_IA", None, None, "readable"),
    ("GLACIER_IR", None, None, "readable"),
    ("GLACIER", None, None, "archived"),
    ("DEEP_ARCHIVE", None, None, "archived"),
    ("GLACIER", 'ongoing-request="true"', None, "thawing"),
    ("DEEP_ARCHIVE", 'ongoing-request="false", expiry-date="Fri, 21 Dec 2012 00:00:00 GMT"', None, "readable"),
    ("INTELLIGENT_TIERING", None, None, "readable"),
    ("INTELLIGENT_TIERING", None, "ARCHIVE_ACCESS", "archived"),
    ("INTELLIGENT_TIERING", None, "DEEP_ARCHIVE_ACCESS", "archived"),
    ("INTELLIGENT_TIERING", 'ongoing-request="true"', "DEEP_ARCHIVE_ACCESS", "thawing"),
    ("INTELLIGENT_TIERING", 'ongoing-request="false", expiry-date="x"', "ARCHIVE_ACCESS", "readable"),
])
def test_thaw_state(storage_class: str | None, restore: str | None, archive_status: str | None, state: str) -> None:
    info = ObjectInfo("k", 1, '"e"', {}, storage_class=storage_class, restore=restore, archive_status=archive_status)
    assert thaw_state(info) == state


def test_memory_store_restores_an_intelligent_tiering_archive_tier() -> None:
    store = MemoryStore(storage_class="INTELLIGENT_TIERING")
    store.put_object("it/files/a", b"tiered", archive=True)
    with pytest.raises(TransferError):  # in a frequent-access tier: nothing to restore
        store.restore_object("it/files/a", days=1, tier="Bulk", storage_class="INTELLIGENT_TIERING")
    store.archive("it/files/a", storage_class="INTELLIGENT_TIERING", archive_status="ARCHIVE_ACCESS")
    info = store.head("it/files/a")
    assert info is not None and info.archive_status == "ARCHIVE_ACCESS" and thaw_state(info) == "archived"
    assert store.restore_object("it/files/a", days=1, tier="Bulk", storage_class="INTELLIGENT_TIERING") == "started"
    store.finish_thaw("it/files/a")
    info = store.head("it/files/a")
    assert info is not None and info.archive_status is None and thaw_state(info) == "readable"
    assert store.get_bytes("it/files/a") == b"tiered"


def test_s3_restore_request_and_its_answers(moto_endpoint: str, bucket: str) -> None:
    """What RestoreObject sends (Days, except for INTELLIGENT_TIERING's archive tiers) and how each
    answer reads; 409 RestoreAlreadyInProgress is an answer moto never gives."""
    from botocore.stub import Stubber

    store = S3Store(StoreConfig(bucket=bucket, endpoint_url=moto_endpoint, region="us-east-1"))
    with Stubber(store.client) as stub:
        for status in (202, 200):
            stub.add_response("restore_object", {"ResponseMetadata": {"HTTPStatusCode": status}}, {
                "Bucket": bucket, "Key": "k",
                "RestoreRequest": {"Days": 3, "GlacierJobParameters": {"Tier": "Bulk"}}})
        stub.add_response("restore_object", {"ResponseMetadata": {"HTTPStatusCode": 202}}, {
            "Bucket": bucket, "Key": "k", "RestoreRequest": {"GlacierJobParameters": {"Tier": "Standard"}}})
        stub.add_client_error("restore_object", "RestoreAlreadyInProgress", "Object restore is already in progress",
                              409)
        stub.add_client_error("restore_object", "GlacierExpeditedRetrievalNotAvailable",
                              "Glacier expedited retrievals are currently not available", 503)
        assert store.restore_object("k", days=3, tier="Bulk") == "started"
        assert store.restore_object("k", days=3, tier="Bulk", storage_class="GLACIER") == "ready"
        assert store.restore_object("k", days=3, tier="Standard", storage_class="INTELLIGENT_TIERING") == "started"
        assert store.restore_object("k", days=3, tier="Bulk") == "in-progress"
        with pytest.raises(TransferError) as refused:
            store.restore_object("k", days=3, tier="Expedited")
        assert refused.value.code == "GlacierExpeditedRetrievalNotAvailable"
        stub.assert_no_pending_responses()


class _ShortBodyServer(socketserver.ThreadingTCPServer):
    """Answers every GET with a Content-Length of 100 and 40 bytes of body, then closes."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"e\"\r\n"
                                 b"Content-Type: application/octet-stream\r\n\r\n" + b"x" * 40)
                self.wfile.flush()
        super().__init__(("127.0.0.1", 0), Handler)


@pytest.mark.parametrize("read", ["readinto", "chunks"])
def test_s3_a_body_cut_short_is_a_transfer_error(read: str) -> None:
    server = _ShortBodyServer()
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        store = S3Store(StoreConfig(bucket="short-body", endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
                                    region="us-east-1", max_attempts=1))
        reader = store.open_object("k")
        assert reader is not None and reader.size == 100
        with pytest.raises(TransferError):
            if read == "readinto":
                _read_all(reader, 64)
            else:
                b"".join(reader.chunks(64))
        reader.close()
    finally:
        server.shutdown()
        server.server_close()
        serving.join()
