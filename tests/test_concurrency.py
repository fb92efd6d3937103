"""The original bug, proven gone: concurrent workers never lose a file of a batch.

The earlier design kept a batch's state as one value updated by read-modify-write;
at five-way parallelism files vanished ("File not found in batch"). Here many
threads, then several processes, add and complete files of one batch, run after
run, and every file must be there, uploaded, as seen through a second connection.
A last test runs the naive design under the same load to show it does lose files.
"""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from archup.errors import FileNotInBatch
from archup.journal import Journal, NewFile, SQLiteJournal
from archup.states import FileState

THREADS = 16
FILES_PER_THREAD = 3
PROCESSES = 4
FILES_PER_PROCESS = 5
REPETITIONS = 50
# Commits at synchronous=FULL cost an fsync each: about 250/s on this kind of
# machine's disk, so 50 runs of 16 threads x 3 files x 3 commits would take a
# minute. Isolation does not depend on it (it only decides what survives a power
# cut), so the long runs use NORMAL and a shorter series keeps the shipped FULL.
MODES = pytest.mark.parametrize(("synchronous", "repetitions"), [("NORMAL", REPETITIONS), ("FULL", 10)],
                                ids=["NORMAL-x50", "FULL-x10"])
BARRIER_TIMEOUT = 60.0
SHA = "ab" * 32

BatchFiles = dict[str, str]  # rel_path -> state value


def rel_path(worker: int, index: int) -> str:
    return f"w{worker:02d}/file-{index}.bin"


def expected_files(workers: int, per_worker: int) -> BatchFiles:
    return {rel_path(worker, index): FileState.UPLOADED.value
            for worker in range(workers) for index in range(per_worker)}


def add_and_complete(journal: Journal, batch_id: str, worker: int, count: int) -> None:
    """One worker's share: add each of its files, start it, complete it."""
    for index in range(count):
        path = rel_path(worker, index)
        journal.add_file(batch_id, NewFile(rel_path=path, key=f"staging/{batch_id}/files/{path}",
                                           size=index + 1, mtime_ns=0))
        journal.start_file(batch_id, path)
        journal.complete_file(batch_id, path, sha256=SHA, etag=f"etag-{path}")


def run_together(workers: int, body: Callable[[int, threading.Barrier], None]) -> None:
    """Run body(worker, barrier) on `workers` threads; re-raise the first error any of them hit.

    A failing worker breaks the barrier so the others stop waiting for it.
    """
    barrier = threading.Barrier(workers, timeout=BARRIER_TIMEOUT)
    errors: list[BaseException] = []

    def guarded(worker: int) -> None:
        try:
            body(worker, barrier)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=guarded, args=(worker,), name=f"worker-{worker}")
               for worker in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=BARRIER_TIMEOUT * 2)
    assert not [thread.name for thread in threads if thread.is_alive()], "workers hung"
    if errors:
        # The worker that failed first, not the ones that only saw the barrier break.
        raise next((error for error in errors if not isinstance(error, threading.BrokenBarrierError)), errors[0])


def journal_files(reader: Journal, batch_id: str) -> BatchFiles:
    return {record.rel_path: record.state.value for record in reader.iter_files(batch_id)}


def new_batch(journal: Journal) -> str:
    batch_id = str(ULID())
    journal.init_batch(batch_id, source_root="/data/src", bucket="archive", prefix="staging/",
                       part_size=8 * 1024 * 1024)
    return batch_id


def describe_differences(run: int, expected: BatchFiles, seen: BatchFiles) -> str:
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    wrong = sorted(path for path in set(expected) & set(seen) if seen[path] != expected[path])
    return f"run {run}: {len(seen)}/{len(expected)} files; missing {missing}, extra {extra}, not uploaded {wrong}"


# -- the journal under threads --------------------------------------------------------


@MODES
def test_threads_never_lose_a_file(journal_path: Path, synchronous: str, repetitions: int) -> None:
    expected = expected_files(THREADS, FILES_PER_THREAD)
    setup = SQLiteJournal(journal_path)
    reader = SQLiteJournal(journal_path)  # its own connection: the writers' commits must be durable for it
    failures: list[str] = []
    try:
        for run in range(repetitions):
            batch_id = new_batch(setup)
            # Shared by the threads, as the uploader shares it; each thread opens its own connection.
            writer = SQLiteJournal(journal_path, synchronous=synchronous)

            def body(worker: int, barrier: threading.Barrier) -> None:
                barrier.wait()
                add_and_complete(writer, batch_id, worker, FILES_PER_THREAD)

            try:
                run_together(THREADS, body)
            finally:
                writer.close()

            seen = journal_files(reader, batch_id)
            summary = reader.get_state(batch_id)
            if seen != expected or summary.counts[FileState.UPLOADED] != len(expected):
                failures.append(describe_differences(run, expected, seen))
    finally:
        setup.close()
        reader.close()

    assert failures == []


# -- the journal under processes ------------------------------------------------------


