"""Several hosts, one batch: archup processes sharing a journal on a real PostgreSQL server.

Each "host" is its own archup process (its own worker id) running the same command against
the same journal URL and the moto server over HTTP. What every test checks at the end is
the record, read through separate clients: each file's object byte-identical, one manifest
listing exactly the uploaded files, and no multipart upload left open.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from ulid import ULID

from archup.errors import LeaseLost
from archup.journal import NewFile
from archup.journal.postgres import PostgresJournal
from archup.states import BatchState, FileState

MiB = 1024 * 1024
T = TypeVar("T")


def make_tree(root: Path, small: int = 120, large: int = 2, seed: int = 7) -> dict[str, bytes]:
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(small):
        files[f"d{i % 7}/f{i:04d}.bin"] = rng.randbytes(rng.randint(1, 3000))
    for i in range(large):
        files[f"big/b{i}.bin"] = rng.randbytes(6 * MiB + 1234 * i)
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return files


class Hosts:
    """Starts archup processes as hosts of one shared batch."""

    def __init__(self, url: str, endpoint: str, bucket: str, source: Path, batch_id: str, lease: float = 6.0) -> None:
        """``lease``: short, so a dead host's files are taken over quickly; not so short that a
        heartbeat starved on a loaded 2-core machine lets a live host's lease run out (which the
        fence handles, with exit 3, but these tests expect 0)."""
        self.url, self.endpoint, self.bucket, self.source = url, endpoint, bucket, source
        self.batch_id, self.lease = batch_id, lease

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "archup", "upload", "--journal", self.url, "--bucket", self.bucket,
                "--endpoint-url", self.endpoint, "--batch", self.batch_id, "--parallel", "4",
                "--part-size", "5MiB", "--lease", str(self.lease), "--json", *extra, str(self.source)]

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(*extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})

    def run(self, *extra: str, timeout: float = 180) -> tuple[int, dict[str, object], str]:
        proc = self.start(*extra)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, json.loads(out) if out.strip() else {}, err


def check_record(s3, bucket: str, batch_id: str, files: dict[str, bytes]) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Every file's object byte-identical, one manifest listing exactly them, no open upload."""
    prefix = f"staging/{batch_id}/"
    for rel, body in files.items():
        got = s3.get_object(Bucket=bucket, Key=f"{prefix}files/{rel}")["Body"].read()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(body).hexdigest(), rel
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}manifest.json")["Body"].read())
    assert summary["files_uploaded"] == len(files)
    entries = s3.get_object(Bucket=bucket, Key=f"{prefix}manifest.jsonl")["Body"].read().decode()
    listed = {json.loads(line)["path"]: json.loads(line)["sha256"] for line in entries.splitlines() if line}
    assert listed == {rel: hashlib.sha256(body).hexdigest() for rel, body in files.items()}
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    assert uploads == []
    return summary


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "src"
    return root, make_tree(root)


