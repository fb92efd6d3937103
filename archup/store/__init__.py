"""The object store seam: the only thing finalize, verify, batches and the engine see.

:class:`ObjectStore` is the interface; :mod:`archup.store.s3` implements it over boto3
(the one module of archup that imports boto3 or botocore), :mod:`archup.store.memory`
in memory for unit tests, both held to one contract suite
(``tests/test_store_contract.py``). What is not a bucket's behaviour wraps a store
instead of living inside one (:func:`open_store` builds the layers): ``--transport crt``
(:class:`archup.store.crt.CrtPutStore`: PutObject through the CRT's S3 client),
``--bwlimit`` and a test's crash point (:mod:`archup.store.wrappers`). Both transports
retry by one policy (:mod:`archup.store.retry`) and build a PUT's arguments in one place
(:mod:`archup.store.putargs`).

Errors: :class:`DestinationError` when the whole destination is unusable (stop the
batch), :class:`TransferError` when one request failed after its retries (fail the
file, go on); "not there" is None where the method says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

from ..checksums import crc32_b64, crc32_combine

__all__ = ["ARCHIVED_STATE", "CHECKSUM_REFUSED", "DEFAULT_TRANSPORT", "SHA256_METADATA", "ChecksumMode", "Connection",
           "AsyncPuts", "MultipartChecksum", "ObjectInfo", "ObjectReader", "ObjectStore", "OpenUpload", "RestoreAnswer", "S3Store",
           "StoreConfig", "ThawState", "TransportKind", "UploadedPart", "connection_of", "crc32_b64", "crc32_combine",
           "async_puts", "open_store", "thaw_state"]


# The whole file's SHA-256 (hex) in a file object's user metadata (x-amz-meta-archup-sha256):
# every single-PUT object's, and a multipart object's when it was hashed first (--prehash).
SHA256_METADATA = "archup-sha256"
# TransferError.code of a CreateMultipartUpload whose CRC64NVME the endpoint refused.
CHECKSUM_REFUSED = "ChecksumAlgorithmRefused"


class TransportKind(str, Enum):
    """What sends a source file's single-request PutObject (--transport)."""

    CRT = "crt"             # awscrt.s3.S3Client: signing, pooling and HTTP in C (archup.store.crt)
    BOTOCORE = "botocore"   # boto3's client, as every other request


# The measured default (docs/benchmarks.md, "The CRT transport").
DEFAULT_TRANSPORT = TransportKind.CRT


class ChecksumMode(str, Enum):
    """How each request proves its body to the server."""

    SHA256 = "sha256"   # x-amz-checksum-sha256 on every PUT and part (archup computes it)
    CRC32 = "crc32"     # botocore's default (>= 1.36): CRC32 computed by botocore
    MD5 = "md5"         # Content-MD5, for endpoints that reject the newer checksum headers
    NONE = "none"       # only what the operation requires


