"""Small pure pieces: globs, sizes, part sizes, multipart ETags, the byte budget, log scrubbing."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from faultstore import Faults

from archup.checksums import multipart_etag
from archup.cli.common import parse_size
from archup.cli.lifecycle import parse_duration
from archup.dispatch import ByteBudget
from archup.errors import UsageError
from archup.journal import FileRecord, PartRecord, SQLiteJournal
from archup.logs import register_secrets, scrub
from archup.multipart import MAX_PARTS, MiB, part_size_for
from archup.scan import identity_of
from archup.select import Selector, compile_glob
from archup.states import FileState
from archup.store.memory import MemoryStore
from archup.uploader import Uploader, UploadOptions


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    ("*.txt", "a.txt", True),
    ("*.txt", "deep/dir/a.txt", True),          # no '/': a name in any directory
    ("/*.txt", "deep/a.txt", False),            # leading '/': anchored at the root
    ("docs/*.md", "docs/a.md", True),
    ("docs/*.md", "docs/sub/a.md", False),      # '*' never crosses '/'
    ("docs/**", "docs/sub/a.md", True),         # '**' does
    ("file?.bin", "file1.bin", True),
    ("file?.bin", "file10.bin", False),
    ("[ab].log", "b.log", True),
    ("[!ab].log", "b.log", False),
    ("a+b (1).txt", "a+b (1).txt", True),       # regex characters are literal
    ("cache/", "deep/cache/x/y.bin", True),     # trailing '/': a directory, everything under it
    ("cache/", "cache", False),                 # ... but not a file of that name
    ("/cache/", "deep/cache/y.bin", False),     # anchored directory
])
def test_globs(pattern: str, path: str, matches: bool) -> None:
    assert bool(compile_glob(pattern).match(path)) is matches


def test_selector_include_then_exclude() -> None:
    selector = Selector(["*.txt", "keep/**"], ["*secret*"])
    assert selector("a.txt") and selector("keep/x.bin")
    assert not selector("a.bin")
    assert not selector("my-secret.txt")
    assert Selector()("anything") and not Selector().active


def test_selector_excludes_dir_only_when_every_path_under_it_is_excluded() -> None:
    assert Selector(excludes=["lost+found/"]).excludes_dir("lost+found")
    assert Selector(excludes=["/a/**"]).excludes_dir("a")
    assert Selector(excludes=["**"]).excludes_dir("any/dir")
    assert not Selector(excludes=["a/*"]).excludes_dir("a")      # a/b/c.txt is still taken
    assert not Selector(excludes=["*.tmp"]).excludes_dir("a")
    assert not Selector(includes=["*.jpg"]).excludes_dir("a")    # an include cannot tell what is inside
    assert not Selector(excludes=["cache/[!.]**"]).excludes_dir("cache")  # cache/.keep is still wanted


@pytest.mark.parametrize(("text", "value"), [("5242880", 5242880), ("8MiB", 8 * MiB), ("8M", 8 * MiB),
                                             ("1g", 1024 ** 3), ("64KiB", 65536)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "8XB", "-1", "1.5M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_parse_duration() -> None:
    assert parse_duration("24h").total_seconds() == 86400
    assert parse_duration("0s").total_seconds() == 0
    with pytest.raises(UsageError):
        parse_duration("tomorrow")


@pytest.mark.parametrize("size", [0, 8 * MiB, 80 * 1024 * MiB, 100 * 1024 ** 3, 5 * 1024 ** 4])
def test_part_size_keeps_every_file_within_10000_parts(size: int) -> None:
    part_size = part_size_for(size, 8 * MiB)
    assert part_size >= 8 * MiB
    assert -(-size // part_size) <= MAX_PARTS
    assert part_size % MiB == 0


def test_part_size_is_never_below_s3_minimum() -> None:
    assert part_size_for(100 * MiB, 1 * MiB) == 5 * MiB


def test_multipart_etag_is_md5_of_part_md5s() -> None:
    bodies = [b"a" * 10, b"b" * 7]
    parts = [PartRecord(n + 1, len(b), f'"{hashlib.md5(b).hexdigest()}"', None) for n, b in enumerate(bodies)]
    expected = hashlib.md5(b"".join(hashlib.md5(b).digest() for b in bodies)).hexdigest()
    assert multipart_etag(parts) == f'"{expected}-2"'


def test_byte_budget_blocks_until_released() -> None:
    budget = ByteBudget(10)
    assert budget.acquire(8) == 8
    acquired = threading.Event()

    def taker() -> None:
        budget.acquire(5)
        acquired.set()

    thread = threading.Thread(target=taker)
    thread.start()
    assert not acquired.wait(0.1)  # 8 + 5 > 10: it must wait
    budget.release(8)
    assert acquired.wait(5)
    thread.join()
    budget.release(5)
    assert budget.acquire(50) == 10  # an oversized request waits for, and takes, the whole budget


def test_scrub_masks_registered_secrets_and_signature_shapes() -> None:
    register_secrets("AKIAUNITTESTCANARY", "unit-test-secret-canary")
    line = ("headers={'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIAUNITTESTCANARY/20261128/us-east-1/s3/"
            "aws4_request, SignedHeaders=host, Signature=" + "ab" * 32 + "'} secret=unit-test-secret-canary "
            "X-Amz-Security-Token: FQoGZXIvYXdzEXAMPLETOKEN")
    cleaned = scrub(line)
    assert "AKIAUNITTESTCANARY" not in cleaned
    assert "unit-test-secret-canary" not in cleaned
    assert "ab" * 32 not in cleaned
    assert "FQoGZXIvYXdzEXAMPLETOKEN" not in cleaned


def test_a_file_whose_parts_grew_still_gets_n_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 parts scaled down to 4: a 40 MiB file gets 10 MiB parts where 5 MiB was asked.
    The memory budget (N x part size) grows with them, so all N streams still carry its parts."""
    import archup.multipart

    monkeypatch.setattr(archup.multipart, "MAX_PARTS", 4)
    source = tmp_path / "src"
    source.mkdir()
    (source / "big.bin").write_bytes(bytes(40 * MiB))
    journal = SQLiteJournal(tmp_path / "journal.db")
    try:
        batch = journal.init_batch("01K8RNKN488RQCG3YGG72QBZS5", source_root=str(source), bucket="b",
                                   prefix="staging/", part_size=5 * MiB)
        # The first 4 UploadPart calls meet at a barrier: it trips only if that many parts of the
        # file are in flight at once (else it times out: a test failure).
        barrier = threading.Barrier(4, timeout=20)
        faults = Faults()
        faults.before("upload_part", do=lambda call: barrier.wait(), times=4)
        store = faults.wrap(MemoryStore("b"))
        options = UploadOptions(parallel=4, part_size=5 * MiB, multipart_threshold=5 * MiB, prehash=False)
        result = Uploader(journal, store, batch.batch_id, options).run()
    finally:
        journal.close()
    assert part_size_for(40 * MiB, 5 * MiB) == 10 * MiB
    assert result.fatal is None and result.files_uploaded == 1, result
    assert not barrier.broken  # four parts were in flight at once


def test_the_pre_hash_stops_between_chunks_when_the_run_is_stopped(tmp_path: Path) -> None:
    """A signal during the pre-hash of a large file does not wait for the whole file."""
    from archup.source import hash_handle as _hash_handle

    path = tmp_path / "big.bin"
    path.write_bytes(bytes(3 * MiB))
    info = path.stat()
    record = FileRecord("B", "big.bin", "k", info.st_size, info.st_mtime_ns, FileState.UPLOADING, None, None,
                        None, None, None, 0, "", identity=identity_of(info))
    reads: list[int] = []
    stop = threading.Event()
    with open(path, "rb") as handle:
        real_read = handle.read

        def read_then_stop(size: int = -1) -> bytes:
            reads.append(size)
            stop.set()  # the signal arrives while the first chunk is being read
            return real_read(size)

        handle.read = read_then_stop  # type: ignore[method-assign]
        assert _hash_handle(handle, record, stop) is None
    assert len(reads) == 1  # not one more chunk after the stop
    with open(path, "rb") as handle:
        assert _hash_handle(handle, record) == hashlib.sha256(bytes(3 * MiB)).hexdigest()