def test_three_hosts_share_one_batch_and_all_report_the_one_seal(pg_url: str, moto_endpoint: str, bucket: str,
                                                                 s3, tree) -> None:  # type: ignore[no-untyped-def]
    source, files = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    procs = [hosts.start() for _ in range(3)]
    results = [proc.communicate(timeout=240) for proc in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    summaries = [json.loads(out) for out, _ in results]
    assert {s["batch_id"] for s in summaries} == {hosts.batch_id}
    assert {s["files_uploaded"] for s in summaries} == {len(files)}
    assert len({s["finalized_at"] for s in summaries}) == 1  # one seal, reported by all
    check_record(s3, bucket, hosts.batch_id, files)

    journal = PostgresJournal(pg_url)
    try:
        workers = journal.list_workers(hosts.batch_id)
        assert len(workers) == 3 and all(w.ended for w in workers)
        assert sum(w.files_done for w in workers) >= len(files)
    finally:
        journal.close()


def test_kill_9_at_random_points_loses_nothing(pg_url: str, moto_endpoint: str, bucket: str, s3,
                                              tree) -> None:  # type: ignore[no-untyped-def]
    """Three hosts; one of them killed with SIGKILL at a random point, ten times (a new process
    takes its place each time); the batch ends sealed once, every file byte-identical."""
    source, files = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    rng = random.Random(11)
    procs = [hosts.start() for _ in range(3)]
    kills = 0
    while kills < 10:
        victim = rng.randrange(3)
        try:
            procs[victim].wait(timeout=rng.uniform(0.2, 1.5))
        except subprocess.TimeoutExpired:
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            kills += 1
        procs[victim] = hosts.start()
    codes = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        codes.append((proc.returncode, err))
    assert all(code == 0 for code, _ in codes), codes
    check_record(s3, bucket, hosts.batch_id, files)


def test_the_postgresql_server_restarted_mid_run(pg_server, pg_url: str, moto_endpoint: str, bucket: str, s3,
                                                 tree) -> None:  # type: ignore[no-untyped-def]
    """Hosts reconnect and go on, or exit resumable (3 or 130); a rerun then finishes."""
    source, files = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    procs = [hosts.start() for _ in range(2)]
    journal = PostgresJournal(pg_url)
    try:
        # Restart once some files are recorded (bounded poll of the journal, not a sleep).
        for _ in range(400):
            if any(w.files_done or w.bytes_done for w in journal.list_workers(hosts.batch_id)) or \
                    journal.find_batch(hosts.batch_id) and journal.get_state(hosts.batch_id, 0).counts[
                        FileState.UPLOADED]:
                break
            threading.Event().wait(0.05)
    finally:
        journal.close()
    pg_server.restart()
    codes = [proc.wait(timeout=300) for proc in procs]
    assert all(code in (0, 3, 130) for code in codes), codes
    if any(codes):
        code, _, err = hosts.run()
        assert code == 0, err
    check_record(s3, bucket, hosts.batch_id, files)


def together(handles: list[PostgresJournal], call: Callable[[int, PostgresJournal], T]) -> list[T]:
    """Each handle makes its call in a thread of its own, all released at once by a barrier;
    the handles are closed afterwards. The results, in the order the calls returned."""
    barrier = threading.Barrier(len(handles))
    results: list[T] = []

    def run(index: int, handle: PostgresJournal) -> None:
        barrier.wait()
        results.append(call(index, handle))

    threads = [threading.Thread(target=run, args=(index, handle)) for index, handle in enumerate(handles)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for handle in handles:
        handle.close()
    return results


def _shared_journal_with_uploaded_batch(url: str) -> tuple[PostgresJournal, str]:
    journal = PostgresJournal(url)
    batch_id = str(ULID())
    journal.init_batch(batch_id, source_root="/src", bucket="b", prefix="staging/", part_size=8 * MiB)
    journal.set_batch_state(batch_id, BatchState.UPLOADING)
    journal.add_files(batch_id, [NewFile(f"f{i}", f"staging/{batch_id}/files/f{i}", 1, 1) for i in range(3)])
    journal.complete_files(batch_id, [(f"f{i}", "ab" * 32, "e") for i in range(3)])
    journal.mark_scan_complete(batch_id)
    worker = "setup"
    journal.register_worker(batch_id, worker, 60)
    while (claim := journal.claim_chunk(batch_id, worker, 60)) is not None:
        journal.finish_chunk(batch_id, claim.chunk_no, worker)
    journal.bind_worker(None)
    return journal, batch_id


def test_two_hosts_racing_to_finalize_exactly_one_wins_fifty_times(pg_url: str) -> None:
    wins: list[int] = []
    for _ in range(50):
        setup, batch_id = _shared_journal_with_uploaded_batch(pg_url)
        setup.close()
        results = together([PostgresJournal(pg_url) for _ in range(2)],
                           lambda index, handle: handle.claim_finalize(batch_id, f"host{index}", 30))
        wins.append(results.count(True))
    assert wins == [1] * 50


def test_a_host_whose_lease_ran_out_is_fenced(pg_url: str) -> None:
    """Host A claims a chunk and goes silent; its lease runs out; B takes the chunk. A's late
    completion is refused (LeaseLost), and B's is recorded."""
    journal_a, journal_b = PostgresJournal(pg_url), PostgresJournal(pg_url)
    try:
        batch_id = str(ULID())
        journal_a.init_batch(batch_id, source_root="/src", bucket="b", prefix="staging/", part_size=8 * MiB)
        journal_a.add_files(batch_id, [NewFile("f", f"staging/{batch_id}/files/f", 1, 1)])
        journal_a.register_worker(batch_id, "A", 0.2)
        journal_b.register_worker(batch_id, "B", 30)
        claim_a = journal_a.claim_chunk(batch_id, "A", 0.2)
        assert claim_a is not None
        assert journal_b.claim_chunk(batch_id, "B", 30) is None  # A's lease holds
        claim_b = None
        for _ in range(200):  # bounded: the 0.2 s lease runs out in the database's clock
            claim_b = journal_b.claim_chunk(batch_id, "B", 30)
            if claim_b is not None:
                break
            threading.Event().wait(0.02)
        assert claim_b is not None and claim_b.earlier_claims == 1
        with pytest.raises(LeaseLost):
            journal_a.complete_files(batch_id, [("f", "ab" * 32, "etag-a")])
        with pytest.raises(LeaseLost):
            journal_a.start_file(batch_id, "f")
        assert journal_b.complete_files(batch_id, [("f", "cd" * 32, "etag-b")]) == []
        record = journal_b.get_file(batch_id, "f")
        assert (record.state, record.etag) == (FileState.UPLOADED, "etag-b")
    finally:
        journal_a.close()
        journal_b.close()


def test_a_new_batch_id_for_a_source_with_an_unfinished_batch_is_refused(pg_url: str, moto_endpoint: str,
                                                                         bucket: str, tree) -> None:  # type: ignore[no-untyped-def]
    source, _ = tree
    first = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    code, _, err = first.run("--no-finalize")
    assert code == 0, err
    typo = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    code, report, err = typo.run()
    assert code == 2
    assert first.batch_id in str(report["error"]) and "unfinished" in str(report["error"])


def test_a_host_with_another_tree_is_refused_before_it_claims(pg_url: str, moto_endpoint: str, bucket: str,
                                                             tree, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, _ = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    code, _, err = hosts.run("--no-finalize")
    assert code == 0, err
    other = tmp_path / "other"
    make_tree(other, small=10, large=0, seed=99)
    code, report, _ = hosts.run("--source-root", str(other))
    assert code == 2
    assert "not the" in str(report["error"])
    journal = PostgresJournal(pg_url)
    try:
        first, refused = journal.list_workers(hosts.batch_id)
        assert first.files_done and (refused.files_done, refused.bytes_done) == (0, 0)
        assert journal.get_state(hosts.batch_id, 0).counts[FileState.UPLOADING] == 0
        assert journal.get_batch(hosts.batch_id).state is not BatchState.ENQUEUED
    finally:
        journal.close()


def test_the_password_of_the_journal_url_never_shows(pg_server, moto_endpoint: str, bucket: str, s3,
                                                    tree, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The canary test for the shared journal: a URL with a password (trust authentication
    here ignores it, so the runs work). The most talkative run there is (-vvv, a log file),
    then status, list and a finalize; neither their output, the log, any row of the journal
    nor any object or metadata in the bucket carries the password."""
    source, _ = tree
    url = pg_server.create_database()
    canary = "canaryPgPassword7f3a91"
    with_password = url.replace("archup@", f"archup:{canary}@")
    # A long lease: -vvv logs every request, which slows this process down for seconds at a time.
    hosts = Hosts(with_password, moto_endpoint, bucket, source, str(ULID()), lease=60)
    log_file = tmp_path / "archup.log"
    loud = hosts.command("--no-finalize")
    loud[3:3] = ["-vvv", "--log-file", str(log_file)]
    proc = subprocess.run(loud, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = [proc.stdout, proc.stderr]
    for command in (["status", hosts.batch_id], ["list"], ["finalize", hosts.batch_id]):
        run = subprocess.run([sys.executable, "-m", "archup", *command, "--journal", with_password, "--json"],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "ARCHUP_ENDPOINT_URL": moto_endpoint})
        assert run.returncode == 0, run.stderr
        outputs += [run.stdout, run.stderr]
    assert any("postgresql://archup@127.0.0.1" in text for text in outputs)  # the journal is named, bare
    stored = {str(log_file): log_file.read_bytes()}
    journal = PostgresJournal(url)
    try:
        for table in ("batches", "files", "parts", "chunks", "workers", "archive_sources", "archived"):
            rows = journal.db.query(f"SELECT * FROM {table}")
            stored[f"journal table {table}"] = json.dumps(rows, default=str).encode()
    finally:
        journal.close()
    for item in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        stored[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        stored[item["Key"] + " (metadata)"] = json.dumps(s3.head_object(Bucket=bucket, Key=item["Key"])["Metadata"]).encode()
    assert any(key.endswith("manifest.json") for key in stored)
    for text in outputs:
        assert canary not in text
    for where, data in stored.items():
        assert canary.encode() not in data, f"the password is in {where}"


def test_an_unreachable_journal_is_named_without_its_password() -> None:
    from archup.errors import JournalUnavailable

    canary = "canaryUnreachable42"
    with pytest.raises(JournalUnavailable) as caught:
        PostgresJournal(f"postgresql://archup:{canary}@127.0.0.1:1/archup?connect_timeout=2", retry_for=0.5)
    assert canary not in str(caught.value)
    assert "postgresql://archup@127.0.0.1:1/archup" in str(caught.value)

def test_a_host_cut_off_from_the_database_is_fenced_and_the_batch_stays_correct(
        pg_server, pg_url: str, moto_endpoint: str, bucket: str, s3, tree) -> None:  # type: ignore[no-untyped-def]
    """Host A reaches the database through a proxy that stops forwarding (a partition) once A
    holds claims; A stops sending at half its lease; B takes A's chunks once the lease runs
    out and seals the batch. Healed, A's late writes are refused by the fence: A exits 3 and
    the record is exactly the files, byte-identical."""
    from tcpproxy import TcpProxy

    source, files = tree
    batch_id = str(ULID())
    proxy = TcpProxy("127.0.0.1", int(pg_url.rsplit(":", 1)[1].split("/", 1)[0])).start()
    try:
        via_proxy = pg_url.replace(f":{pg_server.port}/", f":{proxy.port}/")
        host_a = Hosts(via_proxy, moto_endpoint, bucket, source, batch_id, lease=2.0)
        host_b = Hosts(pg_url, moto_endpoint, bucket, source, batch_id, lease=2.0)
        # --bwlimit keeps A busy long enough to be cut while it holds claims.
        proc_a = host_a.start("--bwlimit", "2MiB")
        journal = PostgresJournal(pg_url)
        try:
            for _ in range(600):  # bounded poll: until A has recorded some files
                if journal.find_batch(batch_id) and journal.get_state(batch_id, 0).counts[FileState.UPLOADED]:
                    break
                threading.Event().wait(0.05)
            proxy.cut()
            code_b, summary, err_b = host_b.run()
            assert code_b == 0, err_b
            assert summary["files_uploaded"] == len(files)
            assert proc_a.poll() is None  # A is still cut off, its calls hanging
        finally:
            journal.close()
        proxy.heal()
        out_a, err_a = proc_a.communicate(timeout=120)
        assert proc_a.returncode == 3, err_a
        assert "lease" in err_a
    finally:
        proxy.close()
    check_record(s3, bucket, batch_id, files)


def test_a_batch_with_a_failed_file_ends_partial_on_every_host_and_a_rerun_seals_it(
        pg_url: str, moto_endpoint: str, bucket: str, s3, tree) -> None:  # type: ignore[no-untyped-def]
    """The first host scans, then dies at its first PutObject; a file vanishes; two hosts send
    the rest. Every host exits 3 with the same resume command; restored, one rerun seals it."""
    source, files = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    first = hosts.start(env={"ARCHUP_CRASH_AT": "before-put-object"})
    first.communicate(timeout=120)
    assert first.returncode == -signal.SIGKILL
    victim = sorted(files)[-1]  # last in key order: not among the files a host checks before it claims
    body = (source / victim).read_bytes()
    (source / victim).unlink()
    procs = [hosts.start() for _ in range(2)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 3, err
        reports.append(json.loads(out))
        assert "files_failed" in reports[-1], reports[-1]
    assert {r["files_failed"] for r in reports} == {1}
    assert len({r["resume"] for r in reports}) == 1 and hosts.batch_id in reports[0]["resume"]
    (source / victim).write_bytes(body)
    code, summary, err = hosts.run()
    assert code == 0, err
    assert summary["files_uploaded"] == len(files)
    check_record(s3, bucket, hosts.batch_id, files)


def test_a_host_that_mounts_the_tree_elsewhere_maps_it_with_source_root(
        pg_url: str, moto_endpoint: str, bucket: str, s3, tree, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, files = tree
    mount = tmp_path / "elsewhere"
    mount.symlink_to(source, target_is_directory=True)  # the same tree at another path
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    procs = [hosts.start(), hosts.start("--source-root", str(mount))]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert json.loads(out)["files_uploaded"] == len(files)
    check_record(s3, bucket, hosts.batch_id, files)


def test_a_dead_host_is_taken_over_within_its_lease(pg_url: str, moto_endpoint: str, bucket: str,
                                                    tree) -> None:  # type: ignore[no-untyped-def]
    """Killed while it holds a chunk: its claim runs out at most one lease (2 s) after its last
    heartbeat, in the database's clock, and the next claim after that takes the chunk."""
    source, _ = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()), lease=2.0)
    proc = hosts.start("--bwlimit", "1MiB")
    journal = PostgresJournal(pg_url)
    try:
        owner = None
        for _ in range(600):  # bounded poll: until the host holds a chunk
            if journal.find_batch(hosts.batch_id):
                rows = journal.db.query("SELECT chunk_no, owner FROM chunks WHERE batch_id = %s AND owner IS NOT NULL "
                                        "AND NOT done", (hosts.batch_id,))
                if rows:
                    owner = rows[0]
                    break
            threading.Event().wait(0.05)
        assert owner is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = journal.db.query("SELECT now() AS t")[0]["t"]
        lease_end = journal.db.query("SELECT lease_until, (lease_until - %s) AS left FROM chunks WHERE batch_id = %s "
                                     "AND chunk_no = %s", (killed_at, hosts.batch_id, owner["chunk_no"]))[0]
        assert lease_end["left"].total_seconds() <= 2.0  # detected: at most one lease after the last renewal
        journal.register_worker(hosts.batch_id, "taker", 30)
        claim = None
        for _ in range(400):  # bounded: the lease runs out in the database's clock
            claim = journal.claim_chunk(hosts.batch_id, "taker", 30)
            if claim is not None and claim.chunk_no == owner["chunk_no"]:
                break  # (the free chunks come first; the dead host's once its lease ran out)
            if claim is None:
                threading.Event().wait(0.02)
        assert claim is not None and claim.chunk_no == owner["chunk_no"] and claim.earlier_claims >= 1
        taken_at = journal.db.query("SELECT now() AS t")[0]["t"]
        assert taken_at >= lease_end["lease_until"]  # never before the dead host's lease ran out
    finally:
        journal.close()


def test_reset_file_reopens_a_done_chunk_and_leaves_a_held_one_to_its_holder(pg_url: str) -> None:
    """Finalize's read-back resets a file of a done chunk: any host may claim it again. A sender
    starting a lost upload over resets a file of the chunk it holds: the chunk stays its own."""
    journal = PostgresJournal(pg_url)
    try:
        batch_id = str(ULID())
        journal.init_batch(batch_id, source_root="/src", bucket="b", prefix="staging/", part_size=8 * MiB)
        journal.add_files(batch_id, [NewFile("f", f"staging/{batch_id}/files/f", 1, 1)])
        journal.register_worker(batch_id, "A", 30)
        claim = journal.claim_chunk(batch_id, "A", 30)
        assert claim is not None
        journal.start_file(batch_id, "f")
        journal.reset_file(batch_id, "f", "restarted after an interrupted run")
        journal.start_file(batch_id, "f")  # fenced: still A's chunk
        journal.complete_file(batch_id, "f", sha256="ab" * 32, etag="e")
        assert journal.finish_chunk(batch_id, claim.chunk_no, "A")
        journal.bind_worker(None)
        journal.reset_file(batch_id, "f", "object missing from the bucket")
        journal.register_worker(batch_id, "B", 30)
        again = journal.claim_chunk(batch_id, "B", 30)
        assert again is not None and again.chunk_no == claim.chunk_no
        assert [r.rel_path for r in journal.chunk_files(batch_id, again.chunk_no)] == ["f"]
    finally:
        journal.close()


def test_hosts_starting_a_plain_upload_together_create_one_batch(pg_url: str) -> None:
    """No --batch: the check for an unfinished batch of the source and the insert are one
    transaction under an advisory lock, so of eight hosts racing, one creates and seven join."""
    from archup.errors import BatchExists

    created: list[str] = []
    joined: list[str] = []

    def start(_index: int, handle: PostgresJournal) -> None:
        try:
            created.append(handle.init_batch(str(ULID()), source_root="/src", bucket="b", prefix="staging/",
                                             part_size=8 * MiB, unless_unfinished=True).batch_id)
        except BatchExists as exists:
            joined.append(exists.existing)

    together([PostgresJournal(pg_url) for _ in range(8)], start)
    assert len(created) == 1 and joined == created * 7


def _archup(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "archup", *args], capture_output=True, text=True, timeout=timeout)


def test_status_shows_the_workers_and_gc_frees_a_dead_hosts_claims(pg_url: str, moto_endpoint: str,
                                                                   bucket: str) -> None:
    """A host that died holding a chunk: status marks its lease expired; gc gives its claim
    back and leaves the batch alone while another host still renews its lease."""
    journal = PostgresJournal(pg_url)
    try:
        batch_id = str(ULID())
        journal.init_batch(batch_id, source_root="/src", bucket=bucket, prefix="staging/", part_size=8 * MiB,
                           endpoint_url=moto_endpoint)
        journal.add_files(batch_id, [NewFile(f"f{i}", f"staging/{batch_id}/files/f{i}", 1, 1) for i in range(40)])
        journal.register_worker(batch_id, "dead-host-worker", 0.2)
        assert journal.claim_chunk(batch_id, "dead-host-worker", 0.2) is not None
        live = PostgresJournal(pg_url)
        live.register_worker(batch_id, "live-host-worker", 60)
        for _ in range(200):  # bounded: until the dead worker's 0.2 s lease ran out
            if any(w.lease_expired for w in journal.list_workers(batch_id)):
                break
            threading.Event().wait(0.02)

        status = _archup("status", batch_id, "--journal", pg_url, "--json")
        assert status.returncode == 0, status.stderr
        workers = json.loads(status.stdout)["workers"]
        assert sorted(w["lease_expired"] for w in workers) == [False, True]
        text = _archup("status", batch_id, "--journal", pg_url)
        assert "LEASE EXPIRED" in text.stdout and "working" in text.stdout

        gc = _archup("gc", "--journal", pg_url, "--older-than", "0s", "--endpoint-url", moto_endpoint, "--json")
        assert gc.returncode == 0, gc.stderr
        report = json.loads(gc.stdout)
        assert report["claims_expired"] == 1
        assert report["busy"] == [batch_id] and report["expired"] == []  # a live host still works on it
        assert journal.db.query("SELECT count(*) AS n FROM chunks WHERE batch_id = %s AND owner IS NOT NULL",
                                (batch_id,))[0]["n"] == 0
        live.close()
    finally:
        journal.close()


def test_abort_and_list_work_on_the_shared_journal(pg_url: str, moto_endpoint: str, bucket: str, s3,
                                                   tree) -> None:  # type: ignore[no-untyped-def]
    """list shows the shared journal's batches; abort ends one (its multipart uploads aborted)
    with no OS lock to take, and a host joining it afterwards is refused."""
    source, _ = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, source, str(ULID()))
    code, _, err = hosts.run("--no-finalize")
    assert code == 0, err
    listed = _archup("list", "--journal", pg_url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [b["batch_id"] for b in json.loads(listed.stdout)["batches"]] == [hosts.batch_id]
    aborted = subprocess.run([sys.executable, "-m", "archup", "abort", hosts.batch_id, "--journal", pg_url, "--json"],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "ARCHUP_ENDPOINT_URL": moto_endpoint})
    assert aborted.returncode == 0, aborted.stderr
    assert json.loads(aborted.stdout)["state"] == "aborted"
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    code, report, _ = hosts.run()
    assert code != 0 and "aborted" in str(report["error"])


def test_a_host_with_only_its_own_mount_point_scans_and_seals_the_batch(
        pg_url: str, moto_endpoint: str, bucket: str, s3, tree) -> None:  # type: ignore[no-untyped-def]
    """The batch's source as every host names it (DIR) does not exist on this host: it has the
    tree at --source-root only. It creates the batch, walks its own mount, reads, seals."""
    source, files = tree
    hosts = Hosts(pg_url, moto_endpoint, bucket, Path("/mnt/shared/exports-not-on-this-host"), str(ULID()))
    code, summary, err = hosts.run("--source-root", str(source))
    assert code == 0, err
    assert summary["files_uploaded"] == len(files)
    journal = PostgresJournal(pg_url)
    try:
        assert journal.get_batch(hosts.batch_id).source_root == "/mnt/shared/exports-not-on-this-host"
    finally:
        journal.close()
    check_record(s3, bucket, hosts.batch_id, files)
