"""The shared journal's cost per statement does not grow as a batch is worked off.

At 16 claimers a 1,000,000-file batch slowed to a third of its rate in some runs
(docs/benchmarks.md, "Several hosts, one batch"): the completion's fence was planned from the
statistics the fill left (every chunk's owner NULL), drove its lookup from the worker's own
chunks, done ones included, and probed the whole group once per chunk. These tests plan the
statements with those statistics (autovacuum off for the batch's tables, so no ANALYZE
changes them halfway) and read the buffers the server touched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from ulid import ULID

from archup.journal import NewFile
from archup.journal.postgres import PostgresJournal
from archup.states import BatchState

FILES_PER_CHUNK = 1000
CHUNKS = 24
GROUP = 100  # completions committed together


@pytest.fixture
def journal(pg_url: str) -> Iterator[PostgresJournal]:
    handle = PostgresJournal(pg_url)
    yield handle
    handle.close()


def fill(journal: PostgresJournal) -> str:
    """CHUNKS chunks of FILES_PER_CHUNK files, as a scan leaves them: analyzed, nothing claimed."""
    batch_id = str(ULID())
    journal.init_batch(batch_id, source_root="/src", bucket="b", prefix="staging/", part_size=8 << 20)
    journal.set_batch_state(batch_id, BatchState.UPLOADING)
    group = 8 * FILES_PER_CHUNK  # a scan group is cut in eight chunks
    for start in range(0, CHUNKS * FILES_PER_CHUNK, group):
        journal.add_files(batch_id, [NewFile(f"f{i:06d}", f"staging/{batch_id}/files/f{i:06d}", 1, 1)
                                     for i in range(start, start + group)])

    def settle(conn: psycopg.Connection[Any]) -> None:
        for table in ("files", "chunks"):
            conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
            conn.execute(f"ANALYZE {table}")
    journal.db.run(settle, write=False)
    return batch_id


def buffers(journal: PostgresJournal, sql: str, args: dict[str, Any]) -> int:
    """Shared buffers the statement touched, run for real and rolled back."""
    def body(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", args).fetchone()
        assert row is not None
        plan = row["QUERY PLAN"]
        top = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
        raise Rollback(int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"]))

    try:
        journal.db.write(body)
    except Rollback as done:
        return done.blocks
    raise AssertionError("the EXPLAIN's transaction was not rolled back")


class Rollback(Exception):
    def __init__(self, blocks: int) -> None:
        super().__init__(blocks)
        self.blocks = blocks


def test_a_completion_costs_the_same_after_a_worker_has_finished_many_chunks(journal: PostgresJournal) -> None:
    batch_id = fill(journal)
    journal.register_worker(batch_id, "w", 60)
    costs = []
    while (claim := journal.claim_chunk(batch_id, "w", 60)) is not None:
        files = [(r.rel_path, "ab" * 32, "etag") for r in journal.chunk_files(batch_id, claim.chunk_no)]
        assert len(files) == FILES_PER_CHUNK
        costs.append(buffers(journal, *journal._completion_statement(batch_id, files[:GROUP], "2026-01-01T00:00:00Z")))
        for start in range(0, len(files), GROUP):
            assert journal.complete_files(batch_id, files[start:start + GROUP]) == []
        assert journal.finish_chunk(batch_id, claim.chunk_no, "w")
    assert len(costs) == CHUNKS
    # Before: about 4 buffers per file of the group for each chunk the worker had finished
    # (16,000 at the last chunk here, against 1,200 at the first).
    assert costs[-1] < 2 * costs[0], costs
