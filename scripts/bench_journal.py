#!/usr/bin/env python3
"""Journal micro-benchmark: committed file transitions per second, synchronous=FULL.

Every writer takes its own files of one batch through archup.journal.Journal's
real operations, each one committed transaction: add_file (-> pending),
start_file (-> uploading), complete_file (-> uploaded). Configurations: W
threads in one process, and P processes (forked, each opening its own Journal)
x T threads. After each run the batch is checked through a fresh connection:
every file must be uploaded (no lost update). Target: >= 5,000 transitions/s
at 16 writers.

    .venv/bin/python scripts/bench_journal.py [--files 1500] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archup.journal import Journal, NewFile, SQLiteJournal  # noqa: E402
from archup.outcomes import CompletionWriter  # noqa: E402
from archup.states import FileState  # noqa: E402

TRANSITIONS_PER_FILE = 3  # add_file, start_file, complete_file


def writer(journal: Journal, batch_id: str, names: list[str], barrier: threading.Barrier | None) -> None:
    if barrier is not None:
        barrier.wait()
    for name in names:
        journal.add_file(batch_id, NewFile(name, f"bench/files/{name}", 4096, 1))
        journal.start_file(batch_id, name)
        journal.complete_file(batch_id, name, sha256="0" * 64, etag='"etag"')


class GroupCommitter:
    """A PROTOTYPE of a proposed change, not archup's code: the workers hand their
    transitions to one writer thread, which commits whatever has queued up in a
    single BEGIN IMMEDIATE transaction (same checks and SQL as Journal's methods),
    then wakes them. Each worker still returns only after its transition is durable."""

    def __init__(self, journal: Journal, batch_id: str) -> None:
        import queue
        self.journal, self.batch_id = journal, batch_id
        self.queue: queue.SimpleQueue[tuple[str, str, threading.Event] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def submit(self, op: str, name: str) -> None:
        done = threading.Event()
        self.queue.put((op, name, done))
        done.wait()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        import queue

        from archup.clock import isoformat, utcnow
        journal, batch_id = self.journal, self.batch_id
        while True:
            first = self.queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < 500:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)
                    break
                group.append(item)
            now = isoformat(utcnow())
            with journal.atomic() as conn:
                for op, name, _ in group:
                    if op == "add":
                        conn.execute("INSERT INTO files (batch_id, rel_path, key, size, mtime_ns, state, updated_at) "
                                     "VALUES (?,?,?,?,?,?,?)", (batch_id, name, f"bench/files/{name}", 4096, 1,
                                                                FileState.PENDING.value, now))
                        continue
                    target = FileState.UPLOADING if op == "start" else FileState.UPLOADED
                    journal._move_file(conn, batch_id, name, target)
                    conn.execute("UPDATE files SET state = ?, updated_at = ? WHERE batch_id = ? AND rel_path = ?",
                                 (target.value, now, batch_id, name))
            for _, _, done in group:
                done.set()


def grouped_writer(committer: GroupCommitter, names: list[str], barrier: threading.Barrier) -> None:
    barrier.wait()
    for name in names:
        for op in ("add", "start", "complete"):
            committer.submit(op, name)


def archup_writer(journal: Journal, batch_id: str, names: list[str], writer_: CompletionWriter,
                  barrier: threading.Barrier) -> None:
    """archup's own path for a small file: added with the scan (grouped), completed through the
    CompletionWriter (grouped, the worker does not wait; done is reported after the commit)."""
    from archup.journal import NewFile as New
    barrier.wait()
    for start in range(0, len(names), 100):
        journal.add_files(batch_id, [New(n, f"bench/files/{n}", 4096, 1) for n in names[start:start + 100]],
                          durable=False)
    for name in names:
        writer_.put(journal.get_file(batch_id, name), "0" * 64, '"etag"')


def threads_in_process(path: str, batch_id: str, names: list[str], threads: int, synchronous: str,
                       start_at: float | None = None, grouped: bool = False, mode: str = "") -> None:
    journal = SQLiteJournal(path, synchronous=synchronous)
    if mode == "w":
        errors: list[Exception] = []
        completion = CompletionWriter(journal, batch_id, lambda *done: None, errors.append)
        barrier = threading.Barrier(threads)
        workers = [threading.Thread(target=archup_writer, args=(journal, batch_id, names[i::threads], completion,
                                                                barrier)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        completion.close()
        journal.close()
        if errors:
            raise RuntimeError(errors[0])
        return
    shares = [names[i::threads] for i in range(threads)]
    barrier = threading.Barrier(threads)
    committer = GroupCommitter(journal, batch_id) if grouped else None
    workers = [threading.Thread(target=grouped_writer, args=(committer, share, barrier)) if committer else
               threading.Thread(target=writer, args=(journal, batch_id, share, barrier)) for share in shares]
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if committer:
        committer.close()
    journal.close()


def one_run(processes: int, threads: int, files: int, synchronous: str, grouped: bool = False,
            directory: str | None = None, mode: str = "") -> float:
    with tempfile.TemporaryDirectory(prefix="archup-bench-journal-", dir=directory) as tmp:
        path = os.path.join(tmp, "journal.db")
        setup = SQLiteJournal(path, synchronous=synchronous)
        batch_id = "01JBENCH000000000000000000"
        setup.init_batch(batch_id, source_root="/bench", bucket="bench", prefix="bench/", part_size=8 << 20)
        setup.close()  # no connection crosses the fork
        names = [f"d{i % 37}/f{i:07d}" for i in range(files)]
        if processes == 1:
            start = time.perf_counter()
            threads_in_process(path, batch_id, names, threads, synchronous, grouped=grouped, mode=mode)
            elapsed = time.perf_counter() - start
        else:
            context = multiprocessing.get_context("fork")
            start_at = time.time() + 0.5  # every process starts writing at the same moment
            children = [context.Process(target=threads_in_process,
                                        args=(path, batch_id, names[i::processes], threads, synchronous, start_at,
                                              grouped))
                        for i in range(processes)]
            for child in children:
                child.start()
            for child in children:
                child.join()
                if child.exitcode != 0:
                    raise RuntimeError(f"writer process exited {child.exitcode}")
            elapsed = time.time() - start_at
        check = SQLiteJournal(path)  # a fresh connection: what was committed, not what the writers saw
        counts = check.get_state(batch_id).counts
        check.close()
        if counts[FileState.UPLOADED] != files or sum(counts.values()) != files:
            raise RuntimeError(f"lost updates: {dict(counts)} for {files} files")
    return files * (2 if mode == "w" else TRANSITIONS_PER_FILE) / elapsed


def fsync_latency(directory: str | None) -> float:
    """The disk's fsync latency here: with synchronous=FULL every commit pays about one."""
    handle, path = tempfile.mkstemp(dir=directory)
    times = []
    try:
        for _ in range(100):
            start = time.perf_counter()
            os.write(handle, b"x" * 4096)
            os.fsync(handle)
            times.append(time.perf_counter() - start)
    finally:
        os.close(handle)
        os.unlink(path)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1500, help="files per run (3 transitions each)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    parser.add_argument("--configs", default="1x1,1x16,4x1,4x4,1x16g,4x4g,1x16w",
                        help="PROCESSESxTHREADS, comma separated; a trailing g runs the group-commit prototype "
                             "(one writer thread per process) instead of Journal's per-transition commits; "
                             "a trailing w runs archup's own small-file path (2 transitions a file)")
    parser.add_argument("--dir", default=None, help="where the journal goes (default $TMPDIR; local disk)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    import sqlite3
    results = []
    fsync_ms = fsync_latency(args.dir)
    print(f"SQLite {sqlite3.sqlite_version}, synchronous={args.synchronous}, {args.files} files "
          f"x {TRANSITIONS_PER_FILE} transitions per run, {args.runs} runs; fsync of 4 KiB {fsync_ms:.2f} ms "
          f"(median of 100); load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| processes x threads | writers | transitions/s (median) | min | max | target >= 5,000 |")
    print("|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        grouped = config.endswith("g")
        mode = "w" if config.endswith("w") else ""
        processes, threads = (int(x) for x in config.rstrip("gw").split("x"))
        rates = [one_run(processes, threads, args.files, args.synchronous, grouped, args.dir, mode)
                 for _ in range(args.runs)]
        median = statistics.median(rates)
        writers = processes * threads
        verdict = ("MET" if median >= 5000 else "MISSED") if writers >= 16 and not grouped else "-"
        label = f"{processes} x {threads}" + (" (group-commit prototype)" if grouped else "") + (
            " (archup: grouped scan + CompletionWriter)" if mode else "")
        print(f"| {label} | {writers} | {median:,.0f} | {min(rates):,.0f} | {max(rates):,.0f} | "
              f"{verdict} |", flush=True)
        results.append({"processes": processes, "threads": threads, "grouped": grouped, "rates": rates,
                        "median": median})
    if args.json_out:
        args.json_out.write_text(json.dumps({"synchronous": args.synchronous, "files": args.files, "fsync_ms": fsync_ms,
                                             "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
