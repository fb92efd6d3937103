"""Large files (issue 12): a pipeline per file, one read pass, each part's CRC in the stream
that sends it, pooled part buffers, and no byte hashed again by botocore to sign it.

Unit tests run the engine over the in-memory store (held to the contract suite); the
signer and payload tests run the real S3 store against the moto server in a child process,
so botocore is imported there the way archup's CLI imports it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from faultstore import Faults
from testdata import pattern_bytes

import archup.multipart
from archup.checksums import crc_b64, crc_combine, crc_of
from archup.dispatch import BufferPool, ByteBudget, Dispatcher
from archup.journal import PartRecord, SQLiteJournal
from archup.multipart import full_crc
from archup.store import MultipartChecksum
from archup.store.memory import MemoryStore
from archup.uploader import Uploader, UploadOptions

MiB = 1024 * 1024
BATCH = "01K8RNKN488RQCG3YGG72QBZS5"


def _run(tmp_path: Path, files: dict[str, bytes], store: Any, **options: Any) -> tuple[Any, dict[str, Any]]:
    source = tmp_path / "src"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    journal = SQLiteJournal(tmp_path / "journal.db")
    try:
        batch = journal.init_batch(BATCH, source_root=str(source), bucket="b", prefix="staging/", part_size=5 * MiB)
        settings = dict(parallel=4, part_size=5 * MiB, multipart_threshold=5 * MiB)
        settings.update(options)
        result = Uploader(journal, store, batch.batch_id, UploadOptions(**settings)).run()
        rows = {name: journal.get_file(BATCH, name) for name in files}
    finally:
        journal.close()
    return result, rows


def _meeting(operation: str, parties: int, *, times: int | None) -> tuple[Any, threading.Barrier]:
    """An in-memory store whose calls of ``operation`` (the first ``times``; None: all) meet at a
    barrier of ``parties``: it trips only if that many are in flight at once (else it times out)."""
    barrier = threading.Barrier(parties, timeout=20)
    faults = Faults()
    faults.before(operation, do=lambda call: barrier.wait(), times=times)
    return faults.wrap(MemoryStore("b")), barrier


def test_several_large_files_are_read_at_once_each_by_its_own_reader(tmp_path: Path) -> None:
    files = {f"f{n}.bin": pattern_bytes(6 * MiB + n, seed=n) for n in range(3)}
    # CreateMultipartUpload of the 3 files meet: each file is being opened by its own reader at once.
    store, barrier = _meeting("create_multipart", 3, times=None)
    result, rows = _run(tmp_path, files, store)
    assert result.fatal is None and result.files_uploaded == 3, result
    assert not barrier.broken
    for name, data in files.items():
        assert store.get_bytes(f"staging/{BATCH}/files/{name}") == data
        # The whole file's SHA-256 from the upload's own read: in the journal, no pre-hash.
        assert rows[name].sha256 == hashlib.sha256(data).hexdigest()
        assert rows[name].checksum_kind == "CRC64NVME/FULL_OBJECT"


def test_the_file_is_hashed_by_its_reader_and_each_part_crc_by_its_stream(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread reads or hashes for every file: the SHA-256 is the reader's, each CRC is
    computed in the upload stream that sends the part."""
    crc_threads: list[str] = []
    real_crc_of = archup.multipart.crc_of

    def recording_crc_of(algorithm: str, data: bytes | bytearray, previous: int = 0) -> int:
        crc_threads.append(threading.current_thread().name)
        return real_crc_of(algorithm, data, previous)

    sha_threads: list[str] = []
    real_sha256 = hashlib.sha256

    class RecordingHash:
        def __init__(self, *data: bytes) -> None:
            self._hash = real_sha256(*data)

        def update(self, data: bytes | bytearray) -> None:
            sha_threads.append(threading.current_thread().name)
            self._hash.update(data)

        def hexdigest(self) -> str:
            return self._hash.hexdigest()

    files = {"big.bin": pattern_bytes(16 * MiB + 3, seed=9)}
    monkeypatch.setattr(archup.multipart, "crc_of", recording_crc_of)
    monkeypatch.setattr(archup.multipart.hashlib, "sha256", RecordingHash)
    store = MemoryStore("b")
    result, rows = _run(tmp_path, files, store)
    monkeypatch.undo()
    assert result.files_uploaded == 1, result
    assert len(crc_threads) == 4 and all(name.startswith("archup-upload") for name in crc_threads), crc_threads
    assert len(sha_threads) == 4 and all(name.startswith("archup-read") for name in sha_threads), sha_threads
    assert rows["big.bin"].sha256 == hashlib.sha256(files["big.bin"]).hexdigest()


