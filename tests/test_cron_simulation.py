"""Years of hourly cron runs, compressed: the journal stays bounded by the tree.

300 runs of ``archup upload --skip-archived`` over a 5,000-file tree; before each run 1 % of
the files change, 0.2 % are added and 0.2 % deleted; every 24 runs ``archup gc
--forget-after`` forgets the batches that ended. Each run must send exactly what changed
(counted at the server), the journal after the last run must be at most twice its size
after the first day, and the last manifest with the archived index must account for every
file of the tree.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import Cli

from archup.journal import Destination, SQLiteJournal

FILES = 5_000
RUNS = 300
GC_EVERY = 24
CHANGED, ADDED, DELETED = FILES // 100, FILES // 500, FILES // 500


def _serve(conn: Connection) -> None:
    """A moto server in a process of its own (23,000 PUTs: not in the test's interpreter lock)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line a request on the test's stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    conn.send(server.get_host_and_port())
    conn.recv()  # until the test is done (or gone: EOFError)
    server.stop()


@pytest.fixture(scope="module")
def own_server() -> Iterator[str]:
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(child,), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the moto server process did not start")
        host, port = parent.recv()
        yield f"http://{host}:{port}"
    finally:
        parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()


def _write(path: Path, run: int, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    # A distinct mtime per run: a rewrite within one clock tick still reads as changed.
    stamp = 1_700_000_000_000_000_000 + run * 1_000_000_000 + random.randrange(1_000_000)
    os.utime(path, ns=(stamp, stamp))


def _journal_bytes(journal: Path) -> int:
    """The database's size once its write-ahead log is checkpointed into it."""
    with closing(sqlite3.connect(journal)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return journal.stat().st_size


def _listed(s3: Any, bucket: str, prefix: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(item["Key"][len(prefix):] for item in page.get("Contents", []))
    return keys


@pytest.mark.slow
def test_three_hundred_cron_runs_keep_the_journal_bounded_and_every_file_accounted_for(
        own_server: str, journal_path: Path, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=own_server, region_name="us-east-1")
    bucket = f"cron-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    cli = Cli(own_server, bucket, journal_path)
    random.seed(16)
    root = tmp_path / "tree"
    tree: set[str] = set()
    for n in range(FILES):
        rel = f"d{n % 50:02d}/f{n:05d}.txt"
        _write(root / rel, 0, f"{rel} v0\n")
        tree.add(rel)
    serial = FILES
    sizes: dict[int, int] = {}
    forgotten = 0
    last: dict[str, Any] = {}

    for run in range(1, RUNS + 1):
        expected: set[str] = set(tree) if run == 1 else set()
        if run > 1:
            for rel in random.sample(sorted(tree), CHANGED + DELETED):
                if len(expected) < CHANGED:
                    _write(root / rel, run, f"{rel} v{run}\n")
                    expected.add(rel)
                else:
                    (root / rel).unlink()
                    tree.discard(rel)
            for _ in range(ADDED):
                rel = f"d{serial % 50:02d}/f{serial:05d}.txt"
                serial += 1
                _write(root / rel, run, f"{rel} new\n")
                tree.add(rel)
                expected.add(rel)

        result = cli("upload", "--json", "--quiet", "--skip-archived", str(root))
        assert result.exit_code == 0, f"run {run}: {result.stderr}"
        last = json.loads(result.stdout)
        sent = _listed(s3, bucket, f"{last['prefix']}files/")
        assert sent == expected, f"run {run}: sent {len(sent)}, expected {len(expected)}"
        assert last["files_already_archived"] == len(tree) - len(expected), f"run {run}"
        sizes[run] = _journal_bytes(cli.journal)
        if run % GC_EVERY == 0:
            gc = cli("gc", "--json", "--forget-after", "0s", "--endpoint-url", cli.endpoint)
            assert gc.exit_code == 0, gc.stderr
            report = json.loads(gc.stdout)
            assert len(report["forgotten"]) == GC_EVERY and report["errors"] == [], f"run {run}"
            forgotten += len(report["forgotten"])

    print(f"journal bytes after run {GC_EVERY}: {sizes[GC_EVERY]}, after run {RUNS}: {sizes[RUNS]}, "
          f"largest: {max(sizes.values())}")
    assert forgotten == RUNS // GC_EVERY * GC_EVERY
    assert sizes[RUNS] <= 2 * sizes[GC_EVERY], (sizes[GC_EVERY], sizes[RUNS])
    # Not only at the end: never more than twice the first day's, however many runs.
    assert max(sizes[run] for run in range(GC_EVERY, RUNS + 1)) <= 2 * sizes[GC_EVERY]

    # The last manifest and the archived index account for every file of the tree, as it is.
    manifest = s3.get_object(Bucket=bucket, Key=f"{last['prefix']}manifest.jsonl")["Body"].read()
    in_manifest = {json.loads(line)["path"] for line in manifest.decode().splitlines()}
    journal = SQLiteJournal(cli.journal)
    try:
        destination = Destination(str(root.resolve()), bucket, "staging/", cli.endpoint)
        index = {row.rel_path: row for row in journal.iter_archived(destination)}
    finally:
        journal.close()
    assert set(index) == tree
    assert {rel for rel, row in index.items() if row.batch_id == last["batch_id"]} == in_manifest
    stored = _listed(s3, bucket, "staging/")
    for rel, row in index.items():
        info = (root / rel).stat()
        assert (row.size, row.mtime_ns) == (info.st_size, info.st_mtime_ns), rel
        assert f"{row.batch_id}/files/{rel}" in stored, rel  # the object the index names is there
