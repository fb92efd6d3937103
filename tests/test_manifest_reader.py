"""The manifest reader: bounded, linear reads of forged bucket content (unit tests over the
in-memory store, which the store contract suite holds to S3's behaviour)."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from collections.abc import Iterator

import pytest

from archup.errors import UnsupportedManifest
from archup.manifest import FORMAT, FORMAT_VERSION, reader
from archup.store.memory import MemoryStore

BATCH = "01M8HMF74FJFSWG6TZGBDTDP33"


def test_a_huge_line_is_reported_not_held() -> None:
    mib = b"a" * (1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for _ in range(200):  # one 200 MiB line, then a good one
            yield mib
        yield b"\n{\"n\": 1}\n"

    tracemalloc.start()
    try:
        lines = list(reader.split_lines(chunks()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(lines) == 2
    assert isinstance(lines[0], reader.LineTooLong) and lines[0].length == 200 * 1024 * 1024
    assert lines[1] == b'{"n": 1}'
    assert peak < 8 * 1024 * 1024  # a chunk and a line's limit, not the line


def test_lines_across_chunk_boundaries_and_a_last_line_without_newline() -> None:
    chunks = [b"ab", b"c\nde", b"f\n\n", b"gh"]
    assert list(reader.split_lines(iter(chunks), limit=10)) == [b"abc", b"def", b"", b"gh"]
    too_long = list(reader.split_lines(iter([b"x" * 5, b"x" * 7, b"\nok\n"]), limit=10))
    assert isinstance(too_long[0], reader.LineTooLong) and too_long[1:] == [b"ok"]


def test_deeply_nested_json_is_a_bad_line_not_a_crash() -> None:
    line = b"[" * 100_000 + b"]" * 100_000
    bad = reader.parse_entry(line, 7)
    assert isinstance(bad, reader.BadLine) and bad.number == 7 and "nested" in bad.reason


def test_an_entry_needs_a_hex_digest() -> None:
    good = {"path": "a", "key": "p/files/a", "size": 1, "sha256": "0" * 64, "etag": None, "part_size": None,
            "mtime_ns": 5}
    assert isinstance(reader.parse_entry(json.dumps(good).encode(), 1), reader.Entry)
    forged = dict(good, sha256="../../" + "0" * 58)
    assert isinstance(reader.parse_entry(json.dumps(forged).encode(), 1), reader.BadLine)


def _summary(**fields: object) -> bytes:
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "batch_id": BATCH,
                "entries": {"key": "k", "sha256": "0" * 64, "bytes": 0, "count": 0}}
    document.update(fields)
    return json.dumps(document).encode()


def test_summary_is_bounded_versioned_and_checked() -> None:
    store = MemoryStore()
    store.put_object("s", _summary())
    summary = reader.read_summary(store, "s", BATCH)
    assert summary.entries == reader.Seal("k", "0" * 64, 0, 0) and summary.skipped is None
    assert summary.sha256 == hashlib.sha256(_summary()).hexdigest()

    with pytest.raises(reader.ManifestDefect) as missing:
        reader.read_summary(store, "absent", BATCH)
    assert missing.value.kind == "missing"

    store.put_object("big", b" " * (reader.MAX_SUMMARY_BYTES + 1))
    with pytest.raises(reader.ManifestDefect, match="size"):
        reader.read_summary(store, "big", BATCH)

    store.put_object("deep", b"[" * 100_000)
    with pytest.raises(reader.ManifestDefect, match="JSON"):
        reader.read_summary(store, "deep", BATCH)

    store.put_object("other", _summary(batch_id="01M8HMF74FJFSWG6TZGBDTDP34"))
    with pytest.raises(reader.ManifestDefect, match="batch_id"):
        reader.read_summary(store, "other", BATCH)

    store.put_object("newer", _summary(format_version=FORMAT_VERSION + 1))
    with pytest.raises(UnsupportedManifest, match="upgrade archup"):
        reader.read_summary(store, "newer", BATCH)


def test_spool_checks_the_seal_and_counts_lines(tmp_path) -> None:
    store = MemoryStore()
    body = b'{"a":1}\n{"b":2}\n'
    store.put_object("list", body)
    seal = reader.Seal("list", hashlib.sha256(body).hexdigest(), len(body), 2)
    with open(tmp_path / "spool", "w+b") as handle:
        assert reader.spool(store, seal, handle) == []
        assert list(reader.local_lines(handle)) == [b'{"a":1}', b'{"b":2}']
        forged = reader.Seal("list", "1" * 64, len(body), 3)
        assert reader.spool(store, forged, handle) == [("sha256", "1" * 64, seal.sha256), ("count", 3, 2)]
        assert reader.spool(store, reader.Seal("gone", "1" * 64, 0, 0), handle) == [("object", "1" * 64, None)]


def test_merge_listing_pairs_missing_and_unexpected() -> None:
    store = MemoryStore()
    for key in ("p/b", "p/c", "p/e"):
        store.put_object(key, b"x")
    paired = [(p.item, p.listed.key if p.listed else None)
              for p in reader.merge_listing(["p/a", "p/c", None, "p/d"], lambda k: k, store.list_objects("p/"))]
    assert paired == [("p/a", None), (None, "p/b"), ("p/c", "p/c"), (None, None), ("p/d", None), (None, "p/e")]
