"""Behaviour layered around any ObjectStore instead of flags inside one (restic's backend
wrappers: sema, limiter): a bandwidth limit, and a test's crash point (the CRT transport,
archup.store.crt.CrtPutStore, is one more)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import IO

from .. import crashpoints
from . import (
    AsyncPuts,
    ChecksumMode,
    MultipartChecksum,
    ObjectInfo,
    ObjectReader,
    ObjectStore,
    OpenUpload,
    RestoreAnswer,
    UploadedPart,
    async_puts,
)


class StoreWrapper:
    """Passes every call to the store inside; a wrapper overrides what it changes."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.bucket = inner.bucket

    @property
    def checksum_mode(self) -> ChecksumMode:
        return self.inner.checksum_mode

    def check_bucket(self) -> None:
        self.inner.check_bucket()

    def put_object(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                   metadata: dict[str, str] | None = None, content_type: str | None = None,
                   archive: bool = False) -> str:
        return self.inner.put_object(key, body, sha256_digest=sha256_digest, metadata=metadata,
                                     content_type=content_type, archive=archive)

    def async_puts(self) -> AsyncPuts | None:
        """The inner store's asynchronous PUTs, unless this layer changes put_object: a
        layer that does must offer its own (see RateLimitedStore) or have none."""
        if type(self).put_object is not StoreWrapper.put_object:
            return None
        return async_puts(self.inner)

    def put_file(self, key: str, handle: IO[bytes], size: int, *, sha256_digest: bytes,
                 metadata: dict[str, str] | None = None, content_type: str | None = None) -> str:
        return self.inner.put_file(key, handle, size, sha256_digest=sha256_digest, metadata=metadata,
                                   content_type=content_type)

    def put_if_absent(self, key: str, body: bytes, *, content_type: str = "application/json",
                      metadata: dict[str, str] | None = None) -> str | None:
        return self.inner.put_if_absent(key, body, content_type=content_type, metadata=metadata)

    def head(self, key: str) -> ObjectInfo | None:
        return self.inner.head(key)

    def get_bytes(self, key: str) -> bytes:
        return self.inner.get_bytes(key)

    def open_object(self, key: str, *, start: int = 0, length: int | None = None,
                    if_match: str | None = None) -> ObjectReader | None:
        return self.inner.open_object(key, start=start, length=length, if_match=if_match)

    def restore_object(self, key: str, *, days: int, tier: str, storage_class: str | None = None) -> RestoreAnswer:
        return self.inner.restore_object(key, days=days, tier=tier, storage_class=storage_class)

    def list_objects(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        return self.inner.list_objects(prefix, start_after)

    def delete_prefix(self, prefix: str) -> int:
        return self.inner.delete_prefix(prefix)

    def multipart_checksum(self) -> MultipartChecksum:
        return self.inner.multipart_checksum()

    def create_multipart(self, key: str, checksum: MultipartChecksum, *, metadata: dict[str, str] | None = None,
                         content_type: str | None = None) -> str:
        return self.inner.create_multipart(key, checksum, metadata=metadata, content_type=content_type)

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes | bytearray,
                    checksum: MultipartChecksum, *, crc: int | None = None) -> UploadedPart:
        return self.inner.upload_part(key, upload_id, part_number, body, checksum, crc=crc)

    def complete_multipart(self, key: str, upload_id: str, parts: list[UploadedPart], checksum: MultipartChecksum,
                           *, full_crc: int | None = None, size: int | None = None) -> str:
        return self.inner.complete_multipart(key, upload_id, parts, checksum, full_crc=full_crc, size=size)

    def list_parts(self, key: str, upload_id: str) -> OpenUpload | None:
        return self.inner.list_parts(key, upload_id)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.inner.abort_multipart(key, upload_id)

    def list_multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str]]:
        return self.inner.list_multipart_uploads(prefix)


