"""A PutObject's arguments, computed once for either transport: botocore's parameters, or
the HTTP headers those parameters become (what the CRT sends).

What goes on which object: the storage class, tags and user metadata of the archive
options go on a source file's object (``archive``); server-side encryption on every
object archup writes; the body's checksum on every PUT but with ``--checksum none``
(x-amz-checksum-sha256, Content-MD5 or x-amz-checksum-crc32, by the mode).
"""

from __future__ import annotations

import hashlib
import urllib.parse
from dataclasses import dataclass
from typing import IO, Any

from ..checksums import b64, crc_b64, crc_of
from . import ChecksumMode, StoreConfig

# One argument: (botocore's parameter, the HTTP header it becomes, the value). A parameter
# of None is a header botocore writes by itself, which the CRT is given explicitly.
Field = tuple[str | None, str, str]


@dataclass(frozen=True)
class PutArgs:
    metadata: dict[str, str]   # user metadata (x-amz-meta-*)
    fields: tuple[Field, ...]

    def boto(self) -> dict[str, Any]:
        """As botocore's keyword arguments (Bucket, Key and Body not included)."""
        return {"Metadata": dict(self.metadata),
                **{parameter: value for parameter, _, value in self.fields if parameter is not None}}

    def headers(self) -> list[tuple[str, str]]:
        """As the HTTP headers botocore would send for them."""
        return [*((f"x-amz-meta-{name}", value) for name, value in self.metadata.items()),
                *((header, value) for _, header, value in self.fields)]


def object_args(config: StoreConfig, *, archive: bool, metadata: dict[str, str] | None = None,
                content_type: str | None = None) -> PutArgs:
    """An object's own arguments (no body checksum): also CreateMultipartUpload's."""
    fields: list[Field] = []
    if content_type:
        fields.append(("ContentType", "Content-Type", content_type))
    if config.sse:
        fields.append(("ServerSideEncryption", "x-amz-server-side-encryption", config.sse))
    if config.sse_kms_key_id:
        fields.append(("SSEKMSKeyId", "x-amz-server-side-encryption-aws-kms-key-id", config.sse_kms_key_id))
    if archive and config.storage_class:
        fields.append(("StorageClass", "x-amz-storage-class", config.storage_class))
    if archive and config.tags:
        fields.append(("Tagging", "x-amz-tagging", urllib.parse.urlencode(config.tags)))
    return PutArgs({**(dict(config.user_metadata) if archive else {}), **(metadata or {})}, tuple(fields))


def checksum_fields(mode: ChecksumMode, body: bytes | bytearray, sha256_digest: bytes | None = None) -> list[Field]:
    """The body's checksum for ``--checksum`` ``mode``; none with ``none``."""
    if mode is ChecksumMode.SHA256:
        # The CRT names the algorithm too, as AWS's SDKs do (botocore does not, for a given value).
        return [(None, "x-amz-sdk-checksum-algorithm", "SHA256"),
                ("ChecksumSHA256", "x-amz-checksum-sha256", b64(sha256_digest or hashlib.sha256(body).digest()))]
    if mode is ChecksumMode.CRC32:
        return [(None, "x-amz-sdk-checksum-algorithm", "CRC32"),
                ("ChecksumCRC32", "x-amz-checksum-crc32", crc_b64("CRC32", crc_of("CRC32", body)))]
    if mode is ChecksumMode.MD5:
        return [("ContentMD5", "Content-MD5", b64(hashlib.md5(body).digest()))]
    return []


def file_checksum_fields(mode: ChecksumMode, handle: IO[bytes], sha256_digest: bytes) -> list[Field]:
    """:func:`checksum_fields` of a body read from ``handle`` (from where it is, in 1 MiB
    reads; left where it was): the SHA-256 is the caller's, a CRC32 or MD5 is computed."""
    if mode not in (ChecksumMode.CRC32, ChecksumMode.MD5):
        return checksum_fields(mode, b"", sha256_digest)
    start = handle.tell()
    crc, md5 = 0, hashlib.md5()
    while chunk := handle.read(1024 * 1024):
        if mode is ChecksumMode.CRC32:
            crc = crc_of("CRC32", chunk, crc)
        else:
            md5.update(chunk)
    handle.seek(start)
    if mode is ChecksumMode.CRC32:
        return [(None, "x-amz-sdk-checksum-algorithm", "CRC32"), ("ChecksumCRC32", "x-amz-checksum-crc32",
                                                                   crc_b64("CRC32", crc))]
    return [("ContentMD5", "Content-MD5", b64(md5.digest()))]


def put_args(config: StoreConfig, body: bytes | bytearray, *, sha256_digest: bytes | None = None,
             metadata: dict[str, str] | None = None, content_type: str | None = None, archive: bool = False,
             if_none_match: bool = False) -> PutArgs:
    """Every argument of a PutObject of ``body`` but its bucket and key."""
    own = object_args(config, archive=archive, metadata=metadata, content_type=content_type)
    fields = [*own.fields, *checksum_fields(config.checksum, body, sha256_digest)]
    if if_none_match:
        fields.append(("IfNoneMatch", "If-None-Match", "*"))
    return PutArgs(own.metadata, tuple(fields))
