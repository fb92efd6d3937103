"""One contract for every ObjectStore: the S3 store against the moto server (HTTP, the real
boto3 stack) and the in-memory store for unit tests pass the same tests (restic's backend
test suite, River's driver suite)."""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable

import pytest

from archup.checksums import crc32_combine, crc_b64, crc_combine, crc_of
from archup.errors import DestinationError, TransferError
from archup.store import MultipartChecksum, ObjectStore, S3Store, StoreConfig, TransportKind, UploadedPart
from archup.store.memory import MemoryStore
from archup.store.wrappers import RateLimitedStore

MiB = 1024 * 1024
FULL_CRC32 = MultipartChecksum("CRC32", full_object=True)


@pytest.fixture(params=["s3-crt", "s3-botocore", "memory"])
def make_store(request: pytest.FixtureRequest) -> Callable[..., ObjectStore]:
    """A store over a fresh bucket of the kind under test; ``exists=False``: a bucket that is not there."""
    def make(*, exists: bool = True) -> ObjectStore:
        if request.param == "memory":
            return MemoryStore(exists=exists)
        endpoint = request.getfixturevalue("moto_endpoint")
        bucket = request.getfixturevalue("bucket") if exists else "archup-no-such-bucket"
        kind = TransportKind(request.param.removeprefix("s3-"))  # what sends PutObject
        return S3Store(StoreConfig(bucket=bucket, endpoint_url=endpoint, region="us-east-1", transport=kind))
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