class RateLimitedStore(StoreWrapper):
    """--bwlimit: one budget of bytes per second shared by every thread, averaged; a
    request body goes out whole once its bytes are due (bursts of one body)."""

    def __init__(self, inner: ObjectStore, bytes_per_second: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(inner)
        self.bytes_per_second = bytes_per_second
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def _wait_for(self, count: int) -> None:
        """Reserve ``count`` bytes of the shared budget; wait until they are due."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + count / self.bytes_per_second
        if start > now:
            self._sleep(start - now)

    def put_object(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                   metadata: dict[str, str] | None = None, content_type: str | None = None,
                   archive: bool = False) -> str:
        self._wait_for(len(body))
        return super().put_object(key, body, sha256_digest=sha256_digest, metadata=metadata,
                                  content_type=content_type, archive=archive)

    def async_puts(self) -> AsyncPuts | None:
        inner = async_puts(self.inner)
        return None if inner is None else _MeteredPuts(inner, self._wait_for)

    def put_file(self, key: str, handle: IO[bytes], size: int, *, sha256_digest: bytes,
                 metadata: dict[str, str] | None = None, content_type: str | None = None) -> str:
        self._wait_for(size)
        return super().put_file(key, handle, size, sha256_digest=sha256_digest, metadata=metadata,
                                content_type=content_type)

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes | bytearray,
                    checksum: MultipartChecksum, *, crc: int | None = None) -> UploadedPart:
        self._wait_for(len(body))
        return super().upload_part(key, upload_id, part_number, body, checksum, crc=crc)

    def open_object(self, key: str, *, start: int = 0, length: int | None = None,
                    if_match: str | None = None) -> ObjectReader | None:
        reader = super().open_object(key, start=start, length=length, if_match=if_match)
        return None if reader is None else _MeteredReader(reader, self._wait_for)


class _MeteredPuts:
    """Asynchronous PUTs under --bwlimit: the caller waits until a body's bytes are due,
    then the PUT starts (the caller is what sends, so the budget paces the sending)."""

    def __init__(self, inner: AsyncPuts, wait_for: Callable[[int], None]) -> None:
        self.inner = inner
        self._wait_for = wait_for

    def put_object_async(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                         metadata: dict[str, str] | None = None, content_type: str | None = None,
                         archive: bool = False, send_filepath: str | None = None,
                         done: Callable[[str | None, Exception | None], None]) -> None:
        self._wait_for(len(body))
        self.inner.put_object_async(key, body, sha256_digest=sha256_digest, metadata=metadata,
                                    content_type=content_type, archive=archive, send_filepath=send_filepath,
                                    done=done)


class _MeteredReader:
    """A download under --bwlimit: each read waits until its bytes are due in the shared budget."""

    def __init__(self, inner: ObjectReader, wait_for: Callable[[int], None]) -> None:
        self.inner = inner
        self._wait_for = wait_for
        self.etag = inner.etag
        self.metadata = inner.metadata
        self.size = inner.size

    def chunks(self, size: int) -> Iterator[bytes]:
        for chunk in self.inner.chunks(size):
            self._wait_for(len(chunk))
            yield chunk

    def readinto(self, buffer: memoryview | bytearray) -> int:
        count = self.inner.readinto(buffer)
        if count:
            self._wait_for(count)
        return count

    def close(self) -> None:
        self.inner.close()


class CrashPointStore(StoreWrapper):
    """The ``during-put-object`` crash point: the process dies while a source file's
    PutObject is on its way. Over a store with a ``before_send`` hook that is as the
    request leaves: inside botocore, signed and about to be sent (the S3 store), or as it
    is handed to the CRT (archup.store.crt.CrtPutStore, which passes the hook to botocore
    too); over any other store, as the call reaches it."""

    POINT = "during-put-object"

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        before_send = getattr(inner, "before_send", None)
        self._inside = before_send is not None
        if before_send is not None:
            before_send("PutObject", self._maybe_crash)

    def async_puts(self) -> AsyncPuts | None:
        """Inside a store with a ``before_send`` hook the crash point is the request's own
        (the CRT calls the hook as an asynchronous PUT leaves too); otherwise none."""
        return async_puts(self.inner) if self._inside else None

    @classmethod
    def _maybe_crash(cls, key_or_url: str) -> None:
        if "/files/" in key_or_url:  # a source file's object, not the marker or the manifest
            crashpoints.crash_point(cls.POINT)

    def put_object(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                   metadata: dict[str, str] | None = None, content_type: str | None = None,
                   archive: bool = False) -> str:
        if not self._inside:
            self._maybe_crash(key)
        return super().put_object(key, body, sha256_digest=sha256_digest, metadata=metadata,
                                  content_type=content_type, archive=archive)
