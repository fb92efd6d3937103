#!/usr/bin/env python3
"""The shared journal (PostgreSQL) under load: file transitions per second, round trips per file.

Starts its own PostgreSQL server on 127.0.0.1 with durable settings (fsync, full page writes,
synchronous commit: as a user runs it), in a temporary directory, and stops it at the end.

``transitions``: a batch of --files files (added as the scan adds them, in groups of 5,000),
then C claimers (threads spread over --processes processes, each claimer a worker of its own)
that do what the upload path does for small files: claim a chunk, read its files, complete
them in groups of --group (as the completion writer commits), finish the chunk; until no
chunk is left. Reports transitions per second (a file pending -> uploaded is one) over the
whole batch and over its last tenth (where a queue that rescans dead entries slows down),
and the client's round trips per file (each statement one, plus BEGIN and COMMIT).

``upload``: a real ``archup upload`` of --files small files against a moto server, its
journal on this PostgreSQL server; counts the journal round trips of the whole run per file.

``takeover``: two hosts on one batch through a counting proxy in front of moto; one is killed
part way; the bytes the server received beyond the dataset's, against one lease's worth of
the killed host's work.

    .venv/bin/python scripts/bench_shared.py transitions --files 10000,1000000 --claimers 16,64 --rounds 3
    .venv/bin/python scripts/bench_shared.py upload --files 2000
    .venv/bin/python scripts/bench_shared.py takeover --lease 10 --bwlimit 8MiB --kill-after 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # pgserver.py: the tests' server launcher
sys.path.insert(0, str(ROOT))

DURABLE = (("fsync", "on"), ("synchronous_commit", "on"), ("full_page_writes", "on"),
           ("max_connections", "300"), ("shared_buffers", "2GB"))

COUNTER_PATCH = '''
import psycopg, atexit, os, json
_counts = {"statements": 0, "transactions": 0}
_execute = psycopg.Connection.execute
def execute(self, *args, **kwargs):
    _counts["statements"] += 1
    return _execute(self, *args, **kwargs)
psycopg.Connection.execute = execute
_transaction = psycopg.Connection.transaction
def transaction(self, *args, **kwargs):
    _counts["transactions"] += 1
    return _transaction(self, *args, **kwargs)
psycopg.Connection.transaction = transaction
@atexit.register
def _report():
    with open(os.environ["ARCHUP_BENCH_COUNTS"], "a") as out:
        out.write(json.dumps(_counts) + "\\n")
'''


def install_counter() -> dict[str, int]:
    namespace: dict[str, object] = {}
    os.environ.setdefault("ARCHUP_BENCH_COUNTS", os.devnull)
    exec(COUNTER_PATCH, namespace)
    return namespace["_counts"]  # type: ignore[return-value]


def round_trips(counts: dict[str, int]) -> int:
    # A transaction adds BEGIN and COMMIT to its statements; reads outside one are one each.
    return counts["statements"] + 2 * counts["transactions"]


def fill(url: str, files: int) -> str:
    from ulid import ULID

    from archup.journal import NewFile
    from archup.journal.postgres import PostgresJournal
    from archup.states import BatchState

    journal = PostgresJournal(url)
    batch_id = str(ULID())
    journal.init_batch(batch_id, source_root="/bench", bucket="bench", prefix="staging/", part_size=8 << 20)
    journal.set_batch_state(batch_id, BatchState.UPLOADING)
    group = 5000
    for start in range(0, files, group):
        journal.add_files(batch_id, [NewFile(f"d{i // 1000:05d}/f{i:08d}", f"staging/{batch_id}/files/d{i // 1000:05d}/"
                                             f"f{i:08d}", 100, 1) for i in range(start, min(files, start + group))])
    journal.mark_scan_complete(batch_id)
    # Steady state, as a long scan leaves it: statistics gathered and the insert's WAL checkpointed
    # (otherwise the first claims meet a planner that thinks the table is empty, and the
    # checkpoint of a million inserts lands in the middle of the measurement).
    journal.db.run(lambda conn: [conn.execute(sql) for sql in ("VACUUM (ANALYZE) files", "VACUUM (ANALYZE) chunks",
                                                                  "CHECKPOINT")], write=False)
    journal.close()
    return batch_id


def claimers(url: str, batch_ids: list[str], threads: int, group: int, stamps: multiprocessing.Queue,  # type: ignore[type-arg]
             ready: multiprocessing.Queue, go: threading.Event) -> None:  # type: ignore[type-arg]
    from archup.journal.postgres import PostgresJournal

    counts = install_counter()
    done_at: list[float] = []
    lock = threading.Lock()
    journals = []
    for index in range(threads):  # connected and registered before the clock starts
        journal = PostgresJournal(url, max_connections=2)
        for batch_id in batch_ids:
            journal.register_worker(batch_id, f"bench-{os.getpid()}-{index}-{batch_id}", 60)
        journals.append(journal)
    counts["statements"] = counts["transactions"] = 0
    ready.put(os.getpid())
    go.wait()

    def claimer(index: int) -> None:
        journal = journals[index]
        for batch_id in batch_ids:  # several batches: one after another, as the claimers run out of each
            worker = f"bench-{os.getpid()}-{index}-{batch_id}"
            journal.bind_worker(worker)
            while (claim := journal.claim_chunk(batch_id, worker, 60)) is not None:
                records = journal.chunk_files(batch_id, claim.chunk_no)
                for start in range(0, len(records), group):
                    part = records[start:start + group]
                    journal.complete_files(batch_id, [(r.rel_path, "ab" * 32, "etag") for r in part])
                    now = time.monotonic()
                    with lock:
                        done_at.extend([now] * len(part))
                journal.finish_chunk(batch_id, claim.chunk_no, worker)
        journal.close()

    pool = [threading.Thread(target=claimer, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    stamps.put((done_at, dict(counts)))


def run_transitions(url: str, files: int, total_claimers: int, processes: int, group: int,
                    batches: int = 1) -> dict[str, float]:
    batch_ids = [fill(url, files) for _ in range(batches)]
    context = multiprocessing.get_context("spawn")
    stamps: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    ready: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    go = context.Event()
    per = [total_claimers // processes + (1 if i < total_claimers % processes else 0) for i in range(processes)]
    procs = [context.Process(target=claimers, args=(url, batch_ids, n, group, stamps, ready, go)) for n in per if n]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get()
    started = time.monotonic()
    go.set()
    results = [stamps.get() for _ in procs]
    for proc in procs:
        proc.join()
    ended = time.monotonic()
    times = sorted(t for done, _ in results for t in done)
    total = files * batches
    assert len(times) == total, (len(times), total)
    last_tenth = times[int(total * 0.9):]
    trips = sum(round_trips(counts) for _, counts in results)
    return {"files": files, "batches": batches, "claimers": total_claimers, "seconds": ended - started,
            "transitions_per_s": total / (ended - started),
            "last_tenth_per_s": len(last_tenth) / max(last_tenth[-1] - last_tenth[0], 1e-9),
            "round_trips_per_file": trips / total}


def transitions(args: argparse.Namespace) -> None:
    """Rounds interleave the sizes (and claimer counts), so a size's ratio to the smallest is
    taken within one round: the median of those same-round ratios is the figure to trust."""
    from pgserver import PostgresServer

    sizes = [int(f) for f in args.files.split(",")]
    counts = [int(c) for c in args.claimers.split(",")]
    runs: dict[tuple[int, int], list[dict[str, float]]] = {(f, c): [] for f in sizes for c in counts}
    with PostgresServer(settings=DURABLE) as server:
        for _ in range(args.warmup):
            # A new server creates (and zero-fills) its WAL segments during its first big run,
            # which halves that run's rate; a server that has run a while recycles them. So one
            # run of the largest size first, not counted.
            url = server.create_database()
            print(json.dumps({"warmup": run_transitions(url, max(sizes), counts[0], args.processes, args.group)}),
                  flush=True)
            server.drop_database(url)
        for _ in range(args.rounds):
            for files in sizes:
                for total in counts:
                    url = server.create_database()
                    # A small batch is over in a fraction of a second: several, back to back, make
                    # a measurement of 100,000 transitions or more.
                    batches = max(1, -(-100_000 // files))
                    run = run_transitions(url, files, total, args.processes, args.group, batches)
                    runs[(files, total)].append(run)
                    server.drop_database(url)
                    print(json.dumps(run), flush=True)
    print("\n| files in the batch | batches | claimers | transitions/s (whole run) | transitions/s (last tenth) "
          "| round trips per file | same-round ratio to the smallest batch |")
    print("|---|---|---|---|---|---|---|")
    for (files, total), done in runs.items():
        row = {key: statistics.median(run[key] for run in done) for key in done[0]}
        base = runs[(sizes[0], total)]
        ratio = statistics.median(run["transitions_per_s"] / first["transitions_per_s"]
                                  for run, first in zip(done, base))
        print(f"| {files:,} | {int(row['batches'])} | {total} | {row['transitions_per_s']:,.0f} | "
              f"{row['last_tenth_per_s']:,.0f} | {row['round_trips_per_file']:.3f} | {ratio:.2f} |")


def upload(args: argparse.Namespace) -> None:
    """A real run: archup upload of small files, the journal on PostgreSQL, round trips counted."""
    import random

    from moto.server import ThreadedMotoServer
    from pgserver import PostgresServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket="bench")
    with tempfile.TemporaryDirectory() as tmp, PostgresServer(settings=DURABLE) as server:
        rng = random.Random(1)
        source = Path(tmp) / "src"
        for i in range(args.files):
            path = source / f"d{i % 50}" / f"f{i:06d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(4096))
        counts_file = Path(tmp) / "counts.jsonl"
        for _ in range(args.rounds):
            url = server.create_database()
            code = (f"import sys; sys.argv = ['archup'] + {json.dumps(['upload', '--journal', url, '--bucket', 'bench'])}"
                    f" + sys.argv[1:]; exec({COUNTER_PATCH!r}); from archup.cli import main; main()")
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", code, "--endpoint-url", endpoint, "--parallel", str(args.parallel),
                            "--json", "--new-batch", str(source)], check=True, capture_output=True,
                           env={**env, "ARCHUP_BENCH_COUNTS": str(counts_file)})
            elapsed = time.monotonic() - started
            counts = json.loads(counts_file.read_text().splitlines()[-1])
            print(json.dumps({"files": args.files, "seconds": elapsed, "statements": counts["statements"],
                              "transactions": counts["transactions"],
                              "round_trips_per_file": round_trips(counts) / args.files}), flush=True)
            server.drop_database(url)
    moto.stop()


def takeover(args: argparse.Namespace) -> None:
    """Two hosts, one killed (SIGKILL) part way: the bytes the server received for file objects
    (PutObject, UploadPart) beyond the dataset's are what was sent again; compared with one
    lease's worth of the killed host's work (its rate times the lease)."""
    import random
    import signal

    import boto3
    from faultproxy import FaultProxy
    from moto.server import ThreadedMotoServer
    from pgserver import PostgresServer
    from ulid import ULID

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1", aws_access_key_id="bench",
                 aws_secret_access_key="bench").create_bucket(Bucket="bench")
    rng = random.Random(3)
    with tempfile.TemporaryDirectory() as tmp, PostgresServer(settings=DURABLE) as server, \
            FaultProxy(f"http://{host}:{port}") as proxy:
        source = Path(tmp) / "src"
        total = 0
        for i in range(args.small):
            body = rng.randbytes(args.small_size)
            (source / f"d{i % 8}").mkdir(parents=True, exist_ok=True)
            (source / f"d{i % 8}" / f"f{i:04d}").write_bytes(body)
            total += len(body)
        for i in range(args.large):
            body = rng.randbytes(args.large_size)
            (source / "big").mkdir(parents=True, exist_ok=True)
            (source / "big" / f"b{i}").write_bytes(body)
            total += len(body)
        for round_no in range(args.rounds):
            url = server.create_database()
            batch_id = str(ULID())
            before = proxy.snapshot().bytes_forwarded
            command = [sys.executable, "-m", "archup", "upload", "--journal", url, "--bucket", "bench",
                       "--endpoint-url", proxy.url, "--batch", batch_id, "--parallel", str(args.parallel),
                       "--lease", str(args.lease), "--bwlimit", args.bwlimit, "--json", str(source)]
            victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            other = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(args.kill_after)  # a benchmark's fixed point in the run, not a wait for a condition
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            out, _ = other.communicate(timeout=900)
            assert other.returncode == 0, out
            after = proxy.snapshot().bytes_forwarded
            sent = sum(after[op] - before.get(op, 0) for op in ("PutObject", "UploadPart"))
            rate = parse_rate(args.bwlimit)
            from archup.journal.postgres import PostgresJournal

            journal = PostgresJournal(url)
            workers = {w.pid: w for w in journal.list_workers(batch_id)}
            journal.close()
            killed = workers.get(victim.pid)
            print(json.dumps({"round": round_no, "dataset_bytes": total, "bytes_received": sent,
                              "killed_host_bytes_at_its_last_heartbeat": killed.bytes_done if killed else None,
                              "sent_again": sent - total, "one_lease_of_the_killed_host": rate * args.lease,
                              "ratio": (sent - total) / (rate * args.lease)}), flush=True)
            server.drop_database(url)
    moto.stop()


def parse_rate(text: str) -> int:
    units = {"KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * factor)
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transitions")
    t.add_argument("--files", default="10000,1000000")
    t.add_argument("--claimers", default="16,64")
    t.add_argument("--processes", type=int, default=4)
    t.add_argument("--group", type=int, default=100, help="completions committed per transaction")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--warmup", type=int, default=1, help="runs of the largest size first, not counted")
    u = sub.add_parser("upload")
    u.add_argument("--files", type=int, default=2000)
    u.add_argument("--parallel", type=int, default=16)
    u.add_argument("--rounds", type=int, default=3)
    k = sub.add_parser("takeover")
    k.add_argument("--small", type=int, default=48)
    k.add_argument("--small-size", type=int, default=2 * 1024 * 1024)
    k.add_argument("--large", type=int, default=2)
    k.add_argument("--large-size", type=int, default=40 * 1024 * 1024)
    k.add_argument("--parallel", type=int, default=4)
    k.add_argument("--lease", type=float, default=10.0)
    k.add_argument("--bwlimit", default="8MiB")
    k.add_argument("--kill-after", type=float, default=4.0)
    k.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    {"transitions": transitions, "upload": upload, "takeover": takeover}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