@dataclass(frozen=True)
class Connection:
    """How archup reaches the endpoint: a run's flags and environment, never recorded with a
    batch (run.Transport is these and the checksum flags; StoreConfig these and a batch's
    destination and archive options)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    max_pool_connections: int = 10
    max_attempts: int = 5        # --retries + 1 (archup.store.retry.RetryPolicy)
    retry_mode: str = "standard"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    bwlimit: int | None = None  # bytes per second, averaged; bursts of up to one request body
    # What sends a source file's PutObject; every other request goes through botocore.
    # --retry-mode adaptive keeps botocore's (its client-side rate limiter has no CRT twin).
    transport: TransportKind = DEFAULT_TRANSPORT


def connection_of(settings: Connection) -> dict[str, Any]:
    """The Connection fields of ``settings`` (a Connection or any subclass), by name."""
    return {item.name: getattr(settings, item.name) for item in fields(Connection)}


@dataclass(frozen=True, kw_only=True)
class StoreConfig(Connection):
    bucket: str
    checksum: ChecksumMode = ChecksumMode.SHA256
    # Archive options: storage class, tags and user metadata go on file objects;
    # server-side encryption on every object archup writes.
    storage_class: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None
    user_metadata: tuple[tuple[str, str], ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    # Multipart uploads keep a full-object CRC (S3's ChecksumType FULL_OBJECT: CRC64NVME, or
    # CRC32 where the endpoint refuses CRC64NVME) instead of a checksum of part checksums;
    # off for endpoints that do not know the header.
    full_object_checksum: bool = True


# TransferError.code of a GET of an object whose bytes are in an archive tier (GLACIER,
# DEEP_ARCHIVE, INTELLIGENT_TIERING's archive tiers) and not restored: S3's own code.
ARCHIVED_STATE = "InvalidObjectState"
# Storage classes whose objects cannot be read until RestoreObject made a temporary copy
# (GLACIER_IR is read like STANDARD).
ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
# INTELLIGENT_TIERING's tiers that need a RestoreObject (x-amz-archive-status).
ARCHIVE_TIERS = frozenset({"ARCHIVE_ACCESS", "DEEP_ARCHIVE_ACCESS"})

# Whether an object's bytes can be read now: "readable", "archived" (a RestoreObject is
# needed), "thawing" (one is under way).
ThawState = Literal["readable", "archived", "thawing"]
# What RestoreObject answered: "started" (202), "ready" (200: a restored copy is there),
# "in-progress" (409 RestoreAlreadyInProgress).
RestoreAnswer = Literal["started", "ready", "in-progress"]


@dataclass(frozen=True)
class Credentials:
    """AWS credentials as of one signature (botocore's chain, frozen), for the CRT's signer."""

    access_key: str
    secret_key: str
    token: str | None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    metadata: dict[str, str]
    # What HEAD says of the object's tier (None where a listing or the server says nothing):
    storage_class: str | None = None    # x-amz-storage-class; None is STANDARD
    restore: str | None = None          # x-amz-restore as sent: 'ongoing-request="true"', or
                                        # 'ongoing-request="false", expiry-date="..."'
    archive_status: str | None = None   # x-amz-archive-status (INTELLIGENT_TIERING):
                                        # ARCHIVE_ACCESS or DEEP_ARCHIVE_ACCESS


def thaw_state(info: ObjectInfo) -> ThawState:
    """Whether the object's bytes can be read now (a GET of an "archived" or "thawing" one
    fails with ARCHIVED_STATE): a restore under way is "thawing", a finished one (a
    temporary copy exists, ``ongoing-request="false"``) "readable"; otherwise an object of
    an archive class or archive tier is "archived", any other "readable"."""
    restore = (info.restore or "").replace(" ", "").lower()
    if 'ongoing-request="true"' in restore:
        return "thawing"
    if 'ongoing-request="false"' in restore:
        return "readable"
    if (info.storage_class or "").upper() in ARCHIVE_CLASSES or (info.archive_status or "").upper() in ARCHIVE_TIERS:
        return "archived"
    return "readable"


@dataclass(frozen=True)
class UploadedPart:
    part_number: int
    etag: str
    checksum: str | None  # the part's x-amz-checksum-* value (base64), if one was sent


@dataclass(frozen=True)
class MultipartChecksum:
    """How one multipart upload proves its bytes: the algorithm of its per-part checksums
    (None: Content-MD5 or nothing) and whether the server keeps a full-object checksum
    (CRC64NVME or CRC32 of the whole object, checked at completion) instead of a checksum
    of checksums."""

    algorithm: str | None
    full_object: bool = False

    def encode(self) -> str:
        """For the journal: ``CRC64NVME/FULL_OBJECT``, ``CRC32/FULL_OBJECT``, ``SHA256/COMPOSITE``, ``NONE``."""
        if self.algorithm is None:
            return "NONE"
        return f"{self.algorithm}/{'FULL_OBJECT' if self.full_object else 'COMPOSITE'}"

    @classmethod
    def decode(cls, text: str) -> MultipartChecksum:
        algorithm, _, kind = text.partition("/")
        return cls(None) if algorithm == "NONE" else cls(algorithm, full_object=kind == "FULL_OBJECT")


@dataclass(frozen=True)
class OpenUpload:
    """What ListParts says of an upload in progress: its parts and how it checksums them."""

    parts: dict[int, tuple[int, str]] = field(default_factory=dict)  # number -> (size, etag)
    checksum: MultipartChecksum = MultipartChecksum(None)


class ObjectReader(Protocol):
    """An object's body being read (a GetObject answer). Read it with :meth:`chunks` or
    :meth:`readinto`, not both."""

    etag: str
    metadata: dict[str, str]
    size: int  # the bytes this answer carries (its Content-Length: the range's, for a range)

    def chunks(self, size: int) -> Iterator[bytes]:
        """The body, ``size`` bytes at a time; a broken read raises TransferError."""

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Fill ``buffer`` from the body (fewer bytes near the end), returning how many; 0 once
        all ``size`` bytes were read. A body cut short or a broken read raises TransferError."""

    def close(self) -> None: ...


