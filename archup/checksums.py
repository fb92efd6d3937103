"""Checksums as S3 writes them: base64 digests, the CRC32 of a whole file from the CRC32s
of its parts, the ETag of a multipart object, and whether a stored part holds given bytes."""

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
SHA256_B64_LENGTH = 44  # thirty-two


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def crc32_b64(crc: int) -> str:
    """A CRC32 as S3 writes it: the four bytes, big-endian, in base64."""
    return b64(crc.to_bytes(4, "big"))


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


def part_matches(body: bytes, part: PartRecord, crc32: int | None = None) -> bool:
    """Reuse a stored part only if the bytes just read are the bytes it holds (by the checksum
    it was sent with; a full-object upload's completion checks every part's CRC32 once more)."""
    if len(body) != part.size:
        return False
    if part.checksum and len(part.checksum) == CRC32_B64_LENGTH:
        return crc32_b64(zlib.crc32(body) if crc32 is None else crc32) == part.checksum
    if part.checksum:
        return b64(hashlib.sha256(body).digest()) == part.checksum
    return hashlib.md5(body).hexdigest() == part.etag.strip('"')
