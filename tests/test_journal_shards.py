"""The journal's packed-shard operations, on every backend (the ``journal`` fixture of
tests/test_journal.py is parametrized over SQLite and PostgreSQL), and the fence that keeps a
shard one host's on a shared journal.

What a writer committed is read back through a second handle (its own connection).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from test_journal import (
    SHA,
    JournalBackend,
    PostgresBackend,
    move_batch,
    new_batch_id,
    new_file,
    open_batch,
    second_journal,
    uploaded_file,
)
from ulid import ULID

from archup.errors import IllegalTransition, LeaseLost
from archup.journal import Journal, PartRecord
from archup.states import BatchState, FileState, ShardState


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, journal_path: Path) -> JournalBackend:
    """Every test runs on each backend, as tests/test_journal.py's do."""
    if request.param == "postgres":
        return PostgresBackend(request.getfixturevalue("pg_url"))
    return JournalBackend(journal_path)


@pytest.fixture
def journal(backend: JournalBackend) -> Iterator[Journal]:
    handle = backend.open()
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture
def batch_id(journal: Journal) -> str:
    return open_batch(journal)


DIGESTS = {name: f"{index:02x}" * 32 for index, name in enumerate("abcdefgh", start=1)}


def add(journal: Journal, batch_id: str, *names: str, size: int = 100) -> None:
    journal.add_files(batch_id, [new_file(batch_id, name, size) for name in names])


def plan(journal: Journal, batch_id: str, *names: str, size: int = 10240):  # type: ignore[no-untyped-def]
    """A shard of these members, at made-up data offsets (512 apart, after each header)."""
    return journal.plan_shard(batch_id, [(name, 512 + 1024 * i) for i, name in enumerate(names)], size)


def digests(*names: str) -> list[tuple[str, str]]:
    return [(name, DIGESTS[name]) for name in names]


def states(journal: Journal, batch_id: str, names: Iterable[str]) -> dict[str, tuple[FileState, int | None]]:
    return {name: (record.state, record.shard_no) for name in names
            for record in [journal.get_file(batch_id, name)]}


def count_rows(journal: Journal, table: str, batch_id: str) -> int:
    """Rows of a table for a batch, read with the backend's own SQL (not through an operation)."""
    if journal.claims() is None:
        return int(journal.db.query(f"SELECT count(*) FROM {table} WHERE batch_id = ?", (batch_id,))[0][0])  # type: ignore[attr-defined]
    return int(journal.db.query(f"SELECT count(*) AS n FROM {table} WHERE batch_id = %s", (batch_id,))[0]["n"])  # type: ignore[attr-defined]


# -- planning ------------------------------------------------------------------------


def test_plan_fixes_members_and_offsets_and_moves_them_to_uploading(journal: Journal, backend: JournalBackend,
                                                                    batch_id: str) -> None:
    add(journal, batch_id, "a", "b", "c")
    journal.start_file(batch_id, "b")
    journal.fail_file(batch_id, "b", "timed out")
    shard = journal.plan_shard(batch_id, [("b", 512), ("a", 2048)], 6144)
    assert (shard.shard_no, shard.key, shard.size, shard.members, shard.state) == (
        1, f"staging/{batch_id}/shards/000001.tar", 6144, 2, ShardState.UPLOADING)
    assert (shard.upload_id, shard.sha256, shard.etag, shard.error) == (None, None, None, None)
    with second_journal(backend) as reader:
        members = reader.shard_members(batch_id, 1)
        assert [(m.rel_path, m.state, m.shard_no, m.shard_offset, m.error) for m in members] == [
            ("b", FileState.UPLOADING, 1, 512, None), ("a", FileState.UPLOADING, 1, 2048, None)]
        assert [m.attempts for m in members] == [2, 1]  # the failed one had been tried once
        assert states(reader, batch_id, ["c"]) == {"c": (FileState.PENDING, None)}
        assert reader.get_shard(batch_id, 1) == shard


