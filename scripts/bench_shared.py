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

``transitions --profile DIR`` also watches the server during each run: its wait events (every
active session in pg_stat_activity, sampled from a connection of its own), the files table's
dead rows and vacuums, checkpoints and WAL, and a sample of the statements' plans with their
buffers (auto_explain); autovacuum and checkpoints are logged. The samples and the server's log
go to DIR; a summary per tenth of each run's transitions is printed:

    .venv/bin/python scripts/bench_shared.py transitions --files 1000000 --claimers 16 --rounds 1 --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # pgserver.py: the tests' server launcher
sys.path.insert(0, str(ROOT))

DURABLE = (("fsync", "on"), ("synchronous_commit", "on"), ("full_page_writes", "on"),
           ("max_connections", "300"), ("shared_buffers", "2GB"))

# --profile: what the server logs besides. A plan for one statement in PLAN_SAMPLE (with its
# buffers and row counts; only a sampled statement is instrumented, so the others run as usual).
PLAN_SAMPLE = 0.005
PROFILE = (("log_autovacuum_min_duration", "0"), ("log_checkpoints", "on"),
           ("log_line_prefix", "%m [%p] %a "), ("log_timezone", "UTC"), ("session_preload_libraries", "auto_explain"),
           ("auto_explain.log_min_duration", "0"), ("auto_explain.sample_rate", str(PLAN_SAMPLE)),
           ("auto_explain.log_analyze", "on"), ("auto_explain.log_buffers", "on"),
           ("auto_explain.log_timing", "on"))

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


# What a session is doing, from the start of its statement (the benchmark's own statements).
STATEMENT_KINDS = (("WITH b AS (SELECT state FROM batches", "complete"), ("UPDATE chunks c SET owner", "claim"),
                   ("UPDATE chunks SET done", "finish"), ("SELECT ", "read"), ("COMMIT", "commit"),
                   ("BEGIN", "begin"))
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[(\d+)\] (\S*) ?(\w+):  (.*)$")


def statement_kind(query: str) -> str:
    return next((kind for start, kind in STATEMENT_KINDS if query.startswith(start)), query[:30])


