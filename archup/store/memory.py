"""An ObjectStore in memory, for unit tests: held to the same contract suite as the S3 store
(``tests/test_store_contract.py``), so a test that passes on it means what it says."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..checksums import b64, crc_b64, crc_of
from ..errors import DestinationError, TransferError
from . import CHECKSUM_REFUSED, ChecksumMode, MultipartChecksum, ObjectInfo, OpenUpload, UploadedPart

MIN_PART_SIZE = 5 * 1024 * 1024  # S3 refuses a non-last part below this at completion


@dataclass
class _Object:
    body: bytes
    etag: str
    metadata: dict[str, str]
    content_type: str | None = None


@dataclass
class _Upload:
    key: str
    checksum: MultipartChecksum
    metadata: dict[str, str]
    content_type: str | None
    parts: dict[int, tuple[bytes, str]] = field(default_factory=dict)  # number -> (body, etag)


def _md5_etag(body: bytes) -> str:
    return f'"{hashlib.md5(body).hexdigest()}"'


class _Reader:
    def __init__(self, stored: _Object, start: int) -> None:
        self.etag = stored.etag
        self.metadata = dict(stored.metadata)
        self._body = stored.body[start:]

    def chunks(self, size: int) -> Iterator[bytes]:
        for offset in range(0, len(self._body), size):
            yield self._body[offset:offset + size]

    def close(self) -> None:
        pass


class MemoryStore:
    """One bucket in memory; thread-safe (one lock)."""

    def __init__(self, bucket: str = "archup-memory", *, exists: bool = True,
                 checksum: ChecksumMode = ChecksumMode.SHA256, full_object_checksum: bool = True,
                 knows_crc64nvme: bool = True) -> None:
        self.bucket = bucket
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
        stored = _Object(bytes(body), _md5_etag(body), dict(metadata or {}), content_type)
        with self._lock:
            self._objects[key] = stored
        return stored.etag

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
        return ObjectInfo(key, len(stored.body), stored.etag, dict(stored.metadata))

    def get_bytes(self, key: str) -> bytes:
        self._require_bucket()
        with self._lock:
            stored = self._objects.get(key)
        if stored is None:
            raise TransferError(f"GetObject {key}: NoSuchKey: The specified key does not exist.", "NoSuchKey")
        return stored.body

    def open_object(self, key: str, *, start: int = 0, if_match: str | None = None) -> _Reader | None:
        self._require_bucket()
        with self._lock:
            stored = self._objects.get(key)
        if stored is None:
            return None
        if if_match is not None and if_match != stored.etag:
            raise TransferError(f"GetObject {key} from byte {start}: PreconditionFailed: At least one of the "
                                "pre-conditions you specified did not hold", "PreconditionFailed")
        return _Reader(stored, start)

    def list_objects(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        self._require_bucket()
        with self._lock:
            found = sorted((key, stored) for key, stored in self._objects.items() if key.startswith(prefix))
        # S3 lists in UTF-8 binary order, which for str keys is code point order.
        for key, stored in sorted(found, key=lambda pair: pair[0].encode("utf-8")):
            if start_after is None or key.encode("utf-8") > start_after.encode("utf-8"):
                yield ObjectInfo(key, len(stored.body), stored.etag, {})

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
            self._uploads[upload_id] = _Upload(key, checksum, dict(metadata or {}), content_type)
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
            self._objects[key] = _Object(body, etag, dict(upload.metadata), upload.content_type)
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