def test_a_single_large_file_spreads_its_parts_over_every_stream(tmp_path: Path) -> None:
    store, barrier = _meeting("upload_part", 4, times=4)  # the first round of parts
    files = {"huge.bin": pattern_bytes(30 * MiB, seed=4)}
    result, _ = _run(tmp_path, files, store)
    assert result.files_uploaded == 1 and not barrier.broken
    assert store.get_bytes(f"staging/{BATCH}/files/huge.bin") == files["huge.bin"]


def test_an_endpoint_without_crc64nvme_gets_crc32_and_the_rest_follow(tmp_path: Path) -> None:
    files = {f"f{n}.bin": pattern_bytes(6 * MiB, seed=20 + n) for n in range(2)}
    store = MemoryStore("b", knows_crc64nvme=False)
    result, rows = _run(tmp_path, files, store, parallel=1)
    assert result.files_uploaded == 2, result
    assert {row.checksum_kind for row in rows.values()} == {"CRC32/FULL_OBJECT"}
    assert store.multipart_checksum() == MultipartChecksum("CRC32", full_object=True)


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC64NVME"])
def test_the_full_object_crc_is_the_parts_crcs_combined_in_part_order(algorithm: str) -> None:
    bodies = [pattern_bytes(5 * MiB, seed=1), pattern_bytes(5 * MiB, seed=2), b"tail"]
    parts = [PartRecord(n, len(body), f'"e{n}"', crc_b64(algorithm, crc_of(algorithm, body)))
             for n, body in enumerate(bodies, start=1)]
    whole = crc_of(algorithm, b"".join(bodies))
    assert full_crc(MultipartChecksum(algorithm, full_object=True), parts) == whole
    swapped = [parts[1], parts[0], parts[2]]
    assert full_crc(MultipartChecksum(algorithm, full_object=True), swapped) != whole
    assert full_crc(MultipartChecksum(algorithm), parts) is None  # composite: no whole-object CRC
    assert crc_combine(algorithm, crc_of(algorithm, b"ab"), crc_of(algorithm, b"cd"), 2) == crc_of(algorithm, b"abcd")


def test_part_buffers_are_reused_and_never_held_past_the_budget() -> None:
    budget = ByteBudget(3 * MiB)
    pool = BufferPool(budget)
    first = pool.take(MiB)
    pool.give_back(first)
    again = pool.take(MiB)
    assert again is first  # reused, not allocated again
    others = [pool.take(MiB), pool.take(MiB)]
    for buffer in (again, *others):
        pool.give_back(buffer)
    odd = pool.take(2 * MiB)  # another size: a new buffer; free + lent stay within the budget
    pool.give_back(odd)
    assert pool._free_bytes + pool._lent <= budget.capacity


def test_the_budget_serves_the_earliest_ticket_first_whoever_asked_first() -> None:
    """The file dispatched first gets freed bytes first, so files finish in order: six
    waiters that arrived in any order are served by ticket (on a plain condition each
    arrival wakes the others, and the order of service would be the scheduler's)."""
    budget = ByteBudget(10)
    budget.acquire(10)
    served: list[int] = []

    def wait(ticket: int) -> None:
        budget.acquire(10, ticket)
        served.append(ticket)
        budget.release(10)

    threads = []
    for count, ticket in enumerate([3, 0, 5, 1, 4, 2], start=1):
        threads.append(threading.Thread(target=wait, args=(ticket,)))
        threads[-1].start()
        assert budget.waiting_count(count, timeout=10)
    budget.release(10)
    for thread in threads:
        thread.join(10)
    assert served == [0, 1, 2, 3, 4, 5]
    assert budget.available == 10


