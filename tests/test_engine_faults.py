"""The engine's failures over the in-memory store with scripted faults (tests/faultstore.py):
what a failed request, a damaged body or a denied destination does to one file and to the run.
First, the fault store itself: a rule applies where and when it says, and nowhere else."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultstore import Faults
from testdata import pattern_bytes

from archup.errors import DestinationError, TransferError
from archup.journal import SQLiteJournal
from archup.states import FileState
from archup.store import MultipartChecksum
from archup.store.memory import MemoryStore
from archup.uploader import Uploader, UploadOptions

MiB = 1024 * 1024
PART = 5 * MiB
BATCH = "01K8RNKN488RQCG3YGG72QBZS5"


# -- the fault store -------------------------------------------------------------------------------


def test_a_failure_applies_to_the_nth_matching_call_only() -> None:
    faults = Faults()
    faults.fail("put_object", "k/*.bin", TransferError("PutObject: 500 InternalError", "InternalError"), nth=2)
    store = faults.wrap(MemoryStore("b"))
    store.put_object("k/a.bin", b"a")
    store.put_object("k/x.txt", b"x")  # another key: not counted
    with pytest.raises(TransferError, match="InternalError"):
        store.put_object("k/b.bin", b"b")
    store.put_object("k/b.bin", b"b")  # times=1: the next call goes through
    assert store.head("k/b.bin") is not None and store.get_bytes("k/a.bin") == b"a"
    assert faults.count("put_object", "k/*.bin") == 3


def test_a_corrupted_body_reaches_the_store_changed_and_a_checksum_catches_it() -> None:
    import hashlib

    faults = Faults()
    faults.corrupt("put_object", "*/a.bin")
    store = faults.wrap(MemoryStore("b"))
    body = pattern_bytes(1000, seed=1)
    with pytest.raises(TransferError, match="BadDigest"):
        store.put_object("k/a.bin", body, sha256_digest=hashlib.sha256(body).digest())
    store.put_object("k/a.bin", body)  # the rule was used up: the same body now arrives whole
    assert store.get_bytes("k/a.bin") == body


def test_a_held_call_waits_for_its_release_and_a_part_rule_matches_its_part_only() -> None:
    faults = Faults()
    held = faults.hold("upload_part", "*", part_number=2)
    after: list[int] = []
    faults.after("upload_part", do=lambda call: after.append(call.part_number or 0), times=None)
    store = faults.wrap(MemoryStore("b"))
    checksum = MultipartChecksum("CRC32", full_object=True)
    upload_id = store.create_multipart("k", checksum)
    store.upload_part("k", upload_id, 1, b"one", checksum)
    sent = threading.Thread(target=store.upload_part, args=("k", upload_id, 2, b"two", checksum))
    sent.start()
    assert held.fired.wait(10)
    assert after == [1]  # part 2 waits, not stored yet
    held.release.set()
    sent.join(10)
    assert not sent.is_alive() and after == [1, 2]
    opened = store.list_parts("k", upload_id)
    assert opened is not None and sorted(opened.parts) == [1, 2]


# -- the engine over it ----------------------------------------------------------------------------


class World:
    """A source tree, a real journal and a batch; runs the Uploader over a FaultStore."""

    def __init__(self, tmp_path: Path, files: dict[str, bytes]) -> None:
        self.files = files
        self.source = tmp_path / "src"
        for name, data in files.items():
            (self.source / name).parent.mkdir(parents=True, exist_ok=True)
            (self.source / name).write_bytes(data)
        self.memory = MemoryStore("b")
        self.faults = Faults()
        self.store = self.faults.wrap(self.memory)
        self.journal = SQLiteJournal(tmp_path / "journal.db")
        self.batch = self.journal.init_batch(BATCH, source_root=str(self.source), bucket="b", prefix="staging/",
                                             part_size=PART)

    def run(self) -> Any:
        options = UploadOptions(parallel=2, part_size=PART, multipart_threshold=PART)
        return Uploader(self.journal, self.store, self.batch.batch_id, options).run()

    def state(self, name: str) -> tuple[FileState, str]:
        record = self.journal.get_file(self.batch.batch_id, name)
        return record.state, record.error or ""

    def stored(self, name: str) -> bytes | None:
        key = f"{self.batch.batch_prefix}files/{name}"
        return self.memory.get_bytes(key) if self.memory.head(key) is not None else None


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Any]:
    made: list[World] = []

    def make(files: dict[str, bytes]) -> World:
        made.append(World(tmp_path, files))
        return made[-1]

    yield make
    for each in made:
        each.journal.close()


def test_a_part_that_fails_fails_its_file_aborts_its_upload_and_the_rest_go_on(world: Any) -> None:
    files = {"big.bin": pattern_bytes(2 * PART + 7, seed=1), "small.txt": b"small\n"}
    run = world(files)
    run.faults.fail("upload_part", "*/big.bin", TransferError("UploadPart: 500 InternalError", "InternalError"),
                    part_number=2)

    result = run.run()

    assert (result.files_uploaded, result.files_failed, result.fatal) == (1, 1, None)
    state, error = run.state("big.bin")
    assert state is FileState.FAILED and "InternalError" in error
    assert run.stored("big.bin") is None and run.stored("small.txt") == files["small.txt"]
    assert list(run.memory.list_multipart_uploads("")) == []  # its upload aborted, no orphan
    assert run.faults.count("abort_multipart", "*/big.bin") == 1

    again = run.run()  # the rule is used up: the failed file is sent again, whole
    assert (again.files_uploaded, again.files_failed) == (1, 0)
    assert run.stored("big.bin") == files["big.bin"]


def test_a_body_damaged_on_its_way_is_refused_and_never_recorded_uploaded(world: Any) -> None:
    files = {"a.txt": pattern_bytes(4000, seed=2), "b.txt": b"b\n"}
    run = world(files)
    run.faults.corrupt("put_object", "*/a.txt")

    result = run.run()

    assert (result.files_uploaded, result.files_failed) == (1, 1)
    state, error = run.state("a.txt")
    assert state is FileState.FAILED and "BadDigest" in error
    assert run.stored("a.txt") is None
    assert run.run().files_uploaded == 1 and run.stored("a.txt") == files["a.txt"]


def test_a_denied_destination_stops_the_run_and_leaves_the_batch_resumable(world: Any) -> None:
    files = {f"f{n:02d}.txt": b"%d\n" % n for n in range(20)}
    run = world(files)
    run.faults.fail("put_object", "*/files/*", DestinationError("PutObject: AccessDenied", "AccessDenied"),
                    nth=3, times=None)

    result = run.run()

    assert isinstance(result.fatal, DestinationError) and result.fatal.code == "AccessDenied"
    assert result.files_uploaded < len(files) and result.files_failed == 0
    states = {run.state(name)[0] for name in files}
    assert FileState.FAILED not in states  # denied is the destination's fault, not the files'
    assert run.faults.count("put_object", "*/files/*") < len(files)  # it stopped sending

    run.faults.rules.clear()
    again = run.run()
    assert again.fatal is None and again.files_uploaded + result.files_uploaded == len(files)
    assert all(run.stored(name) == data for name, data in files.items())
