"""An ObjectStore in memory, for unit tests: held to the same contract suite as the S3 store
(``tests/test_store_contract.py``), so a test that passes on it means what it says."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from ..checksums import b64, crc_b64, crc_of
from ..errors import DestinationError, TransferError
from . import (
    ARCHIVE_CLASSES,
    ARCHIVE_TIERS,
    ARCHIVED_STATE,
    CHECKSUM_REFUSED,
    ChecksumMode,
    MultipartChecksum,
    ObjectInfo,
    OpenUpload,
    RestoreAnswer,
    UploadedPart,
    thaw_state,
)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3 refuses a non-last part below this at completion


@dataclass
class _Object:
    body: bytes
    etag: str
    metadata: dict[str, str]
    content_type: str | None = None
    storage_class: str | None = None   # None: STANDARD
    restore: str | None = None         # x-amz-restore, as S3 would send it
    archive_status: str | None = None  # INTELLIGENT_TIERING's archive tier

    def info(self, key: str) -> ObjectInfo:
        return ObjectInfo(key, len(self.body), self.etag, dict(self.metadata), storage_class=self.storage_class,
                          restore=self.restore, archive_status=self.archive_status)


@dataclass
class _Upload:
    key: str
    checksum: MultipartChecksum
    metadata: dict[str, str]
    content_type: str | None
    storage_class: str | None
    parts: dict[int, tuple[bytes, str]] = field(default_factory=dict)  # number -> (body, etag)


def _md5_etag(body: bytes) -> str:
    return f'"{hashlib.md5(body).hexdigest()}"'


class _Reader:
    def __init__(self, stored: _Object, start: int, length: int | None) -> None:
        self.etag = stored.etag
        self.metadata = dict(stored.metadata)
        self._body = memoryview(stored.body)[start:None if length is None else start + length]
        self.size = len(self._body)
        self._offset = 0

    def chunks(self, size: int) -> Iterator[bytes]:
        for offset in range(0, len(self._body), size):
            yield bytes(self._body[offset:offset + size])

    def readinto(self, buffer: memoryview | bytearray) -> int:
        count = min(len(buffer), self.size - self._offset)
        buffer[:count] = self._body[self._offset:self._offset + count]
        self._offset += count
        return count

    def close(self) -> None:
        pass


class MemoryStore:
    """One bucket in memory; thread-safe (one lock)."""

    def __init__(self, bucket: str = "archup-memory", *, exists: bool = True,
                 checksum: ChecksumMode = ChecksumMode.SHA256, full_object_checksum: bool = True,
                 knows_crc64nvme: bool = True, storage_class: str | None = None) -> None:
        self.bucket = bucket
        self.storage_class = storage_class  # of a source file's object (archive=True), as StoreConfig's
        self.exists = exists
        self._checksum = checksum
        self._full_object = full_object_checksum
        self._knows_crc64nvme = knows_crc64nvme  # False: CreateMultipartUpload refuses CRC64NVME
        self._crc64nvme_refused = False
        self._lock = threading.Lock()
        self._objects: dict[str, _Object] = {}
        self._uploads: dict[str, _Upload] = {}
        self._ids = itertools.count(1)

    @property
    def checksum_mode(self) -> ChecksumMode:
        return self._checksum

    def _require_bucket(self) -> None:
        if not self.exists:
            raise DestinationError(f"bucket {self.bucket!r} does not exist; create it or fix --bucket", "NoSuchBucket")

    def check_bucket(self) -> None:
        self._require_bucket()

    def put_object(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                   metadata: dict[str, str] | None = None, content_type: str | None = None,
                   archive: bool = False) -> str:
        self._require_bucket()
        if sha256_digest is not None and hashlib.sha256(body).digest() != sha256_digest:
            # What S3 answers to a checksum that does not match the body it received.
            raise TransferError(f"PutObject {key}: BadDigest: the SHA-256 you specified did not match the body",
                                "BadDigest")
        stored = _Object(bytes(body), _md5_etag(body), dict(metadata or {}), content_type,
                         self._class_of(archive))
        with self._lock:
            self._objects[key] = stored
        return stored.etag

    def put_file(self, key: str, handle: IO[bytes], size: int, *, sha256_digest: bytes,
                 metadata: dict[str, str] | None = None, content_type: str | None = None) -> str:
        handle.seek(0)
        body = handle.read(size)
        if len(body) != size:
            raise TransferError(f"PutObject {key}: the file gave {len(body)} of {size} bytes", "IncompleteBody")
        return self.put_object(key, body, sha256_digest=sha256_digest, metadata=metadata, content_type=content_type)

    def put_if_absent(self, key: str, body: bytes, *, content_type: str = "application/json",
                      metadata: dict[str, str] | None = None) -> str | None:
        self._require_bucket()
        with self._lock:
            if key in self._objects:
                return None
            stored = _Object(bytes(body), _md5_etag(body), dict(metadata or {}), content_type)
            self._objects[key] = stored
        return stored.etag

    def head(self, key: str) -> ObjectInfo | None:
        self._require_bucket()
        with self._lock:
            stored = self._objects.get(key)
        if stored is None:
            return None
        return stored.info(key)

    def get_bytes(self, key: str) -> bytes:
        self._require_bucket()
        with self._lock:
            stored = self._objects.get(key)
        if stored is None:
            raise TransferError(f"GetObject {key}: NoSuchKey: The specified key does not exist.", "NoSuchKey")
        self._require_readable(f"GetObject {key}", key, stored)
        return stored.body

    def open_object(self, key: str, *, start: int = 0, length: int | None = None,
                    if_match: str | None = None) -> _Reader | None:
        self._require_bucket()
        if length is not None and length <= 0:
            raise ValueError(f"GetObject {key}: a range of {length} bytes")
        with self._lock:
            stored = self._objects.get(key)
        if stored is None:
            return None
        what = f"GetObject {key}" + (f" bytes {start}-{start + length - 1}" if length is not None
                                     else f" from byte {start}" if start else "")
        self._require_readable(what, key, stored)
        if if_match is not None and if_match != stored.etag:
            raise TransferError(f"{what}: PreconditionFailed: At least one of the "
                                "pre-conditions you specified did not hold", "PreconditionFailed")
        if (start or length is not None) and start >= len(stored.body):
            raise TransferError(f"{what}: InvalidRange: The requested range is not satisfiable", "InvalidRange")
        return _Reader(stored, start, length)

    # -- archive tiers --------------------------------------------------------

    def _class_of(self, archive: bool) -> str | None:
        return self.storage_class if archive and self.storage_class != "STANDARD" else None

    @staticmethod
    def _require_readable(what: str, key: str, stored: _Object) -> None:
        if thaw_state(stored.info(key)) != "readable":
            raise TransferError(f"{what}: {ARCHIVED_STATE}: The operation is not valid for the object's storage "
                                "class", ARCHIVED_STATE)

    def restore_object(self, key: str, *, days: int, tier: str, storage_class: str | None = None) -> RestoreAnswer:
        self._require_bucket()
        what = f"RestoreObject {key}"
        with self._lock:
            stored = self._objects.get(key)
            if stored is None:
                raise TransferError(f"{what}: NoSuchKey: The specified key does not exist.", "NoSuchKey")
            if stored.restore is not None:
                if thaw_state(stored.info(key)) == "thawing":
                    return "in-progress"
                return "ready"  # S3 moves the copy's expiry
            if stored.storage_class not in ARCHIVE_CLASSES and stored.archive_status not in ARCHIVE_TIERS:
                raise TransferError(f"{what}: {ARCHIVED_STATE}: The operation is not valid for the object's "
                                    "storage class", ARCHIVED_STATE)
            stored.restore = 'ongoing-request="true"'
        return "started"

    def archive(self, key: str, *, storage_class: str = "GLACIER", archive_status: str | None = None) -> None:
        """For tests: the object moves to an archive class (or INTELLIGENT_TIERING's archive
        tier, ``archive_status``), as a lifecycle rule or S3's tiering would move it."""
        with self._lock:
            stored = self._objects[key]
            stored.storage_class, stored.archive_status, stored.restore = storage_class, archive_status, None

    def finish_thaw(self, key: str, *, expiry: str = "Fri, 01 Jan 2100 00:00:00 GMT") -> None:
        """For tests: the restore under way is done, as S3 says it hours later. An
        INTELLIGENT_TIERING object is back in a readable tier; another keeps its class and
        has a temporary copy until ``expiry``."""
        with self._lock:
            stored = self._objects[key]
            assert stored.restore is not None, f"no restore of {key} under way"
            if stored.archive_status is not None:
                stored.archive_status = None
            stored.restore = f'ongoing-request="false", expiry-date="{expiry}"'

    def list_objects(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        self._require_bucket()
        with self._lock:
            found = sorted((key, stored) for key, stored in self._objects.items() if key.startswith(prefix))
        # S3 lists in UTF-8 binary order, which for str keys is code point order.
        for key, stored in sorted(found, key=lambda pair: pair[0].encode("utf-8")):
            if start_after is None or key.encode("utf-8") > start_after.encode("utf-8"):
                yield ObjectInfo(key, len(stored.body), stored.etag, {}, storage_class=stored.storage_class)

    def delete_prefix(self, prefix: str) -> int:
        self._require_bucket()
        with self._lock:
            doomed = [key for key in self._objects if key.startswith(prefix)]
            for key in doomed:
                del self._objects[key]
        return len(doomed)

    # -- multipart ----------------------------------------------------------

    def multipart_checksum(self) -> MultipartChecksum:
        if self._checksum in (ChecksumMode.SHA256, ChecksumMode.CRC32) and self._full_object:
            return MultipartChecksum("CRC32" if self._crc64nvme_refused else "CRC64NVME", full_object=True)
        if self._checksum is ChecksumMode.SHA256:
            return MultipartChecksum("SHA256")
        return MultipartChecksum(None)

    def create_multipart(self, key: str, checksum: MultipartChecksum, *, metadata: dict[str, str] | None = None,
                         content_type: str | None = None) -> str:
        self._require_bucket()
        if checksum.algorithm == "CRC64NVME" and not self._knows_crc64nvme:
            self._crc64nvme_refused = True
            raise TransferError(f"CreateMultipartUpload {key}: InvalidRequest for checksum CRC64NVME; "
                                "CRC32 from now on", CHECKSUM_REFUSED)
        upload_id = f"memory-upload-{next(self._ids)}"
        with self._lock:
            self._uploads[upload_id] = _Upload(key, checksum, dict(metadata or {}), content_type,
                                               self._class_of(True))
        return upload_id

    def _upload(self, what: str, key: str, upload_id: str) -> _Upload:
        upload = self._uploads.get(upload_id)
        if upload is None or upload.key != key:
            raise TransferError(f"{what}: NoSuchUpload: The specified upload does not exist.", "NoSuchUpload")
        return upload

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes | bytearray,
                    checksum: MultipartChecksum, *, crc: int | None = None) -> UploadedPart:
        self._require_bucket()
        body = bytes(body)  # the caller's buffer is reused once this returns
        value: str | None = None
        if checksum.algorithm in ("CRC32", "CRC64NVME"):
            value = crc_b64(checksum.algorithm, crc_of(checksum.algorithm, body) if crc is None else crc)
        elif checksum.algorithm == "SHA256":
            value = b64(hashlib.sha256(body).digest())
        etag = _md5_etag(body)
        with self._lock:
            self._upload(f"UploadPart {key} part {part_number}", key, upload_id).parts[part_number] = (body, etag)
        return UploadedPart(part_number, etag, value)

    def complete_multipart(self, key: str, upload_id: str, parts: list[UploadedPart], checksum: MultipartChecksum,
                           *, full_crc: int | None = None, size: int | None = None) -> str:
        self._require_bucket()
        what = f"CompleteMultipartUpload {key}"
        with self._lock:
            upload = self._upload(what, key, upload_id)
            bodies: list[bytes] = []
            for index, part in enumerate(parts):
                held = upload.parts.get(part.part_number)
                if held is None or held[1] != part.etag:
                    raise TransferError(f"{what}: InvalidPart: part {part.part_number} is not there", "InvalidPart")
                if index < len(parts) - 1 and len(held[0]) < MIN_PART_SIZE:
                    raise TransferError(f"{what}: EntityTooSmall: a part is smaller than the minimum allowed size",
                                        "EntityTooSmall")
                bodies.append(held[0])
            body = b"".join(bodies)
            if (checksum.full_object and checksum.algorithm and full_crc is not None
                    and crc_of(checksum.algorithm, body) != full_crc):
                raise TransferError(f"{what}: BadDigest: the full-object {checksum.algorithm} does not match "
                                    "the parts", "BadDigest")
            digests = b"".join(bytes.fromhex(etag.strip('"')) for _, etag in (upload.parts[p.part_number]
                                                                                for p in parts))
            etag = f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'
            self._objects[key] = _Object(body, etag, dict(upload.metadata), upload.content_type,
                                         upload.storage_class)
            del self._uploads[upload_id]
        return etag

    def list_parts(self, key: str, upload_id: str) -> OpenUpload | None:
        self._require_bucket()
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None or upload.key != key:
                return None
            parts = {number: (len(body), etag) for number, (body, etag) in sorted(upload.parts.items())}
            return OpenUpload(parts, upload.checksum)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._require_bucket()
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is not None and upload.key == key:
                del self._uploads[upload_id]

    def list_multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str]]:
        self._require_bucket()
        with self._lock:
            found = sorted((upload.key, upload_id) for upload_id, upload in self._uploads.items()
                           if upload.key.startswith(prefix))
        yield from found