def test_a_part_buffer_goes_back_once_with_its_bytes() -> None:
    errors: list[Any] = []
    dispatcher = Dispatcher(2, 4 * MiB, errors.append, readers=2)
    seen: list[int] = []
    with dispatcher.running():
        buffer = dispatcher.buffer(MiB)
        assert dispatcher.budget.available == 3 * MiB
        dispatcher.submit(lambda data: seen.append(len(data)), buffer.data, reservation=buffer)
    assert seen == [MiB] and errors == []
    assert dispatcher.budget.available == 4 * MiB and buffer.data is None
    buffer.release()  # a second release gives nothing back twice
    assert dispatcher.budget.available == 4 * MiB


_PROBE = r"""
import json, os, sys
from archup.store import StoreConfig, ChecksumMode, MultipartChecksum, TransportKind
from archup.store.s3 import S3Store
import botocore.compat
# botocore's signer is the point here (test_crt_transport checks the CRT's PutObject).
store = S3Store(StoreConfig(bucket=sys.argv[2], endpoint_url=sys.argv[1], region="us-east-1",
                            checksum=ChecksumMode(sys.argv[3]), transport=TransportKind.BOTOCORE))
seen = []
store.client.meta.events.register("before-send.s3", lambda request, **kw: seen.append(
    {"op": kw.get("event_name", ""), "payload": request.headers.get("X-Amz-Content-SHA256", b"").decode(),
     "checksums": sorted(k.lower() for k in request.headers if k.lower().startswith("x-amz-checksum-")
                         or k.lower() == "content-md5")}))
checksum = store.multipart_checksum()
upload = store.create_multipart("probe/big", checksum)
part = store.upload_part("probe/big", upload, 1, bytearray(b"x" * (5 * 1024 * 1024)), checksum)
store.complete_multipart("probe/big", upload, [part], checksum, full_crc=None)
store.put_object("probe/small", b"small", metadata={})
signer = store.client._request_signer.get_auth_instance("s3", "us-east-1", "s3v4")
print(json.dumps({"has_crt": botocore.compat.HAS_CRT, "signer": type(signer).__module__ + "." + type(signer).__name__,
                  "requests": seen}))
"""


def _probe(moto_endpoint: str, bucket: str, checksum: str = "sha256", **env: str) -> dict[str, Any]:
    import os
    environment = {k: v for k, v in os.environ.items() if k != "BOTO_DISABLE_CRT"}
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", _PROBE, moto_endpoint, bucket, checksum], env=environment,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_botocore_signs_with_its_own_signer_and_never_hashes_a_body_it_has_a_checksum_for(
        moto_endpoint: str, bucket: str) -> None:
    """awscrt is installed (for CRC64NVME), which would switch botocore to the CRT's signer; archup
    chooses botocore's own (the faster one here: docs/benchmarks.md). Every body goes with its
    checksum header and an unsigned payload, on http too."""
    probed = _probe(moto_endpoint, bucket)
    assert probed["has_crt"] is False
    assert probed["signer"] == "botocore.auth.S3SigV4Auth"
    requests = probed["requests"]
    assert requests and all(request["payload"] == "UNSIGNED-PAYLOAD" for request in requests), requests
    with_bodies = [request["checksums"] for request in requests if request["checksums"]]
    assert ["x-amz-checksum-crc64nvme"] in with_bodies        # UploadPart
    assert ["content-md5"] in with_bodies                     # CompleteMultipartUpload's part list
    assert ["x-amz-checksum-sha256"] in with_bodies           # PutObject


def test_the_signer_choice_follows_an_explicit_environment(moto_endpoint: str, bucket: str) -> None:
    probed = _probe(moto_endpoint, bucket, BOTO_DISABLE_CRT="false")
    assert probed["has_crt"] is True and probed["signer"].startswith("botocore.crt.auth.")


def test_with_no_checksum_the_payload_is_signed(moto_endpoint: str, bucket: str) -> None:
    """--checksum none sends no checksum header: then the signature's SHA-256 is the only check."""
    probed = _probe(moto_endpoint, bucket, "none")
    put = [request for request in probed["requests"] if not request["checksums"]]
    assert put and all(len(request["payload"]) == 64 for request in put), put