def test_shard_numbers_increase_and_iter_shards_filters_by_state(journal: Journal, batch_id: str) -> None:
    add(journal, batch_id, "a", "b", "c", "d")
    numbers = [plan(journal, batch_id, name).shard_no for name in "abc"]
    assert numbers == [1, 2, 3]
    journal.complete_shard(batch_id, 2, sha256=SHA, etag="e2", digests=digests("b"))
    journal.drop_shard(batch_id, 3, "gone", {})
    assert plan(journal, batch_id, "c", "d").shard_no == 4  # never a dropped shard's number again
    assert [s.shard_no for s in journal.iter_shards(batch_id)] == [1, 2, 3, 4]
    assert [s.shard_no for s in journal.iter_shards(batch_id, [ShardState.UPLOADING])] == [1, 4]
    assert [s.shard_no for s in journal.iter_shards(batch_id, [ShardState.UPLOADED, ShardState.DROPPED])] == [2, 3]
    assert list(journal.iter_shards(batch_id, [])) == []


def test_shards_planned_at_once_on_two_handles_get_distinct_numbers(journal: Journal, backend: JournalBackend,
                                                                   batch_id: str) -> None:
    names = [f"f{i:02d}" for i in range(16)]
    add(journal, batch_id, *names)
    handles = [backend.open() for _ in range(2)]
    barrier = threading.Barrier(2)
    got: list[int] = []

    def planner(handle: Journal, mine: list[str]) -> None:
        barrier.wait()
        for name in mine:
            got.append(handle.plan_shard(batch_id, [(name, 512)], 2048).shard_no)

    threads = [threading.Thread(target=planner, args=(handle, names[i::2])) for i, handle in enumerate(handles)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for handle in handles:
        handle.close()
    assert sorted(got) == list(range(1, 17))
    assert sorted(journal.get_file(batch_id, name).shard_no or 0 for name in names) == list(range(1, 17))


@pytest.mark.parametrize("blocker", ["in another shard", "uploaded", "unknown", "listed twice", "multipart",
                                     "skipped"])
def test_planning_a_member_that_cannot_be_packed_plans_nothing(journal: Journal, backend: JournalBackend,
                                                              batch_id: str, blocker: str) -> None:
    add(journal, batch_id, "a", "b", "c")
    members = [("a", 512), ("x", 1536)]
    if blocker == "in another shard":
        plan(journal, batch_id, "c")
        members[1] = ("c", 1536)
    elif blocker == "uploaded":
        uploaded_file(journal, batch_id, "u")
        members[1] = ("u", 1536)
    elif blocker == "listed twice":
        members[1] = ("a", 1536)
    elif blocker == "multipart":
        journal.start_file(batch_id, "b")
        journal.record_upload_id(batch_id, "b", "upload-1", 8 * 1024 * 1024)
        members[1] = ("b", 1536)
    elif blocker == "skipped":
        journal.add_file(batch_id, new_file(batch_id, "s", state=FileState.SKIPPED, error="unreadable"))
        members[1] = ("s", 1536)
    before = [s.shard_no for s in journal.iter_shards(batch_id)]
    with pytest.raises(IllegalTransition, match="nothing was planned"):
        journal.plan_shard(batch_id, members, 4096)
    with second_journal(backend) as reader:
        assert [s.shard_no for s in reader.iter_shards(batch_id)] == before
        assert states(reader, batch_id, ["a"]) == {"a": (FileState.PENDING, None)}
        assert reader.get_file(batch_id, "a").attempts == 0
    assert plan(journal, batch_id, "a").shard_no == len(before) + 1


def test_a_closed_batch_plans_no_shard(journal: Journal, batch_id: str) -> None:
    add(journal, batch_id, "a")
    move_batch(journal, batch_id, BatchState.ABORTED)
    with pytest.raises(IllegalTransition):
        plan(journal, batch_id, "a")
    assert list(journal.iter_shards(batch_id)) == []


# -- completing --------------------------------------------------------------------------


def test_complete_marks_the_shard_and_its_members_uploaded_with_their_digests(
        journal: Journal, backend: JournalBackend, batch_id: str) -> None:
    add(journal, batch_id, "a", "b", "c")
    plan(journal, batch_id, "a", "b")
    journal.record_shard_upload(batch_id, 1, "up-1", 5 * 1024 * 1024, "crc64nvme")
    journal.record_shard_part(batch_id, 1, PartRecord(1, 100, "p1", None))
    journal.complete_shard(batch_id, 1, sha256="ee" * 32, etag="shard-etag", digests=digests("b", "a"))
    with second_journal(backend) as reader:
        shard = reader.get_shard(batch_id, 1)
        assert (shard.state, shard.sha256, shard.etag) == (ShardState.UPLOADED, "ee" * 32, "shard-etag")
        assert [(m.rel_path, m.state, m.sha256, m.etag, m.shard_no) for m in reader.shard_members(batch_id, 1)] == [
            ("a", FileState.UPLOADED, DIGESTS["a"], None, 1), ("b", FileState.UPLOADED, DIGESTS["b"], None, 1)]
        assert reader.list_shard_parts(batch_id, 1) == []
        assert states(reader, batch_id, ["c"]) == {"c": (FileState.PENDING, None)}
    with pytest.raises(IllegalTransition, match="uploaded"):
        journal.complete_shard(batch_id, 1, sha256="ee" * 32, etag="again", digests=digests("a", "b"))


@pytest.mark.parametrize("given", [("a",), ("a", "b", "c"), ("a", "c"), ("a", "a")])
def test_complete_refuses_a_digest_list_that_is_not_exactly_its_members(
        journal: Journal, backend: JournalBackend, batch_id: str, given: tuple[str, ...]) -> None:
    add(journal, batch_id, "a", "b", "c")
    plan(journal, batch_id, "a", "b")
    plan(journal, batch_id, "c")
    with pytest.raises(IllegalTransition, match="nothing was recorded"):
        journal.complete_shard(batch_id, 1, sha256=SHA, etag="e", digests=digests(*given))
    with second_journal(backend) as reader:
        assert reader.get_shard(batch_id, 1).state is ShardState.UPLOADING
        assert states(reader, batch_id, "abc") == {"a": (FileState.UPLOADING, 1), "b": (FileState.UPLOADING, 1),
                                                   "c": (FileState.UPLOADING, 2)}
        assert {reader.get_file(batch_id, name).sha256 for name in "abc"} == {None}


def test_an_unknown_shard_is_refused(journal: Journal, batch_id: str) -> None:
    for call in (lambda: journal.get_shard(batch_id, 7),
                 lambda: journal.complete_shard(batch_id, 7, sha256=SHA, etag="e", digests=[]),
                 lambda: journal.drop_shard(batch_id, 7, "gone", {}),
                 lambda: journal.record_shard_part(batch_id, 7, PartRecord(1, 1, "e", None)),
                 lambda: journal.record_shard_upload(batch_id, 7, "u", 1, None)):
        with pytest.raises(IllegalTransition, match="unknown"):
            call()


# -- dropping --------------------------------------------------------------------------------


def test_drop_returns_members_to_pending_and_problems_to_their_state(journal: Journal, backend: JournalBackend,
                                                                    batch_id: str) -> None:
    add(journal, batch_id, "a", "b", "c", "d")
    plan(journal, batch_id, "a", "b", "c")
    journal.record_shard_upload(batch_id, 1, "up-1", 5 * 1024 * 1024, None)
    journal.record_shard_part(batch_id, 1, PartRecord(1, 100, "p1", None))
    journal.drop_shard(batch_id, 1, "planned again", {"b": (FileState.FAILED, "changed since the scan"),
                                                      "c": (FileState.SKIPPED, "permission denied"),
                                                      "d": (FileState.FAILED, "not a member")})
    with second_journal(backend) as reader:
        shard = reader.get_shard(batch_id, 1)
        assert (shard.state, shard.error) == (ShardState.DROPPED, "planned again")
        got = {name: (r.state, r.error, r.shard_no, r.shard_offset)
               for name in "abcd" for r in [reader.get_file(batch_id, name)]}
        assert got == {"a": (FileState.PENDING, "planned again", None, None),
                       "b": (FileState.FAILED, "changed since the scan", None, None),
                       "c": (FileState.SKIPPED, "permission denied", None, None),
                       "d": (FileState.PENDING, None, None, None)}
        assert reader.shard_members(batch_id, 1) == []
        assert reader.list_shard_parts(batch_id, 1) == []
    with pytest.raises(IllegalTransition, match="dropped"):
        journal.drop_shard(batch_id, 1, "again", {})
    with pytest.raises(IllegalTransition, match="dropped"):
        journal.complete_shard(batch_id, 1, sha256=SHA, etag="e", digests=digests("a"))
    with pytest.raises(IllegalTransition, match="dropped"):
        journal.record_shard_part(batch_id, 1, PartRecord(2, 100, "p2", None))
    # The pending member and the failed one go into a new shard; the skipped one never does.
    assert plan(journal, batch_id, "a", "b").shard_no == 2
    with pytest.raises(IllegalTransition):
        plan(journal, batch_id, "c")


def test_dropping_an_uploaded_shard_returns_its_members_to_pending(journal: Journal, backend: JournalBackend,
                                                                   batch_id: str) -> None:
    """Finalize's read-back found the shard missing: its members are packed again."""
    add(journal, batch_id, "a", "b")
    plan(journal, batch_id, "a", "b")
    journal.complete_shard(batch_id, 1, sha256=SHA, etag="e", digests=digests("a", "b"))
    journal.drop_shard(batch_id, 1, "shard missing from the bucket", {})
    with second_journal(backend) as reader:
        assert reader.get_shard(batch_id, 1).state is ShardState.DROPPED
        assert {name: (r.state, r.error, r.shard_no) for name in "ab" for r in [reader.get_file(batch_id, name)]} == {
            name: (FileState.PENDING, "shard missing from the bucket", None) for name in "ab"}
    assert plan(journal, batch_id, "b", "a").shard_no == 2


# -- parts -------------------------------------------------------------------------------------


def test_shard_parts_are_recorded_listed_and_forgotten_with_a_new_upload(journal: Journal, backend: JournalBackend,
                                                                        batch_id: str) -> None:
    add(journal, batch_id, "a", "b")
    plan(journal, batch_id, "a")
    plan(journal, batch_id, "b")
    journal.record_shard_upload(batch_id, 1, "up-1", 5 * 1024 * 1024, "crc32")
    journal.record_shard_part(batch_id, 1, PartRecord(2, 50, "p2", "c2"))
    journal.record_shard_part(batch_id, 1, PartRecord(1, 100, "p1", "c1"))
    journal.record_shard_part(batch_id, 1, PartRecord(1, 100, "p1-again", "c1b"))  # sent again: the last wins
    journal.record_shard_upload(batch_id, 2, "up-2", 5 * 1024 * 1024, None)
    journal.record_shard_part(batch_id, 2, PartRecord(1, 7, "q1", None))
    with second_journal(backend) as reader:
        shard = reader.get_shard(batch_id, 1)
        assert (shard.upload_id, shard.part_size, shard.checksum_kind) == ("up-1", 5 * 1024 * 1024, "crc32")
        assert reader.list_shard_parts(batch_id, 1) == [PartRecord(1, 100, "p1-again", "c1b"),
                                                        PartRecord(2, 50, "p2", "c2")]
        assert reader.list_shard_parts(batch_id, 2) == [PartRecord(1, 7, "q1", None)]
    journal.record_shard_upload(batch_id, 1, "up-1b", 5 * 1024 * 1024, "crc32")  # a new upload: no part yet
    assert journal.list_shard_parts(batch_id, 1) == []
    assert journal.list_shard_parts(batch_id, 2) == [PartRecord(1, 7, "q1", None)]


# -- the batch's counts, forgetting, deleting ---------------------------------------------------


def test_get_state_counts_shards_and_their_bytes_per_state(journal: Journal, backend: JournalBackend,
                                                           batch_id: str) -> None:
    add(journal, batch_id, "a", "b", "c", "d")
    journal.plan_shard(batch_id, [("a", 512)], 1000)
    journal.plan_shard(batch_id, [("b", 512)], 2000)
    journal.plan_shard(batch_id, [("c", 512)], 4000)
    journal.plan_shard(batch_id, [("d", 512)], 8000)
    journal.complete_shard(batch_id, 2, sha256=SHA, etag="e", digests=digests("b"))
    journal.complete_shard(batch_id, 3, sha256=SHA, etag="e", digests=digests("c"))
    journal.drop_shard(batch_id, 4, "gone", {})
    with second_journal(backend) as reader:
        state = reader.get_state(batch_id)
    assert state.shards == {ShardState.UPLOADING: 1, ShardState.UPLOADED: 2, ShardState.DROPPED: 1}
    assert state.shard_bytes == {ShardState.UPLOADING: 1000, ShardState.UPLOADED: 6000, ShardState.DROPPED: 8000}
    assert (state.counts[FileState.UPLOADED], state.counts[FileState.UPLOADING], state.counts[FileState.PENDING]) == (
        2, 1, 1)
    other = open_batch(journal)
    assert journal.get_state(other).shards == {}


def test_forget_batch_removes_its_shard_rows_and_keeps_its_counts(journal: Journal, backend: JournalBackend,
                                                                  batch_id: str) -> None:
    add(journal, batch_id, "a", "b", "c")
    plan(journal, batch_id, "a", "b")
    journal.complete_shard(batch_id, 1, sha256=SHA, etag="e", digests=digests("a", "b"))
    plan(journal, batch_id, "c")
    journal.record_shard_upload(batch_id, 2, "up-2", 5 * 1024 * 1024, None)
    journal.record_shard_part(batch_id, 2, PartRecord(1, 100, "p1", None))
    other = open_batch(journal)
    add(journal, other, "a")
    plan(journal, other, "a")
    move_batch(journal, batch_id, BatchState.ABORTED)  # a terminal batch, with a shard left uploading
    assert journal.forget_batch(batch_id)
    with second_journal(backend) as reader:
        assert list(reader.iter_shards(batch_id)) == []
        assert reader.list_shard_parts(batch_id, 2) == []
        assert (count_rows(reader, "shards", batch_id), count_rows(reader, "shard_parts", batch_id)) == (0, 0)
        state = reader.get_state(batch_id)
        assert state.shards == {} and state.counts[FileState.UPLOADED] == 2
        assert [s.shard_no for s in reader.iter_shards(other)] == [1]  # another batch's are kept


def test_delete_batch_takes_its_shards_and_their_parts(journal: Journal, backend: JournalBackend,
                                                       batch_id: str) -> None:
    add(journal, batch_id, "a")
    plan(journal, batch_id, "a")
    journal.record_shard_upload(batch_id, 1, "up-1", 5 * 1024 * 1024, None)
    journal.record_shard_part(batch_id, 1, PartRecord(1, 100, "p1", None))
    journal.delete_batch(batch_id)
    with second_journal(backend) as reader:
        assert (count_rows(reader, "shards", batch_id), count_rows(reader, "shard_parts", batch_id)) == (0, 0)


# -- the fence (a shared journal) ----------------------------------------------------------------


@pytest.fixture
def shared(pg_url: str):  # type: ignore[no-untyped-def]
    """Two hosts' handles on one PostgreSQL journal, each bound to its worker: A (a short lease)
    and B; a batch whose files a0..a3 are one chunk and b0..b3 another."""
    from archup.journal.postgres import PostgresJournal

    host_a, host_b = PostgresJournal(pg_url), PostgresJournal(pg_url)
    batch = new_batch_id()
    host_a.init_batch(batch, source_root="/src", bucket="b", prefix="staging/", part_size=8 * 1024 * 1024)
    add(host_a, batch, "a0", "a1", "a2", "a3")
    add(host_a, batch, "b0", "b1", "b2", "b3")
    host_a.register_worker(batch, "A", 0.3)
    host_b.register_worker(batch, "B", 60)
    try:
        yield host_a, host_b, batch
    finally:
        host_a.close()
        host_b.close()


def _claim(handle, batch: str, worker: str, lease: float, tries: int = 300) -> int:  # type: ignore[no-untyped-def]
    """Claim a chunk (bounded polls: another worker's lease may have to run out first)."""
    for _ in range(tries):
        claim = handle.claim_chunk(batch, worker, lease)
        if claim is not None:
            return int(claim.chunk_no)
        threading.Event().wait(0.02)
    raise AssertionError(f"{worker} could claim no chunk")


def test_only_the_owner_of_every_members_chunk_may_plan_a_shard(shared) -> None:  # type: ignore[no-untyped-def]
    host_a, host_b, batch = shared
    first = _claim(host_a, batch, "A", 60)
    assert {r.rel_path for r in host_a.chunk_files(batch, first)} == {"a0", "a1", "a2", "a3"}
    with pytest.raises(LeaseLost):
        host_b.plan_shard(batch, [("a0", 512)], 2048)  # A's chunk
    with pytest.raises(LeaseLost):
        host_a.plan_shard(batch, [("a0", 512), ("b0", 1536)], 4096)  # b0's chunk is nobody's yet
    assert list(host_a.iter_shards(batch)) == []
    assert {host_a.get_file(batch, name).state for name in ("a0", "b0")} == {FileState.PENDING}
    _claim(host_a, batch, "A", 60)
    shard = host_a.plan_shard(batch, [("a0", 512), ("b0", 1536)], 4096)  # both chunks A's now
    assert shard.shard_no == 1


def test_a_host_that_lost_its_claim_cannot_touch_its_shard_and_the_new_owner_can(
        shared) -> None:  # type: ignore[no-untyped-def]
    """A plans and sends a shard, then goes silent; B takes the chunk over once A's lease ran
    out: chunk_files hands B the shard's members (uploading), and A's every write on the shard
    is refused while B's are recorded."""
    host_a, host_b, batch = shared
    chunk = _claim(host_a, batch, "A", 0.3)
    plan(host_a, batch, "a0", "a1")
    host_a.record_shard_upload(batch, 1, "up-a", 5 * 1024 * 1024, None)
    taken = _claim(host_b, batch, "B", 60)
    while taken != chunk:  # B may be handed the other chunk first
        taken = _claim(host_b, batch, "B", 60)
    files = {r.rel_path: (r.state, r.shard_no) for r in host_b.chunk_files(batch, chunk)}
    assert files == {"a0": (FileState.UPLOADING, 1), "a1": (FileState.UPLOADING, 1),
                     "a2": (FileState.PENDING, None), "a3": (FileState.PENDING, None)}
    for late in (lambda: host_a.record_shard_part(batch, 1, PartRecord(1, 100, "late", None)),
                 lambda: host_a.record_shard_upload(batch, 1, "up-late", 5 * 1024 * 1024, None),
                 lambda: host_a.complete_shard(batch, 1, sha256=SHA, etag="late", digests=[("a0", SHA), ("a1", SHA)]),
                 lambda: host_a.drop_shard(batch, 1, "late", {}),
                 lambda: host_a.plan_shard(batch, [("a2", 512)], 2048)):
        with pytest.raises(LeaseLost):
            late()
    assert host_b.get_shard(batch, 1).upload_id == "up-a" and host_b.list_shard_parts(batch, 1) == []
    host_b.record_shard_part(batch, 1, PartRecord(1, 100, "p1", None))
    host_b.complete_shard(batch, 1, sha256=SHA, etag="from-b", digests=[("a0", SHA), ("a1", SHA)])
    assert host_b.get_shard(batch, 1).etag == "from-b"
    assert {host_b.get_file(batch, n).state for n in ("a0", "a1")} == {FileState.UPLOADED}


def test_the_new_owner_may_drop_a_dead_hosts_shard_and_plan_its_members_again(
        shared) -> None:  # type: ignore[no-untyped-def]
    host_a, host_b, batch = shared
    chunk = _claim(host_a, batch, "A", 0.3)
    plan(host_a, batch, "a0", "a1")
    taken = _claim(host_b, batch, "B", 60)
    while taken != chunk:
        taken = _claim(host_b, batch, "B", 60)
    host_b.drop_shard(batch, 1, "its recorded layout no longer matches; planned again", {})
    assert plan(host_b, batch, "a1", "a0").shard_no == 2
    assert host_b.finish_chunk(batch, chunk, "B")


def test_finalize_drops_an_uploaded_shard_unfenced_and_its_chunk_is_claimed_again(
        shared) -> None:  # type: ignore[no-untyped-def]
    """The read-back found a stored shard missing: the finalizing host drops it (it owns no
    chunk then) and the members' done chunk is reopened, so any host sends them again."""
    host_a, host_b, batch = shared
    chunk = _claim(host_b, batch, "B", 60)
    names = [r.rel_path for r in host_b.chunk_files(batch, chunk)]
    host_b.plan_shard(batch, [(name, 512 + 1024 * i) for i, name in enumerate(names)], 8192)
    host_b.complete_shard(batch, 1, sha256=SHA, etag="e", digests=[(name, SHA) for name in names])
    assert host_b.finish_chunk(batch, chunk, "B")
    host_a.bind_worker("some finalizing worker")
    host_a.drop_shard(batch, 1, "shard missing from the bucket", {})
    host_a.register_worker(batch, "C", 60)
    again = _claim(host_a, batch, "C", 60)
    while again != chunk:
        again = _claim(host_a, batch, "C", 60)
    assert {r.rel_path: r.state for r in host_a.chunk_files(batch, chunk)} == {n: FileState.PENDING for n in names}


def test_shard_rows_of_another_batch_are_left_alone(journal: Journal, batch_id: str) -> None:
    other = open_batch(journal, str(ULID()))
    add(journal, batch_id, "a")
    add(journal, other, "a")
    plan(journal, batch_id, "a")
    assert plan(journal, other, "a").shard_no == 1  # numbers are per batch
    journal.drop_shard(other, 1, "gone", {})
    assert journal.get_shard(batch_id, 1).state is ShardState.UPLOADING
    assert journal.get_file(batch_id, "a").shard_no == 1


def test_iter_files_takes_only_packed_or_only_unpacked_files(journal: Journal, batch_id: str) -> None:
    add(journal, batch_id, "a", "b", "c", "d")
    plan(journal, batch_id, "b", "d")
    assert [r.rel_path for r in journal.iter_files(batch_id, packed=True)] == ["b", "d"]
    assert [r.rel_path for r in journal.iter_files(batch_id, packed=False)] == ["a", "c"]
    assert [r.rel_path for r in journal.iter_files(batch_id)] == ["a", "b", "c", "d"]
    assert [r.rel_path for r in journal.iter_files(batch_id, [FileState.PENDING], packed=False)] == ["a", "c"]
    assert list(journal.iter_files(batch_id, [FileState.PENDING], packed=True)) == []
