"""Packed shards: many small files in one standard POSIX (pax) tar object.

A shard's bytes are a function of its member list alone (paths, sizes, mtimes, in the
order the journal fixed) and of the members' bytes: every header is written by
``tarfile.TarInfo.tobuf`` from those fields only (mode 0644, owner 0:0, no user or group
names, whole-second mtime), so the layout -- each member's offset, the index's, the
shard's size -- is known before a byte is read, and a shard can be sent again part by part
after a crash with the same bytes.

Layout::

    [pax header(s)][data][pad to 512] ... for each member, in order
    [header][.archup-index.jsonl][pad]    the index: a JSON line per member
    [two zero blocks]                      end of archive

The index member is the shard describing itself without the manifest: a line per member
``{"path", "offset", "size", "sha256"}`` where ``offset`` is where the member's data starts
in the shard. Its size is known in advance too (a SHA-256 is always 64 hex digits).
``tar -tvf`` lists the members with their paths, sizes and mtimes and ``tar -xf`` extracts
them (and the index, a dot-file). No compression: the bytes a restore fetches by range
are the file's own, and archives of small files are mostly already-compressed formats or
too small to gain (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
INDEX_NAME = ".archup-index.jsonl"
_PLACEHOLDER_DIGEST = "0" * 64


@dataclass(frozen=True)
class Member:
    """One file of a shard, as the journal fixed it."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Placed:
    """A member at its place: ``offset`` of its header, ``data_offset`` of its bytes."""

    member: Member
    offset: int
    data_offset: int
    head: bytes = b""  # its header block(s): ``data_offset - offset`` bytes

    @property
    def end(self) -> int:
        """Where the next member's header starts (after this one's padding)."""
        return self.data_offset + self.member.size + padding(self.member.size)


@dataclass(frozen=True)
class Layout:
    members: tuple[Placed, ...]
    index_offset: int       # the index member's header
    index_data_offset: int  # the index's JSON lines
    index_size: int         # their length
    size: int               # the whole shard, end-of-archive blocks included


def padding(size: int) -> int:
    return -size % BLOCK


# A ustar block after its type flag: no link name, the magic and version, empty owner
# names, device numbers and prefix, and the block's padding.
_AFTER_TYPE = bytes(100) + b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)
_FIXED_SUM = 8 * 0x20 + ord("0") + sum(_AFTER_TYPE)  # the checksum field counted as spaces, the type
_MAX_OCTAL_11 = 8 ** 11


def header(path: str, size: int, mtime_ns: int) -> bytes:
    """The tar header block(s) of one member: a pax extended header first where the name
    needs one (long, or not ASCII), then the ustar header.

    The common member (an ASCII name of at most 100 bytes, a size and mtime that fit their
    octal fields) gets its one block built here, byte for byte what ``tarfile`` writes
    (tests/test_shards.py holds the two to each other), at a tenth of the cost; any other
    goes through ``tarfile``."""
    mtime = mtime_ns // 1_000_000_000
    if path.isascii() and len(path) <= 100 and 0 <= size < _MAX_OCTAL_11 and 0 <= mtime < _MAX_OCTAL_11:
        name = path.encode("ascii")
        fields = b"0000644\x000000000\x000000000\x00%011o\x00%011o\x00" % (size, mtime)
        checksum = sum(name) + sum(fields) + _FIXED_SUM
        return b"".join((name, bytes(100 - len(name)), fields, b"%06o\x00 0" % checksum, _AFTER_TYPE))
    return _tarfile_header(path, size, mtime_ns)


def _tarfile_header(path: str, size: int, mtime_ns: int) -> bytes:
    info = tarfile.TarInfo(path)
    info.size = size
    info.mtime = mtime_ns // 1_000_000_000
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def index_line(path: str, data_offset: int, size: int, sha256: str) -> bytes:
    """``{"path","offset","size","sha256"}`` as compact JSON (the path encoded as json.dumps does)."""
    return b'{"path":%s,"offset":%d,"size":%d,"sha256":"%s"}\n' % (
        json.dumps(path, ensure_ascii=False).encode("utf-8"), data_offset, size, sha256.encode("ascii"))


def layout(members: Sequence[Member], *, index_mtime_ns: int = 0, heads: Sequence[bytes] | None = None) -> Layout:
    """Where everything goes, from the member list alone (``heads``: their headers, if the
    caller has them already)."""
    placed: list[Placed] = []
    offset = 0
    index_size = 0
    for number, member in enumerate(members):
        head = heads[number] if heads is not None else header(member.path, member.size, member.mtime_ns)
        data_offset = offset + len(head)
        item = Placed(member, offset, data_offset, head)
        placed.append(item)
        offset = item.end
        index_size += len(index_line(member.path, data_offset, member.size, _PLACEHOLDER_DIGEST))
    index_data_offset = offset + len(header(INDEX_NAME, index_size, index_mtime_ns))
    size = index_data_offset + index_size + padding(index_size) + len(END_OF_ARCHIVE)
    return Layout(tuple(placed), offset, index_data_offset, index_size, size)


def index_member(shard: Layout, digests: Sequence[str], *, index_mtime_ns: int = 0) -> bytes:
    """The index member and the end of the archive: everything from ``shard.index_offset``."""
    if len(digests) != len(shard.members):
        raise ValueError(f"{len(digests)} digests for {len(shard.members)} members")
    body = b"".join(index_line(p.member.path, p.data_offset, p.member.size, digest)
                    for p, digest in zip(shard.members, digests))
    assert len(body) == shard.index_size, "a digest that is not 64 hex digits"
    return header(INDEX_NAME, len(body), index_mtime_ns) + body + b"\0" * padding(len(body)) + END_OF_ARCHIVE


def member_headers(shard: Layout) -> Iterable[tuple[Placed, bytes]]:
    for placed in shard.members:
        yield placed, placed.head


def parse_index(body: bytes) -> list[dict[str, Any]]:
    """The index's lines, each checked for its types (raises ValueError)."""
    entries = []
    for number, line in enumerate(body.splitlines(), start=1):
        entry = json.loads(line)
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) and entry[k] >= 0
                        for k in ("offset", "size"))
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
            raise ValueError(f"index line {number} is not a member entry")
        entries.append(entry)
    return entries