class ObjectStore(Protocol):
    """What archup needs of an S3-compatible bucket."""

    bucket: str

    @property
    def checksum_mode(self) -> ChecksumMode:
        """How requests prove their bodies (--checksum)."""

    def check_bucket(self) -> None:
        """Preflight: the bucket exists and these credentials reach it (DestinationError otherwise)."""

    def put_object(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                   metadata: dict[str, str] | None = None, content_type: str | None = None,
                   archive: bool = False) -> str:
        """PUT one object, returning its ETag; ``archive`` marks a source file's object
        (storage class, tags, user metadata)."""

    def put_file(self, key: str, handle: IO[bytes], size: int, *, sha256_digest: bytes,
                 metadata: dict[str, str] | None = None, content_type: str | None = None) -> str:
        """PUT ``size`` bytes read from ``handle`` (from its start), streamed, never held whole
        (a manifest list of a million entries); its checksum as put_object's. The ETag."""

    def put_if_absent(self, key: str, body: bytes, *, content_type: str = "application/json",
                      metadata: dict[str, str] | None = None) -> str | None:
        """PUT with ``If-None-Match: *``; the ETag, or None if the key already exists."""

    def head(self, key: str) -> ObjectInfo | None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def open_object(self, key: str, *, start: int = 0, length: int | None = None,
                    if_match: str | None = None) -> ObjectReader | None:
        """Read an object from byte ``start``, ``length`` bytes of it (fewer at its end; all of
        the rest if None), pinned to an ETag with ``if_match`` (TransferError PreconditionFailed
        if it changed); None if it is not there. A range that starts at or past the end is
        TransferError InvalidRange; an archived object is TransferError ARCHIVED_STATE."""

    def restore_object(self, key: str, *, days: int, tier: str, storage_class: str | None = None) -> RestoreAnswer:
        """Ask for a temporary readable copy of an archived object for ``days`` days, at
        ``tier`` (Expedited, Standard, Bulk). ``storage_class`` is the class head() gave: an
        INTELLIGENT_TIERING object's request carries no Days (it returns to a readable tier).
        An object that is not archived is TransferError ARCHIVED_STATE, as S3 answers."""

    def list_objects(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects under a prefix, in key order (UTF-8 binary order)."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under a prefix; returns how many."""

    def multipart_checksum(self) -> MultipartChecksum:
        """How a new multipart upload checksums its parts."""

    def create_multipart(self, key: str, checksum: MultipartChecksum, *, metadata: dict[str, str] | None = None,
                         content_type: str | None = None) -> str:
        """Start an upload, returning its id. An endpoint that refuses CRC64NVME raises
        TransferError with code CHECKSUM_REFUSED, and multipart_checksum() then says CRC32."""

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes | bytearray,
                    checksum: MultipartChecksum, *, crc: int | None = None) -> UploadedPart:
        """Send one part; ``crc`` is the part's CRC (of ``checksum.algorithm``) if the caller
        already computed it."""

    def complete_multipart(self, key: str, upload_id: str, parts: list[UploadedPart], checksum: MultipartChecksum,
                           *, full_crc: int | None = None, size: int | None = None) -> str:
        """Complete from the listed parts, returning the object's ETag. A full-object upload
        also sends ``full_crc``, the CRC of the whole file as read, which the server checks
        against the parts it holds."""

    def list_parts(self, key: str, upload_id: str) -> OpenUpload | None:
        """The parts the server holds of an upload; None if it no longer knows it."""

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an upload; one the server no longer knows is already gone."""

    def list_multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, upload_id) of every multipart upload in progress under a prefix."""


class AsyncPuts(Protocol):
    """PutObject without a thread waiting on it (``--transport crt``): what a store offers
    through ``async_puts()`` when it can send a small file's PUT and call back when it ends."""

    def put_object_async(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                         metadata: dict[str, str] | None = None, content_type: str | None = None,
                         archive: bool = False, send_filepath: str | None = None,
                         done: Callable[[str | None, Exception | None], None]) -> None:
        """Start put_object(); ``done(etag, None)`` or ``done(None, error)`` (the error
        put_object would raise) is called once when it ended, on another thread.
        ``send_filepath``: a path from which the store may read ``body``'s bytes itself
        instead of from ``body`` (the caller checks the file unchanged afterwards)."""


def async_puts(store: ObjectStore) -> AsyncPuts | None:
    """The store's asynchronous PUTs, if every layer of it sends them (a layer that changes
    put_object and says nothing of them turns them off: its PUTs go through put_object)."""
    offer = getattr(store, "async_puts", None)
    return None if offer is None else offer()  # type: ignore[no-any-return]


def open_store(config: StoreConfig) -> ObjectStore:
    """The S3 store for ``config``, wrapped in what the configuration asks for beyond S3."""
    from .. import crashpoints
    from .s3 import S3Store
    from .wrappers import CrashPointStore, RateLimitedStore

    s3 = S3Store(config)
    store: ObjectStore = s3
    # --retry-mode adaptive keeps botocore's sending: its client-side rate limiter has no CRT twin.
    if config.transport is TransportKind.CRT and config.retry_mode != "adaptive":
        from .crt import CrtPutStore

        store = CrtPutStore(s3)
    if config.bwlimit:
        store = RateLimitedStore(store, config.bwlimit)
    if crashpoints.armed("during-put-object"):
        store = CrashPointStore(store)
    return store


if TYPE_CHECKING:
    from .s3 import S3Store


def __getattr__(name: str) -> Any:
    """S3Store (boto3 behind it) loads when first used: commands that read only the journal,
    such as status, do not pay for it."""
    if name == "S3Store":
        from .s3 import S3Store
        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