def _process_worker(path: str, synchronous: str, batch_ids: list[str], worker: int, barrier: Any) -> None:
    """Runs in a spawned process: its own Journal, one share of every batch, in step with the others."""
    journal = SQLiteJournal(path, synchronous=synchronous)
    try:
        for batch_id in batch_ids:
            barrier.wait()
            add_and_complete(journal, batch_id, worker, FILES_PER_PROCESS)
    except BaseException:
        barrier.abort()
        raise
    finally:
        journal.close()


@MODES
def test_processes_never_lose_a_file(journal_path: Path, synchronous: str, repetitions: int) -> None:
    # The processes start once and meet at a barrier before each batch, so every
    # repetition is a fresh batch raced by all of them without paying for a spawn per run.
    setup = SQLiteJournal(journal_path)
    try:
        batch_ids = [new_batch(setup) for _ in range(repetitions)]
    finally:
        setup.close()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES, timeout=BARRIER_TIMEOUT)
    processes = [context.Process(target=_process_worker,
                                 args=(str(journal_path), synchronous, batch_ids, worker, barrier))
                 for worker in range(PROCESSES)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=BARRIER_TIMEOUT * 3)
    for process in processes:
        if process.is_alive():
            process.kill()
    assert [process.exitcode for process in processes] == [0] * PROCESSES

    expected = expected_files(PROCESSES, FILES_PER_PROCESS)
    reader = SQLiteJournal(journal_path)
    try:
        failures = [describe_differences(run, expected, seen)
                    for run, batch_id in enumerate(batch_ids)
                    if (seen := journal_files(reader, batch_id)) != expected]
        assert reader.integrity_check() == "ok"
    finally:
        reader.close()
    assert failures == []


# -- the naive design, for contrast ----------------------------------------------------


def naive_connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: each statement commits on its own, as each KV get and put did.
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # speed only; the race is the same at any setting
    return conn


def naive_init(conn: sqlite3.Connection, batch_id: str) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS batch_state (batch_id TEXT PRIMARY KEY, state TEXT NOT NULL)")
    conn.execute("INSERT INTO batch_state VALUES (?, ?)", (batch_id, json.dumps({"files": {}})))


def naive_load(conn: sqlite3.Connection, batch_id: str) -> dict[str, Any]:
    row = conn.execute("SELECT state FROM batch_state WHERE batch_id = ?", (batch_id,)).fetchone()
    state: dict[str, Any] = json.loads(row[0])
    return state


def naive_update(conn: sqlite3.Connection, batch_id: str, change: Callable[[dict[str, Any]], None],
                 between: Callable[[], object] | None = None) -> None:
    """Read the whole state, change it in Python, write it back unconditionally: the old updateBatchState."""
    state = naive_load(conn, batch_id)
    change(state)
    if between is not None:
        between()
    conn.execute("UPDATE batch_state SET state = ? WHERE batch_id = ?", (json.dumps(state), batch_id))


def naive_add(conn: sqlite3.Connection, batch_id: str, path: str,
              between: Callable[[], object] | None = None) -> None:
    naive_update(conn, batch_id, lambda state: state["files"].__setitem__(path, FileState.PENDING.value),
                 between)


def naive_complete(conn: sqlite3.Connection, batch_id: str, path: str) -> None:
    def change(state: dict[str, Any]) -> None:
        if path not in state["files"]:
            raise FileNotInBatch(batch_id, path)
        state["files"][path] = FileState.UPLOADED.value

    naive_update(conn, batch_id, change)


def test_naive_read_modify_write_loses_files_under_the_same_load(tmp_path: Path) -> None:
    """Why the journal exists. The first add of every thread is made to read before any
    of them writes, and to be written before any completion (what a scheduler does now
    and then on its own); the rest runs free. Were the update atomic, no file would go
    missing and this test would fail.
    """
    path = tmp_path / "naive.db"
    expected = expected_files(THREADS, FILES_PER_THREAD)
    lost_per_run: list[int] = []
    not_found_errors = 0
    errors_lock = threading.Lock()

    for _ in range(REPETITIONS):
        batch_id = str(ULID())
        with closing(naive_connect(path)) as conn:
            naive_init(conn, batch_id)

        def body(worker: int, barrier: threading.Barrier) -> None:
            nonlocal not_found_errors
            with closing(naive_connect(path)) as conn:
                barrier.wait()
                for index in range(FILES_PER_THREAD):
                    path_ = rel_path(worker, index)
                    first = index == 0
                    naive_add(conn, batch_id, path_, between=barrier.wait if first else None)
                    if first:
                        barrier.wait()  # every first add is written before any completion reads
                    try:
                        naive_complete(conn, batch_id, path_)
                    except FileNotInBatch:
                        with errors_lock:
                            not_found_errors += 1

        run_together(THREADS, body)

        with closing(naive_connect(path)) as reader:
            files = naive_load(reader, batch_id)["files"]
        uploaded = [name for name, state in files.items() if state == FileState.UPLOADED.value]
        lost_per_run.append(len(expected) - len(uploaded))

    runs_with_loss = sum(1 for lost in lost_per_run if lost > 0)
    assert runs_with_loss >= 1, f"the naive update lost nothing in {REPETITIONS} runs: {lost_per_run}"
    assert not_found_errors >= 1, "no completion met 'File not found in batch'"
