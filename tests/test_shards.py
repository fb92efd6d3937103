"""The packed shard format: a standard pax tar whose layout follows from its member list, read
by the system's tar and by Python's tarfile."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from archup import shards

MEMBERS = {
    "a.txt": b"alpha\n",
    "dir/b.bin": bytes(range(256)) * 3,
    "dir/sub/empty": b"",
    "m\u00e9lange/\u65e5\u672c.txt": b"unicode\n",
    "long/" + "x" * 150 + "/name.txt": b"long name\n",
    "exact512": b"5" * 512,
}
MTIME_NS = 1_700_000_000_123_456_789


def build(files: dict[str, bytes]) -> tuple[bytes, shards.Layout]:
    members = [shards.Member(path, len(body), MTIME_NS) for path, body in files.items()]
    shard = shards.layout(members)
    out = bytearray()
    for placed, head in shards.member_headers(shard):
        assert len(out) == placed.offset
        out += head
        assert len(out) == placed.data_offset
        body = files[placed.member.path]
        out += body + b"\0" * shards.padding(len(body))
    assert len(out) == shard.index_offset
    digests = [hashlib.sha256(files[p.member.path]).hexdigest() for p in shard.members]
    out += shards.index_member(shard, digests)
    assert len(out) == shard.size
    return bytes(out), shard


def test_layout_is_known_before_any_byte_and_places_every_member() -> None:
    data, shard = build(MEMBERS)
    for placed in shard.members:
        member = placed.member
        assert data[placed.data_offset:placed.data_offset + member.size] == MEMBERS[member.path]
    index = shards.parse_index(data[shard.index_data_offset:shard.index_data_offset + shard.index_size])
    assert [(e["path"], e["offset"], e["size"]) for e in index] == [
        (p.member.path, p.data_offset, p.member.size) for p in shard.members]
    assert [e["sha256"] for e in index] == [hashlib.sha256(MEMBERS[e["path"]]).hexdigest() for e in index]
    assert shards.layout([shards.Member(p, len(b), MTIME_NS) for p, b in MEMBERS.items()]) == shard


def test_python_tarfile_reads_it() -> None:
    data, _ = build(MEMBERS)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = archive.getnames()
        assert names == [*MEMBERS, shards.INDEX_NAME]
        for name, body in MEMBERS.items():
            member = archive.getmember(name)
            assert (member.size, member.mtime, member.mode) == (len(body), MTIME_NS // 10**9, 0o644)
            assert archive.extractfile(member).read() == body  # type: ignore[union-attr]


def test_the_systems_tar_lists_and_extracts_it(tmp_path: Path) -> None:
    data, _ = build(MEMBERS)
    shard = tmp_path / "000000.tar"
    shard.write_bytes(data)
    listing = subprocess.run(["tar", "-tvf", str(shard)], capture_output=True, text=True, check=True,
                             env={"LC_ALL": "C.UTF-8", "TZ": "UTC"}).stdout
    assert "dir/b.bin" in listing and "768" in listing and "2023-11-14 22:13" in listing
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(shard), "-C", str(out)], check=True, env={"LC_ALL": "C.UTF-8"})
    for name, body in MEMBERS.items():
        assert (out / name).read_bytes() == body
        assert (out / name).stat().st_mtime == MTIME_NS // 10**9


def test_index_needs_one_digest_per_member() -> None:
    _, shard = build({"a": b"a"})
    with pytest.raises(ValueError):
        shards.index_member(shard, [])


def test_the_fast_header_is_byte_for_byte_tarfiles() -> None:
    """The common member's header is built without tarfile; it must be exactly what tarfile writes."""
    import random

    from archup.shards import _tarfile_header, header

    rng = random.Random(20261206)
    for _ in range(5000):
        path = "".join(rng.choice("abcdefghij/._-XYZ0123 ") for _ in range(rng.randrange(1, 101)))
        size = rng.choice([0, 1, 511, 512, 1023, rng.randrange(0, 8 ** 11)])
        mtime_ns = rng.choice([0, rng.randrange(0, 8 ** 11) * 10 ** 9 + rng.randrange(10 ** 9)])
        assert header(path, size, mtime_ns) == _tarfile_header(path, size, mtime_ns), (path, size, mtime_ns)
    # Past the fast path's limits (non-ASCII, over 100 bytes, sizes past 11 octal digits) both agree too.
    for path, size in (("m\u00e9lange", 5), ("x" * 101, 5), ("big", 8 ** 11)):
        assert header(path, size, 0) == _tarfile_header(path, size, 0)
        assert len(header(path, size, 0)) > 512
