"""Checksums as S3 writes them: base64 digests, the CRC of a whole file from the CRCs of
its parts (CRC32 or CRC64NVME), the ETag of a multipart object, and whether a stored part
holds given bytes.

CRC64NVME comes from awscrt (C, the GIL released), imported on first use: commands that
never send a multipart file do not pay for its import."""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .journal import PartRecord

CRC32_B64_LENGTH = 8    # four bytes in base64
CRC64_B64_LENGTH = 12   # eight
SHA256_B64_LENGTH = 44  # thirty-two
CRC_ALGORITHMS = ("CRC32", "CRC64NVME")  # the part checksums that combine into a full-object one


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def crc_b64(algorithm: str, crc: int) -> str:
    """A CRC32 or CRC64NVME as S3 writes it: big-endian bytes in base64."""
    return b64(crc.to_bytes(8 if algorithm == "CRC64NVME" else 4, "big"))


def crc32_b64(crc: int) -> str:
    """A CRC32 as S3 writes it: the four bytes, big-endian, in base64."""
    return crc_b64("CRC32", crc)


def crc_algorithm_of(checksum: str | None) -> str | None:
    """Which CRC a recorded part checksum (base64) is, by its length; None: not a CRC."""
    if checksum and len(checksum) == CRC32_B64_LENGTH:
        return "CRC32"
    if checksum and len(checksum) == CRC64_B64_LENGTH:
        return "CRC64NVME"
    return None


def crc_from_b64(value: str) -> int:
    return int.from_bytes(base64.b64decode(value), "big")


def crc_of(algorithm: str, data: bytes | bytearray, previous: int = 0) -> int:
    """The CRC32 (zlib: the faster of the two here) or CRC64NVME (awscrt) of ``data``."""
    if algorithm == "CRC64NVME":
        from awscrt import checksums
        return checksums.crc64nvme(data, previous)
    return zlib.crc32(data, previous)


def crc_combine(algorithm: str, crc1: int, crc2: int, length2: int) -> int:
    """The CRC of a + b from the CRC of a, the CRC of b and len(b)."""
    if algorithm == "CRC64NVME":
        from awscrt import checksums
        return checksums.combine_crc64nvme(crc1, crc2, length2) if length2 > 0 else crc1
    return crc32_combine(crc1, crc2, length2)


# -- CRC32 of a concatenation from the CRC32s of its pieces (zlib's crc32_combine) ----------
# Appending n bytes to a message acts on its CRC as a linear map over GF(2); the map for n
# zero bytes is a 32x32 bit matrix, built once per length by repeated squaring.

def _gf2_times(matrix: tuple[int, ...], vector: int) -> int:
    total, index = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[index]
        vector >>= 1
        index += 1
    return total


def _gf2_product(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_gf2_times(outer, column) for column in inner)


@lru_cache(maxsize=16)
def _crc32_shift(length: int) -> tuple[int, ...]:
    """The matrix that moves a CRC32 past ``length`` zero bytes."""
    one_bit = (0xEDB88320,) + tuple(1 << n for n in range(31))  # one zero bit
    power = _gf2_product(one_bit, one_bit)                       # two
    power = _gf2_product(power, power)                           # four
    power = _gf2_product(power, power)                           # eight bits: one byte
    result = tuple(1 << n for n in range(32))                    # identity
    while length:
        if length & 1:
            result = _gf2_product(power, result)
        length >>= 1
        if length:
            power = _gf2_product(power, power)
    return result


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """zlib.crc32(a + b) from zlib.crc32(a), zlib.crc32(b) and len(b)."""
    if length2 <= 0:
        return crc1
    return _gf2_times(_crc32_shift(length2), crc1) ^ crc2


def multipart_etag(parts: Sequence[PartRecord]) -> str:
    """The ETag S3 gives a completed multipart object: MD5 of the parts' MD5s, dash, count."""
    digests = b"".join(bytes.fromhex(part.etag.strip('"')) for part in parts)
    return f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'


def part_matches(body: bytes | bytearray, part: PartRecord) -> bool:
    """Reuse a stored part only if the bytes just read are the bytes it holds (by the checksum
    it was sent with; a full-object upload's completion checks every part's CRC once more)."""
    if len(body) != part.size:
        return False
    algorithm = crc_algorithm_of(part.checksum)
    if algorithm is not None:
        return crc_b64(algorithm, crc_of(algorithm, body)) == part.checksum
    if part.checksum:
        return b64(hashlib.sha256(body).digest()) == part.checksum
    return hashlib.md5(body).hexdigest() == part.etag.strip('"')
