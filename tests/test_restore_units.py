"""The restore core over the in-memory store (held to S3's contract by tests/test_store_contract.py):
archived objects thawed at a bounded rate, --wait polling with backoff, stops and failures of
one range; the clock and the waits are the test's, so nothing sleeps."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from archup.errors import Interrupted
from archup.manifest import FORMAT, FORMAT_VERSION
from archup.restore import BatchLocation, RestoreOptions, restore_batch
from archup.store.memory import MemoryStore

BATCH = "01M8HMF74FJFSWG6TZGBDTDP33"
PREFIX = f"staging/{BATCH}/"


def seal(store: MemoryStore, files: dict[str, bytes], *, archived: str | None = None) -> BatchLocation:
    """A sealed batch of ``files`` in ``store``, as finalize writes one."""
    lines = []
    for path in sorted(files, key=lambda p: (PREFIX + "files/" + p).encode()):
        key = PREFIX + "files/" + path
        etag = store.put_object(key, files[path])
        if archived:
            store.archive(key, storage_class=archived)
        lines.append(json.dumps({"path": path, "key": key, "size": len(files[path]),
                                 "sha256": hashlib.sha256(files[path]).hexdigest(), "etag": etag,
                                 "part_size": None, "mtime_ns": 1_700_000_000_000_000_000},
                                separators=(",", ":")) + "\n")
    body = "".join(lines).encode()
    store.put_object(PREFIX + "manifest.jsonl", body)
    summary = {"format": FORMAT, "format_version": FORMAT_VERSION, "batch_id": BATCH,
               "destination": {"bucket": store.bucket, "endpoint_url": None, "prefix": PREFIX},
               "entries": {"key": PREFIX + "manifest.jsonl", "sha256": hashlib.sha256(body).hexdigest(),
                           "bytes": len(body), "count": len(lines)},
               "files_uploaded": len(lines), "total_bytes": sum(map(len, files.values()))}
    store.put_object(PREFIX + "manifest.json", json.dumps(summary).encode())
    return BatchLocation(BATCH, PREFIX + "manifest.json", PREFIX)


FILES = {f"f{n:03}.txt": f"file {n}\n".encode() * (n + 1) for n in range(12)}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_archived_objects_are_thawed_once_and_the_rest_restored(tmp_path: Path) -> None:
    store = MemoryStore()
    location = seal(store, FILES, archived="DEEP_ARCHIVE")
    store.put_object(PREFIX + "files/f000.txt", FILES["f000.txt"])  # one object readable as it is
    report = restore_batch(store, location, tmp_path / "out", RestoreOptions(restore_tier="Bulk"))
    assert (report.objects_thawing, report.thaw_requests, report.files_restored) == (11, 11, 1)
    assert report.exit_code == 75
    assert "up to 48 hours for DEEP_ARCHIVE" in report.thaw_note
    assert tree(tmp_path / "out") == {"f000.txt": FILES["f000.txt"]}

    # Again while they thaw: no second request, still "later".
    report = restore_batch(store, location, tmp_path / "out", RestoreOptions())
    assert (report.objects_thawing, report.thaw_requests, report.files_present) == (11, 0, 1)

    for name in FILES:
        if name != "f000.txt":
            store.finish_thaw(PREFIX + "files/" + name)
    report = restore_batch(store, location, tmp_path / "out", RestoreOptions())
    assert (report.exit_code, report.objects_thawing, report.files_restored) == (0, 0, 11)
    assert tree(tmp_path / "out") == FILES


def test_wait_polls_with_backoff_until_thawed(tmp_path: Path) -> None:
    store = MemoryStore()
    location = seal(store, FILES, archived="GLACIER")
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:  # the thaw ends during the third wait
            for name in FILES:
                store.finish_thaw(PREFIX + "files/" + name)

    report = restore_batch(store, location, tmp_path / "out",
                           RestoreOptions(wait=True, poll_first=30, poll_max=100), sleep=sleep)
    assert waits == [30, 60, 100]
    assert (report.exit_code, report.files_restored, report.thaw_requests) == (0, len(FILES), len(FILES))
    assert tree(tmp_path / "out") == FILES


def test_thaw_requests_are_paced_at_most_a_thousand_a_second(tmp_path: Path, monkeypatch) -> None:
    import archup.restore as core

    monkeypatch.setattr(core, "MAX_THAW_REQUESTS_PER_SECOND", 5)
    store = MemoryStore()
    location = seal(store, FILES, archived="GLACIER")
    now = [100.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(round(seconds, 6))
        now[0] += seconds

    report = restore_batch(store, location, tmp_path / "out", RestoreOptions(parallel=1), clock=lambda: now[0],
                           sleep=sleep)
    assert report.thaw_requests == 12
    # 5 in the first second, 5 in the next, 2 in the third: a window of one second never holds more than 5.
    assert waits == [1.0, 1.0] and now[0] == 102.0


def test_dry_run_thaws_nothing(tmp_path: Path) -> None:
    store = MemoryStore()
    location = seal(store, FILES, archived="GLACIER")
    report = restore_batch(store, location, tmp_path / "out", RestoreOptions(dry_run=True))
    assert report.thaw_requests == 0 and {action for action, _, _ in report.planned} == {"thaw"}
    assert store.head(PREFIX + "files/f001.txt").restore is None  # type: ignore[union-attr]
    assert not (tmp_path / "out").exists()


def test_a_stop_leaves_no_temporary_file_and_the_rerun_finishes(tmp_path: Path) -> None:
    store = MemoryStore()
    big = bytes(range(256)) * 20_000  # 5 MB: several ranges
    location = seal(store, {"big.bin": big, **FILES})
    stop = threading.Event()

    class StopAfterFirstBytes:
        def on_totals(self, files: int, size: int) -> None:
            pass

        def on_bytes(self, count: int) -> None:
            stop.set()

        def on_file_started(self, rel_path: str, size: int) -> None:
            pass

        def on_file_done(self, rel_path: str, ok: bool, size: int, error: str | None) -> None:
            pass

    with pytest.raises(Interrupted):
        restore_batch(store, location, tmp_path / "out", RestoreOptions(part_size=1024 * 1024, parallel=2),
                      observer=StopAfterFirstBytes(), stop=stop)
    assert not list((tmp_path / "out").rglob(".archup-restore-*"))
    assert "big.bin" not in tree(tmp_path / "out")

    report = restore_batch(store, location, tmp_path / "out", RestoreOptions(part_size=1024 * 1024))
    assert report.exit_code == 0
    assert tree(tmp_path / "out") == {"big.bin": big, **FILES}


def test_bwlimit_meters_downloads_through_the_shared_budget() -> None:
    from archup.store.wrappers import RateLimitedStore

    inner = MemoryStore()
    inner.put_object("k", b"x" * 3000)
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    store = RateLimitedStore(inner, 1000, clock=lambda: now[0], sleep=sleep)
    reader = store.open_object("k")
    assert reader is not None
    buffer = bytearray(1000)
    got = b""
    while count := reader.readinto(buffer):
        got += bytes(buffer[:count])
    assert got == b"x" * 3000
    assert sum(waits) == pytest.approx(2.0)  # 3,000 bytes at 1,000 B/s: the first 1,000 at once


def test_a_failed_range_fails_its_file_only_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    from faultstore import Faults

    from archup.errors import TransferError

    inner = MemoryStore()
    big = bytes(range(256)) * 20_000  # 5 MB: five ranges of 1 MiB
    location = seal(inner, {"big.bin": big, **FILES})
    faults = Faults()
    faults.fail("open_object", "*/files/big.bin", TransferError("GetObject: 500", "InternalError"), nth=3)
    report = restore_batch(faults.wrap(inner), location, tmp_path / "out",
                           RestoreOptions(part_size=1024 * 1024, parallel=3))
    assert [path for path, _ in report.failures] == ["big.bin"] and "GetObject: 500" in report.failures[0][1]
    assert tree(tmp_path / "out") == FILES
    assert not list((tmp_path / "out").rglob(".archup-restore-*"))

    report = restore_batch(inner, location, tmp_path / "out", RestoreOptions(part_size=1024 * 1024, parallel=3))
    assert (report.exit_code, report.files_restored, report.files_present) == (0, 1, len(FILES))
    assert (tmp_path / "out" / "big.bin").read_bytes() == big
