"""The S3 store: the ObjectStore over one boto3 client shared by every worker thread
(``--transport crt`` wraps it in :class:`archup.store.crt.CrtPutStore`, which sends
PutObject through the CRT and asks this store where a key's PUT goes and for credentials).

The only module of archup that imports boto3 or botocore. Every request goes
through :func:`_request`, which turns botocore's exceptions into archup's named
errors (:func:`translate`) and a listed "not there" answer into None, and sends a
body again as the retry policy says (:mod:`archup.store.retry`).
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import os
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import IO, Any, TypeVar

# botocore signs with the CRT's signer whenever awscrt is importable (archup needs awscrt for
# CRC64NVME). That signer costs 3.7 ms of CPU per 8 MiB part even with an unsigned payload
# (botocore's own: 1.1 ms; docs/benchmarks.md), so botocore's own signer is chosen on
# purpose, before botocore is first imported. BOTO_DISABLE_CRT=false in the environment
# keeps the CRT's.
os.environ.setdefault("BOTO_DISABLE_CRT", "true")

import botocore.exceptions  # noqa: E402  (after the signer choice above)

from ..checksums import b64, crc_b64, crc_of  # noqa: E402
from ..errors import DestinationError, TransferError  # noqa: E402
from ..logs import register_secrets  # noqa: E402
from . import (  # noqa: E402
    CHECKSUM_REFUSED,
    ChecksumMode,
    Credentials,
    MultipartChecksum,
    ObjectInfo,
    OpenUpload,
    RestoreAnswer,
    StoreConfig,
    UploadedPart,
)
from .answers import HINTS, answer_error  # noqa: E402
from .putargs import PutArgs, file_checksum_fields, object_args, put_args  # noqa: E402
from .retry import RetryPolicy, Verdict  # noqa: E402


def _error_code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", "")) or str(
        error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


MAX_CLOCK_SKEW = 15 * 60  # seconds: S3 refuses a request signed further from its own clock


def _clock_skew(error: botocore.exceptions.ClientError) -> float | None:
    """Server clock minus ours, in seconds, from the answer's Date header (a HEAD's 403 has
    no body to say RequestTimeTooSkewed); None without a usable Date."""
    date = error.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    try:
        server = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    if server.tzinfo is None:
        return None
    return server.timestamp() - time.time()


def translate(error: Exception, what: str) -> Exception:
    """Map a botocore exception to DestinationError (fatal) or TransferError (this request)."""
    if isinstance(error, botocore.exceptions.ClientError):
        code = _error_code(error)
        return answer_error(what, code, error.response.get("Error", {}).get("Message") or code)
    if isinstance(error, (botocore.exceptions.NoCredentialsError,
                          botocore.exceptions.PartialCredentialsError)):
        return DestinationError(f"{what}: no usable credentials ({error}); set a profile or AWS_* variables")
    if isinstance(error, botocore.exceptions.ProfileNotFound):
        return DestinationError(f"{what}: {error}")
    if isinstance(error, botocore.exceptions.EndpointConnectionError):
        return DestinationError(f"{what}: cannot reach the endpoint ({error}); check --endpoint-url and the network")
    if isinstance(error, botocore.exceptions.BotoCoreError):
        return TransferError(f"{what}: {error}", type(error).__name__)
    return error


# How endpoints that do not know CRC64NVME answer a CreateMultipartUpload asking for it.
_ALGORITHM_REFUSED = ("InvalidRequest", "InvalidArgument", "NotImplemented", "UnsupportedArgument", "400", "501")
_ABSENT = ("404", "NoSuchKey", "NotFound")      # HEAD / GET of a key that is not there
_NO_UPLOAD = ("NoSuchUpload", "404")            # an upload id the server no longer knows
_EXISTS = ("PreconditionFailed", "412", "ConditionalRequestConflict")  # If-None-Match: * on a present key

T = TypeVar("T")

# A request without a body has nothing to send again: one attempt (botocore's own retries within).
_ONCE = RetryPolicy(attempts=1)


def _request(what: str, send: Callable[[], T], *, absent: Collection[str] = (),
             retry: RetryPolicy = _ONCE) -> T | None:
    """Send one request: botocore's errors become archup's (:func:`translate`), and an error
    code listed in ``absent`` becomes None (the thing asked about is not there). botocore
    has already retried what it retries; a request with a body is sent again as ``retry``
    says of what it does not (a body that arrived changed)."""
    def failed(error: Exception, last: bool) -> tuple[Exception, Verdict]:
        if isinstance(error, botocore.exceptions.ClientError):
            code = _error_code(error)
            if absent and code in absent:
                raise _Absent() from None
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return translate(error, what), retry.answer_verdict(status, code, client_retried=True)
        return translate(error, what), "fail"

    try:
        return retry.run(send, failed)
    except _Absent:
        return None


class _Absent(Exception):
    """The answer said the thing asked about is not there (an ``absent`` code)."""


def _sent(what: str, send: Callable[[], T], *, retry: RetryPolicy = _ONCE) -> T:
    """:func:`_request` for a request whose every error is an error."""
    answer = _request(what, send, retry=retry)
    assert answer is not None
    return answer


def _content_md5(request: Any, **kwargs: Any) -> None:
    """CompleteMultipartUpload's part list is a body without a checksum of its own: give it a
    Content-MD5 (signed with the other headers), so the server refuses it changed on the way."""
    body = request.body
    if isinstance(body, str):
        body = body.encode("utf-8")
    if isinstance(body, (bytes, bytearray)) and body and "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = b64(hashlib.md5(body).digest())


# A key no one writes: botocore builds a PutObject of it to say where a key's PUT goes.
ENDPOINT_PROBE = "archup-endpoint-probe"


class _NoBody:
    """The raw body of an answer made here (the endpoint probe's)."""

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield b""


class _Body:
    """A GetObject body, read in chunks or into the caller's buffers; a broken read or a
    body cut short is a TransferError."""

    def __init__(self, key: str, answer: dict[str, Any], what: str) -> None:
        self.key = key
        self.etag = str(answer.get("ETag", ""))
        self.metadata = dict(answer.get("Metadata", {}))
        self.size = int(answer.get("ContentLength", 0))
        self._what = what
        self._stream = answer["Body"]
        self._left = self.size
        # The http.client answer under urllib3's: readinto() fills the caller's buffer
        # straight from the socket's, where urllib3's readinto reads into a new bytes
        # object (which http.client fills through a bytearray of its own) and copies that.
        raw = getattr(self._stream, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        self._raw = raw if isinstance(fp, http.client.HTTPResponse) and not getattr(raw, "_has_decoded_content",
                                                                                      False) else None

    def chunks(self, size: int) -> Iterator[bytes]:
        try:
            yield from self._stream.iter_chunks(size)
        except (botocore.exceptions.BotoCoreError, OSError) as error:
            raise translate(error, self._what) from None

    def readinto(self, buffer: memoryview | bytearray) -> int:
        if self._left <= 0 or not len(buffer):
            return 0
        view = memoryview(buffer)
        if len(view) > self._left:
            view = view[:self._left]
        try:
            if self._raw is not None:
                got = self._raw._fp.readinto(view)
            else:
                got = self._stream.readinto(view)
        except (botocore.exceptions.BotoCoreError, OSError, http.client.HTTPException) as error:
            raise TransferError(f"{self._what}: {type(error).__name__}: {error}", type(error).__name__) from None
        if not got:
            raise TransferError(f"{self._what}: the body ended after {self.size - self._left} of {self.size} bytes",
                                "IncompleteRead")
        self._left -= got
        if self._left == 0 and self._raw is not None:
            # Read to its end behind urllib3's back: give the connection back to the pool
            # (what urllib3 does itself when its own read reaches the end).
            self._raw.release_conn()
        return got

    def close(self) -> None:
        self._stream.close()


class S3Store:
    """One boto3 client shared by every worker thread (boto3 clients are thread-safe)."""

    def __init__(self, config: StoreConfig) -> None:
        # boto3 is imported here, not at module level: commands that only read the
        # journal (status, list) start without paying for it.
        import boto3
        import botocore.config
        import botocore.session

        self.config = config
        self.bucket = config.bucket
        self.retry = RetryPolicy.of(config)
        self._crc64nvme_refused = False  # the endpoint refused a CRC64NVME upload: CRC32 from then on
        checksum_calculation = "when_supported" if config.checksum is ChecksumMode.CRC32 else "when_required"
        client_config = botocore.config.Config(
            max_pool_connections=config.max_pool_connections,
            retries=self.retry.botocore_retries(),
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            request_checksum_calculation=checksum_calculation,
            response_checksum_validation="when_required",
            # Every body archup sends carries its own checksum header (x-amz-checksum-* or
            # Content-MD5), which is signed: hashing the body once more with SHA-256 for the
            # signature (what botocore does on http) would read every byte a third time.
            # docs/design.md says what covers a body's integrity on http and on https.
            s3={"payload_signing_enabled": False} if config.checksum is not ChecksumMode.NONE else None,
        )
        try:
            core = botocore.session.get_session()
            # archup never reads a response's timestamps: leave them as text instead of
            # parsing every LastModified of every listing (aws-cli does the same).
            core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
            session = boto3.session.Session(botocore_session=core, profile_name=config.profile,
                                            region_name=config.region)
            self.client: Any = session.client("s3", endpoint_url=config.endpoint_url, config=client_config)
            self.client.meta.events.register("before-sign.s3.CompleteMultipartUpload", _content_md5)
            credentials = session.get_credentials()
        except Exception as error:  # profile missing, bad endpoint URL, ...
            raise translate(error, "opening the S3 client") from None
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            register_secrets(frozen.access_key, frozen.secret_key, frozen.token)
        self._credentials = credentials

    @property
    def checksum_mode(self) -> ChecksumMode:
        return self.config.checksum

    def before_send(self, operation: str, hook: Callable[[str], None]) -> None:
        """Call ``hook(url)`` when a request of ``operation`` is about to be sent (for a test's
        crash point: see archup.store.wrappers.CrashPointStore)."""
        self.client.meta.events.register(f"before-send.s3.{operation}",
                                         lambda request, **kwargs: hook(request.url))

    # -- what another transport needs of botocore ---------------------------------

    def signed_put_url(self) -> tuple[str, str]:
        """The URL and Authorization header of a PutObject of the probe key that botocore
        builds, resolves (its endpoint rules: path-style or virtual-hosted, region) and signs,
        and that is answered here instead of being sent."""
        from botocore.awsrequest import AWSResponse

        seen: list[tuple[str, str]] = []

        def answer_here(request: Any, **kwargs: Any) -> AWSResponse | None:
            if not urllib.parse.urlsplit(request.url).path.endswith("/" + ENDPOINT_PROBE):
                return None  # another thread's real request
            authorization = request.headers.get("Authorization", b"")
            seen.append((request.url, authorization.decode() if isinstance(authorization, bytes) else authorization))
            return AWSResponse(request.url, 200, {"ETag": '"probe"'}, _NoBody())

        event = "before-send.s3.PutObject"
        self.client.meta.events.register_first(event, answer_here, unique_id="archup-endpoint-probe")
        try:
            self.client.put_object(Bucket=self.bucket, Key=ENDPOINT_PROBE, Body=b"")
        except Exception as error:
            raise translate(error, "PutObject") from None
        finally:
            self.client.meta.events.unregister(event, unique_id="archup-endpoint-probe")
        assert seen, "the probe PutObject was not built"
        return seen[0]

    def fixed_credentials(self) -> Credentials | None:
        """The credentials, if they can never change: keys from the environment, a profile or
        a credentials file (botocore's plain ``Credentials``, whose ``method`` says which). None
        for those botocore refreshes (roles, SSO, a credential_process with an expiry; with
        AWS_CREDENTIAL_EXPIRATION even the environment's are refreshable, so ``method`` alone
        cannot tell) and when the chain found none: those are asked for at each signature."""
        import botocore.credentials

        # The exact type: a subclass (RefreshableCredentials and any other) may change.
        if type(self._credentials) is not botocore.credentials.Credentials:
            return None
        frozen = self._credentials.get_frozen_credentials()
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    def frozen_credentials(self) -> Credentials:
        """botocore's chain, asked at each signature (a refreshed token is registered as a secret)."""
        try:
            if self._credentials is None:
                raise botocore.exceptions.NoCredentialsError()
            frozen = self._credentials.get_frozen_credentials()
        except Exception as error:
            raise translate(error, "PutObject") from None
        register_secrets(frozen.access_key, frozen.secret_key, frozen.token)
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    # -- single objects -----------------------------------------------------

    def put_object(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                   metadata: dict[str, str] | None = None, content_type: str | None = None,
                   archive: bool = False) -> str:
        """PUT one object; ``archive`` marks a source file's object (storage class, tags, user metadata)."""
        args = put_args(self.config, body, sha256_digest=sha256_digest, metadata=metadata,
                        content_type=content_type, archive=archive).boto()
        return str(_sent(f"PutObject {key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=body, **args), retry=self.retry)["ETag"])

    def put_file(self, key: str, handle: IO[bytes], size: int, *, sha256_digest: bytes,
                 metadata: dict[str, str] | None = None, content_type: str | None = None) -> str:
        """A streamed PUT: botocore reads a file body in chunks (to sign it, then to send it)."""
        handle.seek(0)
        own = object_args(self.config, archive=False, metadata=metadata, content_type=content_type)
        args = PutArgs(own.metadata, (*own.fields, *file_checksum_fields(self.config.checksum, handle,
                                                                          sha256_digest))).boto()

        def send() -> Any:
            handle.seek(0)  # a retry sends the body from its start again
            return self.client.put_object(Bucket=self.bucket, Key=key, Body=handle, ContentLength=size, **args)
        return str(_sent(f"PutObject {key}", send, retry=self.retry)["ETag"])

    def put_if_absent(self, key: str, body: bytes, *, content_type: str = "application/json",
                      metadata: dict[str, str] | None = None) -> str | None:
        """PUT with ``If-None-Match: *``; returns the ETag, or None if the key already exists.
        The body carries its checksum as every PUT does (the manifest is what seals a batch)."""
        args = put_args(self.config, body, metadata=metadata, content_type=content_type, if_none_match=True).boto()
        answer = _request(f"PutObject {key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=body, **args), absent=_EXISTS, retry=self.retry)
        return None if answer is None else str(answer["ETag"])

    def head(self, key: str) -> ObjectInfo | None:
        answer = _request(f"HeadObject {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=key),
                          absent=_ABSENT)
        if answer is None:
            return None
        return ObjectInfo(key, int(answer["ContentLength"]), str(answer["ETag"]), dict(answer.get("Metadata", {})),
                          storage_class=_storage_class(answer.get("StorageClass")), restore=answer.get("Restore"),
                          archive_status=answer.get("ArchiveStatus"))

    def get_bytes(self, key: str) -> bytes:
        def send() -> bytes:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        return _sent(f"GetObject {key}", send)

    def open_object(self, key: str, *, start: int = 0, length: int | None = None,
                    if_match: str | None = None) -> _Body | None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if length is not None:
            if length <= 0:
                raise ValueError(f"GetObject {key}: a range of {length} bytes")
            args["Range"] = f"bytes={start}-{start + length - 1}"
        elif start:
            args["Range"] = f"bytes={start}-"
        if if_match:
            args["IfMatch"] = if_match  # 412: the object changed since it was first read
        # No ChecksumMode: the client validates a response checksum only when asked
        # (response_checksum_validation="when_required"), which would cost a CRC of every
        # byte read and cannot check a range against the whole object's value; archup checks
        # what it reads against the SHA-256 it recorded.
        what = f"GetObject {key}" + (f" bytes {start}-{start + length - 1}" if length is not None
                                     else f" from byte {start}" if start else "")
        answer = _request(what, lambda: self.client.get_object(**args), absent=_ABSENT)
        return None if answer is None else _Body(key, answer, what)

    def restore_object(self, key: str, *, days: int, tier: str, storage_class: str | None = None) -> RestoreAnswer:
        request: dict[str, Any] = {"GlacierJobParameters": {"Tier": tier}}
        if storage_class != "INTELLIGENT_TIERING":  # S3 refuses Days for an archive tier's object
            request["Days"] = days
        what = f"RestoreObject {key}"
        try:
            answer = self.client.restore_object(Bucket=self.bucket, Key=key, RestoreRequest=request)
        except botocore.exceptions.ClientError as error:
            if _error_code(error) in ("RestoreAlreadyInProgress", "409"):
                return "in-progress"
            raise translate(error, what) from None
        except Exception as error:
            raise translate(error, what) from None
        # 202: a restore started; 200: the object already has a restored copy (its expiry moved).
        return "ready" if answer.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200 else "started"

    def list_objects(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects under a prefix, in key order (UTF-8 binary order), page by page."""
        args = {"Bucket": self.bucket, "Prefix": prefix, **({"StartAfter": start_after} if start_after else {})}
        pages = self.client.get_paginator("list_objects_v2").paginate(**args)
        for page in _pages(f"ListObjectsV2 {prefix}", pages):
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"], int(item["Size"]), str(item.get("ETag", "")), {},
                                 storage_class=_storage_class(item.get("StorageClass")))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under a prefix (1,000 keys a request); returns how many."""
        deleted = 0
        batch: list[dict[str, str]] = []

        def flush() -> None:
            nonlocal deleted
            answer = _sent(f"DeleteObjects {prefix}", lambda: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise TransferError(f"DeleteObjects {prefix}: {first.get('Key')}: {first.get('Code')}",
                                    str(first.get("Code", "")))
            deleted += len(batch)
            batch.clear()

        for item in self.list_objects(prefix):
            batch.append({"Key": item.key})
            if len(batch) == 1000:
                flush()
        if batch:
            flush()
        return deleted

    def check_bucket(self) -> None:
        """Preflight: the bucket exists and these credentials reach it."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as error:
            code = _error_code(error)
            if code in ("404", "NoSuchBucket"):
                raise DestinationError(f"bucket {self.bucket!r} does not exist; create it or fix --bucket") from None
            if code in ("403", "AccessDenied"):
                skew = _clock_skew(error)
                if skew is not None and abs(skew) > MAX_CLOCK_SKEW:
                    raise DestinationError(
                        f"HeadBucket {self.bucket}: 403 and the server's clock differs from this machine's by "
                        f"{abs(skew) / 60:.0f} minutes; {HINTS['RequestTimeTooSkewed']}") from None
                raise DestinationError(f"access to bucket {self.bucket!r} denied; check the credentials") from None
            raise translate(error, f"HeadBucket {self.bucket}") from None
        except Exception as error:
            raise translate(error, f"HeadBucket {self.bucket}") from None

    # -- multipart ----------------------------------------------------------

    def multipart_checksum(self) -> MultipartChecksum:
        """How a new multipart upload checksums its parts, by --checksum and --full-object-checksum:
        a full-object CRC64NVME (S3's default), or CRC32 once the endpoint refused CRC64NVME."""
        mode = self.config.checksum
        if mode in (ChecksumMode.SHA256, ChecksumMode.CRC32) and self.config.full_object_checksum:
            return MultipartChecksum("CRC32" if self._crc64nvme_refused else "CRC64NVME", full_object=True)
        if mode is ChecksumMode.SHA256:
            return MultipartChecksum("SHA256")
        return MultipartChecksum(None)  # crc32 without full-object: botocore's own; md5; none

    def create_multipart(self, key: str, checksum: MultipartChecksum, *, metadata: dict[str, str] | None = None,
                         content_type: str | None = None) -> str:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key,
                                **object_args(self.config, archive=True, metadata=metadata,
                                              content_type=content_type).boto()}
        if checksum.algorithm:
            args["ChecksumAlgorithm"] = checksum.algorithm
        if checksum.full_object:
            args["ChecksumType"] = "FULL_OBJECT"
        what = f"CreateMultipartUpload {key}"
        try:
            answer = self.client.create_multipart_upload(**args)
        except botocore.exceptions.ClientError as error:
            if checksum.algorithm == "CRC64NVME" and _error_code(error) in _ALGORITHM_REFUSED:
                self._crc64nvme_refused = True
                raise TransferError(f"{what}: {_error_code(error)} for checksum CRC64NVME; "
                                    "CRC32 from now on", CHECKSUM_REFUSED) from None
            raise translate(error, what) from None
        except Exception as error:
            raise translate(error, what) from None
        return str(answer["UploadId"])

    def _part_checksum_args(self, body: bytes | bytearray, checksum: MultipartChecksum,
                            crc: int | None) -> dict[str, str]:
        if checksum.algorithm in ("CRC32", "CRC64NVME"):
            value = crc if crc is not None else crc_of(checksum.algorithm, body)
            return {f"Checksum{checksum.algorithm}": crc_b64(checksum.algorithm, value)}
        if checksum.algorithm == "SHA256":
            return {"ChecksumSHA256": b64(hashlib.sha256(body).digest())}
        if self.config.checksum is ChecksumMode.MD5:
            return {"ContentMD5": b64(hashlib.md5(body).digest())}
        return {}

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes | bytearray,
                    checksum: MultipartChecksum, *, crc: int | None = None) -> UploadedPart:
        """Send one part; ``crc`` is the part's CRC if the caller already computed it."""
        checksum_args = self._part_checksum_args(body, checksum, crc)
        answer = _sent(f"UploadPart {key} part {part_number}", lambda: self.client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=part_number, Body=body, **checksum_args),
            retry=self.retry)
        value = next((v for name, v in checksum_args.items() if name.startswith("Checksum")), None)
        return UploadedPart(part_number, str(answer["ETag"]), value)

    def complete_multipart(self, key: str, upload_id: str, parts: list[UploadedPart], checksum: MultipartChecksum,
                           *, full_crc: int | None = None, size: int | None = None) -> str:
        """Complete from the listed parts. A full-object upload also sends the CRC of the
        whole file as read, which the server checks against the parts it holds."""
        listed: list[dict[str, Any]] = []
        for part in parts:
            entry: dict[str, Any] = {"PartNumber": part.part_number, "ETag": part.etag}
            if part.checksum and checksum.algorithm:
                entry[f"Checksum{checksum.algorithm}"] = part.checksum
            listed.append(entry)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id,
                                "MultipartUpload": {"Parts": listed}}
        if checksum.full_object and full_crc is not None and checksum.algorithm:
            args.update({"ChecksumType": "FULL_OBJECT",
                         f"Checksum{checksum.algorithm}": crc_b64(checksum.algorithm, full_crc)})
            if size is not None:
                args["MpuObjectSize"] = size
        # Sent again on BadDigest too: the part list arrived changed (its Content-MD5), or the
        # whole-object CRC does not match the parts, which a second try then says again.
        answer = _sent(f"CompleteMultipartUpload {key}", lambda: self.client.complete_multipart_upload(**args),
                       retry=self.retry)
        return str(answer["ETag"])

    def list_parts(self, key: str, upload_id: str) -> OpenUpload | None:
        """The parts the server holds of an upload and its checksum kind; None if it no longer knows it."""
        def send() -> OpenUpload:
            parts: dict[int, tuple[int, str]] = {}
            algorithm: str | None = None
            checksum_type = ""
            for page in self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key,
                                                                          UploadId=upload_id):
                algorithm = page.get("ChecksumAlgorithm") or algorithm
                checksum_type = page.get("ChecksumType") or checksum_type
                for item in page.get("Parts", []):
                    parts[int(item["PartNumber"])] = (int(item["Size"]), str(item["ETag"]))
            return OpenUpload(parts, MultipartChecksum(algorithm, full_object=checksum_type == "FULL_OBJECT"))
        return _request(f"ListParts {key}", send, absent=_NO_UPLOAD)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        _request(f"AbortMultipartUpload {key}", lambda: self.client.abort_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id), absent=_NO_UPLOAD)

    def list_multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, upload_id) of every multipart upload in progress under a prefix."""
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
        for page in _pages(f"ListMultipartUploads {prefix}", pages):
            for item in page.get("Uploads", []):
                yield str(item["Key"]), str(item["UploadId"])


def _storage_class(named: str | None) -> str | None:
    """A storage class as ObjectInfo keeps it: None for STANDARD (HEAD names no class for it)."""
    return None if not named or named == "STANDARD" else str(named)


def _pages(what: str, pages: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A paginator's pages, each fetched through the error translation."""
    iterator = iter(pages)
    while True:
        page = _request(what, lambda: next(iterator, None))
        if page is None:
            return
        yield page