class Profiler:
    """The server seen from outside during one run: pg_stat_activity every SAMPLE_EVERY seconds
    (each active session's wait event, or CPU when it waits on nothing), the files table's
    counters, checkpoints and WAL every second; the server's log of the run (autovacuum,
    checkpoints, sampled plans). Written to the directory, summarized per tenth of the run."""

    SAMPLE_EVERY = 0.1

    def __init__(self, directory: Path, log_path: Path) -> None:
        self.directory = directory
        self.log_path = log_path
        directory.mkdir(parents=True, exist_ok=True)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._runs = 0

    def start(self, url: str) -> None:
        self._log_offset = self.log_path.stat().st_size
        # Log lines carry the wall clock; the claimers' stamps are monotonic.
        self._wall_minus_monotonic = time.time() - time.monotonic()
        self._activity: list[tuple[float, list[tuple[str, str, str, str]]]] = []
        self._counters: list[tuple[float, dict[str, Any]]] = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, args=(url,), daemon=True)
        self._thread.start()

    def _sample(self, url: str) -> None:
        import psycopg

        with psycopg.connect(url, autocommit=True, application_name="bench-profile") as conn:
            dbname = conn.info.dbname
            last_counters = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                rows = conn.execute(
                    "SELECT backend_type, coalesce(wait_event_type, 'CPU'), coalesce(wait_event, 'CPU'), "
                    "state, left(query, 60) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
                    "(datname = %s OR datname IS NULL) AND (state IN ('active', 'idle in transaction') "
                    "OR backend_type NOT IN ('client backend', 'walsender')) AND "
                    "coalesce(wait_event_type, '') <> 'Activity'", (dbname,)).fetchall()
                self._activity.append((now, [(backend, f"{wait_type}:{wait}", state or "",
                                              query if backend == "autovacuum worker" else statement_kind(query))
                                             for backend, wait_type, wait, state, query in rows]))
                if now - last_counters >= 1.0:
                    last_counters = now
                    row = conn.execute(
                        "SELECT t.n_live_tup, t.n_dead_tup, t.n_tup_upd, t.n_tup_hot_upd, t.autovacuum_count, "
                        "t.autoanalyze_count, b.checkpoints_timed + b.checkpoints_req AS checkpoints, "
                        "w.wal_bytes::bigint AS wal_bytes, w.wal_fpi, "
                        "(SELECT string_agg(p.phase || ' ' || p.heap_blks_scanned || '/' || p.heap_blks_total, ',') "
                        " FROM pg_stat_progress_vacuum p WHERE p.relid = t.relid) AS vacuum "
                        "FROM pg_stat_user_tables t, pg_stat_bgwriter b, pg_stat_wal w "
                        "WHERE t.schemaname = 'archup' AND t.relname = 'files'").fetchone()
                    names = ("live", "dead", "updated", "hot_updated", "autovacuums", "autoanalyzes", "checkpoints",
                             "wal_bytes", "wal_fpi", "vacuum")
                    self._counters.append((now, dict(zip(names, row or ()))))
                self._stop.wait(self.SAMPLE_EVERY)

    def stop(self, name: str, started: float, times: list[float]) -> None:
        self._runs += 1
        name = f"{self._runs:02d}-{name}"  # one set of files per run
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            text = log.read().decode(errors="replace")
        (self.directory / f"{name}.server.log").write_text(text)
        with (self.directory / f"{name}.activity.jsonl").open("w") as out:
            for at, sessions in self._activity:
                out.write(json.dumps({"t": round(at - started, 3), "sessions": sessions}) + "\n")
        with (self.directory / f"{name}.counters.jsonl").open("w") as out:
            for at, counters in self._counters:
                out.write(json.dumps({"t": round(at - started, 3), **counters}, default=str) + "\n")
        print(f"\nprofile of {name} (files in {self.directory}):")
        self.summarize(started, times, text)

    def _log_entries(self, text: str, started: float) -> list[tuple[float, str, str]]:
        """(seconds since the run's start, level, message with its continuation lines)."""
        import datetime

        entries: list[tuple[float, str, str]] = []
        for line in text.splitlines():
            match = LOG_LINE.match(line)
            if match is None:
                if entries:
                    at, level, message = entries[-1]
                    entries[-1] = (at, level, message + "\n" + line)
                continue
            stamp = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
            entries.append((stamp.timestamp() - self._wall_minus_monotonic - started, match[4], match[5]))
        return entries

    def summarize(self, started: float, times: list[float], text: str) -> None:
        total = len(times)
        edges = [0.0] + [times[min(total - 1, total * k // 10)] - started for k in range(1, 10)] + [times[-1] - started]
        entries = self._log_entries(text, started)
        plans = [(at, message) for at, level, message in entries if "plan:" in message.split("\n", 1)[0]]
        events = [(at, message.split("\n", 1)[0]) for at, level, message in entries
                  if message.startswith(("automatic vacuum", "automatic analyze", "checkpoint"))]
        print("| tenth | seconds | transitions/s | active sessions | wait events (share of active session samples) "
              "| autovacuum on files | checkpoints | WAL MB (FPI) | dead rows at its end | sampled completions: "
              "median ms, buffers per statement, plan |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for tenth in range(10):
            low, high = edges[tenth], edges[tenth + 1]
            seconds = high - low
            samples = [sessions for at, sessions in self._activity if low <= at - started < high]
            client = [s for sessions in samples for s in sessions if s[0] == "client backend"]
            waits: dict[str, int] = {}
            for _, wait, state, kind in client:
                key = f"{kind} {wait}" if state == "active" else f"{kind} idle-in-tx"
                waits[key] = waits.get(key, 0) + 1
            top = ", ".join(f"{key} {100 * n / max(1, len(client)):.0f}%"
                            for key, n in sorted(waits.items(), key=lambda item: -item[1])[:5])
            vacuuming = sum(1 for sessions in samples if any(s[0] == "autovacuum worker" and "files" in s[3]
                                                             for s in sessions))
            counters = [c for at, c in self._counters if low <= at - started < high]
            before = [c for at, c in self._counters if at - started < low]
            first = before[-1] if before else (counters[0] if counters else {})
            last = counters[-1] if counters else first
            wal = (int(last.get("wal_bytes") or 0) - int(first.get("wal_bytes") or 0)) / 1e6
            fpi = int(last.get("wal_fpi") or 0) - int(first.get("wal_fpi") or 0)
            checkpoints = sum(1 for at, line in events if low <= at < high and line.startswith("checkpoint starting"))
            mine = [message for at, message in plans if low <= at < high and "WITH b AS (SELECT state" in message]
            durations = [float(re.search(r"duration: ([\d.]+) ms", m)[1]) for m in mine]  # type: ignore[index]
            # The first Buffers line is the top node's: the whole statement's.
            buffers = [sum(int(n) for n in re.findall(r"(?:hit|read|dirtied|written)=(\d+)",
                                                      next((line for line in m.split("\n") if "Buffers:" in line), "")))
                       for m in mine]
            shapes = sorted({" > ".join(re.findall(r"(Seq Scan on \w+|Index (?:Only )?Scan using \w+|"
                                                   r"Bitmap Index Scan on \w+|Hash Join|Nested Loop|Merge Join)", m))
                             for m in mine})
            plan = (f"{statistics.median(durations):.1f} ms, {statistics.median(buffers):.0f}, "
                    f"{' | '.join(shapes)}" if mine else "-")
            print(f"| {tenth + 1} | {seconds:.1f} | {total / 10 / max(seconds, 1e-9):,.0f} | "
                  f"{len(client) / max(1, len(samples)):.1f} | {top} | {100 * vacuuming / max(1, len(samples)):.0f}% | "
                  f"{checkpoints} | {wal:.0f} ({fpi:,}) | {int(last.get('dead') or 0):,} | {plan} |")
        print("\nautovacuum and checkpoints (seconds from the run's start):")
        for at, line in events:
            print(f"  {at:7.1f} s  {line}")


def run_transitions(url: str, files: int, total_claimers: int, processes: int, group: int,
                    batches: int = 1, profile: Profiler | None = None) -> dict[str, float]:
    batch_ids = [fill(url, files) for _ in range(batches)]
    if profile is not None:
        profile.start(url)
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
    if profile is not None:
        profile.stop(f"{files}-files-{total_claimers}-claimers", started, times)
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
    with PostgresServer(settings=DURABLE + (PROFILE if args.profile else ())) as server:
        profile = Profiler(Path(args.profile), server.log_path) if args.profile else None
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
                    run = run_transitions(url, files, total, args.processes, args.group, batches, profile)
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
    t.add_argument("--profile", metavar="DIR", help="watch the server during each run (wait events, autovacuum, "
                   "checkpoints, sampled plans): its samples and log into DIR, a summary per tenth printed")
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
