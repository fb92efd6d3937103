"""The pieces of the fast scan and status paths, each checked against the slow, obvious answer.

- read_ahead: every item once, in order, in groups; bounded; errors and early stops cross the thread.
- SQLiteJournal.add_files through one JSON statement stores exactly what row-by-row binding stores.
- get_state's two plans for the problem list give the same answer as a plain sort.
- Uploader.scan over a real tree, in many small groups, leaves the rows the walk saw.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import cast

import pytest
from ulid import ULID

import archup.uploader as uploader_module
from archup.clock import isoformat, utcnow
from archup.journal import EncodedFiles, Journal, NewFile, SQLiteJournal
from archup.journal.sqlite import _INSERT_FILE
from archup.scan import identity_of, read_ahead
from archup.states import FileState
from archup.store import S3Store
from archup.uploader import Uploader, UploadOptions

# -- read_ahead -----------------------------------------------------------------------------


def test_read_ahead_hands_over_every_item_once_in_order_in_prepared_groups() -> None:
    groups = list(read_ahead(range(10_007), 1000, tuple))

    assert [len(group) for group in groups] == [1000] * 10 + [7]
    assert [item for group in groups for item in group] == list(range(10_007))


def test_read_ahead_of_nothing_is_nothing() -> None:
    assert list(read_ahead(iter(()), 10, list)) == []


def test_read_ahead_runs_ahead_but_never_more_than_its_bound() -> None:
    group_size, depth = 10, 2
    # Held by the caller (1 group), queued (depth), being filled by the producer (1).
    bound = (depth + 2) * group_size
    pulled = 0
    reached_bound, overran = threading.Event(), threading.Event()

    def endless() -> Iterator[int]:
        nonlocal pulled
        while True:
            pulled += 1
            if pulled >= bound:
                reached_bound.set()
            if pulled > bound:
                overran.set()
            yield pulled

    with closing(read_ahead(endless(), group_size, list, depth=depth)) as groups:
        assert next(groups) == list(range(1, group_size + 1))
        # The walk went on while the caller held its group ...
        assert reached_bound.wait(timeout=10)
        # ... and then waited for the caller instead of filling memory.
        assert not overran.wait(timeout=0.5)


def test_read_ahead_raises_the_walks_error_in_the_callers_thread() -> None:
    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise PermissionError(13, "Permission denied", "/src/locked")

    groups = read_ahead(failing(), 1, list)
    assert next(groups) == [1]
    assert next(groups) == [2]
    with pytest.raises(PermissionError, match="Permission denied"):
        next(groups)


def test_read_ahead_error_in_prepare_is_raised_too() -> None:
    def prepare(group: list[int]) -> list[int]:
        raise ValueError(f"cannot prepare {group}")

    with pytest.raises(ValueError, match=r"cannot prepare \[1, 2\]"):
        list(read_ahead([1, 2], 5, prepare))


def test_read_ahead_closed_early_stops_its_thread() -> None:
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled

    groups = read_ahead(endless(), 5, list)
    next(groups)
    groups.close()  # joins the producer

    assert not [t for t in threading.enumerate() if t.name == "archup-scan"]
    assert pulled <= 4 * 5  # never ran past its bound


@pytest.mark.parametrize(("group_size", "depth"), [(0, 1), (1, 0)])
def test_read_ahead_refuses_empty_groups_or_queue(group_size: int, depth: int) -> None:
    with pytest.raises(ValueError):
        next(read_ahead([1], group_size, list, depth=depth))


# -- add_files: JSON statement vs row-by-row binding ----------------------------------------

AWKWARD_NAMES = [
    "plain.txt", "dir/sub/file.bin", "é/ñ/ü.txt", "emoji-😀.txt", "日本語/ファイル", 'quote"d', "back\\slash",
    "new\nline", "tab\tand\rcarriage", "ctrl-\x01\x1f\x7f", "line-sep\u2028para-sep\u2029", "bom\ufeff",
    "literal-\\u0000-text", "[json]", "{\"a\": 1}", " leading and trailing ", "a/", "x" * 1000,
]


def awkward_files(batch_id: str) -> list[NewFile]:
    files = [NewFile(name, f"staging/{batch_id}/files/{name}", index * 7, 1_700_000_000_123_456_789 + index,
                     identity=f"2049:{index}:{index * 3}") for index, name in enumerate(AWKWARD_NAMES)]
    files += [
        NewFile("skipped-link", f"staging/{batch_id}/files/skipped-link", 0, -5, FileState.SKIPPED,
                "symlink (not followed)"),
        NewFile("huge", f"staging/{batch_id}/files/huge", 2**62, 2**63 - 1),
        NewFile("nul\x00inside", f"staging/{batch_id}/files/nul\x00inside", 1, 1),
    ]
    return files


def rows_of(path: Path, batch_id: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT rel_path, key, size, mtime_ns, state, error, identity, part_size, upload_id, "
                            "sha256, etag, attempts, typeof(size), typeof(mtime_ns), typeof(error) "
                            "FROM files WHERE batch_id = ? ORDER BY rel_path", (batch_id,)).fetchall()


def open_batch(journal: Journal) -> str:
    batch_id = str(ULID())
    journal.init_batch(batch_id, source_root="/src", bucket="archive", prefix="staging/", part_size=8 << 20)
    return batch_id


@pytest.mark.parametrize("with_nul", [False, True], ids=["json-statement", "nul-falls-back-to-rows"])
def test_add_files_stores_exactly_what_row_by_row_binding_stores(tmp_path: Path, with_nul: bool) -> None:
    journal = SQLiteJournal(tmp_path / "journal.db")
    fast, slow = open_batch(journal), open_batch(journal)
    files = [f for f in awkward_files("B") if with_nul or "\x00" not in f.rel_path]

    assert journal.add_files(fast, files, durable=False) == len(files)
    now = isoformat(utcnow())
    with journal.atomic() as conn:
        conn.executemany(_INSERT_FILE, [(slow, f.rel_path, f.key, f.size, f.mtime_ns, f.state.value, f.error,
                                         f.identity, now) for f in files])
    journal.close()

    fast_rows, slow_rows = rows_of(tmp_path / "journal.db", fast), rows_of(tmp_path / "journal.db", slow)
    assert len(fast_rows) == len(files)
    assert fast_rows == slow_rows


def test_encoded_group_is_added_like_the_files_it_holds(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "journal.db")
    batch_id = open_batch(journal)
    files = [NewFile(f"f{n:03d}", f"k/f{n:03d}", n, n) for n in (5, 1, 3)]

    encoded = SQLiteJournal.encode_files(files)
    assert isinstance(encoded, EncodedFiles) and encoded.count == 3
    assert journal.add_files(batch_id, encoded) == 3
    assert journal.add_files(batch_id, SQLiteJournal.encode_files(files)) == 0
    assert journal.add_files(batch_id, SQLiteJournal.encode_files([])) == 0
    assert [(f.rel_path, f.size) for f in journal.iter_files(batch_id)] == [("f001", 1), ("f003", 3), ("f005", 5)]


def test_duplicate_path_within_one_group_keeps_the_first(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "journal.db")
    batch_id = open_batch(journal)
    files = [NewFile("z", "k/z", 1, 1), NewFile("a", "k/a", 10, 1), NewFile("a", "k/a", 20, 1)]

    assert journal.add_files(batch_id, files) == 2
    assert journal.get_file(batch_id, "a").size == 10


def test_scan_settings_are_put_back_after_each_group(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "journal.db")
    batch_id = open_batch(journal)
    conn = journal.db.connection()
    before = (conn.execute("PRAGMA synchronous").fetchone()[0], conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])

    journal.add_files(batch_id, [NewFile("a", "k/a", 1, 1)], durable=False)

    after = (conn.execute("PRAGMA synchronous").fetchone()[0], conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
    assert after == before == (2, 1000)  # FULL, SQLite's default


# -- get_state: the problem list under either plan ------------------------------------------


@pytest.mark.parametrize(("total", "failed_every", "plan"), [
    (400, 97, "INDEXED BY files_by_state "),  # 4 problems in 400: read them through the state index
    (400, 2, ""),                             # 200 in 400: walk in key order, stop after the first 20
])
def test_problem_list_is_the_first_failed_or_skipped_files_in_key_order(
        tmp_path: Path, total: int, failed_every: int, plan: str) -> None:
    journal = SQLiteJournal(tmp_path / "journal.db")
    batch_id = open_batch(journal)
    names = [f"n{(n * 7919) % total:04d}" for n in range(total)]  # not in key order
    journal.add_files(batch_id, [
        NewFile(name, f"k/{name}", 1, 1, FileState.SKIPPED if index % (2 * failed_every) == 0 else FileState.PENDING,
                "symlink" if index % (2 * failed_every) == 0 else None)
        for index, name in enumerate(names)])
    for index, name in enumerate(names):
        if index % failed_every == 0 and index % (2 * failed_every):
            journal.fail_file(batch_id, name, "AccessDenied")
    with closing(sqlite3.connect(tmp_path / "journal.db")) as conn:
        expected = [row[0] for row in conn.execute(
            "SELECT rel_path FROM files WHERE batch_id = ? AND state IN ('failed', 'skipped')", (batch_id,))]
    expected.sort(key=lambda name: f"k/{name}")

    summary = journal.get_state(batch_id)
    problem_count = summary.counts[FileState.FAILED] + summary.counts[FileState.SKIPPED]

    assert problem_count == len(expected) > 0
    assert SQLiteJournal._problem_plan(problem_count, total, 20) == plan
    assert [f.rel_path for f in summary.problems] == expected[:20]
    assert [f.rel_path for f in journal.get_state(batch_id, problem_limit=3).problems] == expected[:3]
    assert journal.get_state(batch_id, problem_limit=0).problems == []


def test_problem_plan_walks_key_order_only_when_problems_are_common() -> None:
    assert SQLiteJournal._problem_plan(0, 1_000_000, 20) == "INDEXED BY files_by_state "
    assert SQLiteJournal._problem_plan(4_000, 1_000_000, 20) == "INDEXED BY files_by_state "
    assert SQLiteJournal._problem_plan(5_000, 1_000_000, 20) == ""
    assert SQLiteJournal._problem_plan(1_000_000, 1_000_000, 20) == ""
    assert SQLiteJournal._problem_plan(3, 10, -1) == "INDEXED BY files_by_state "  # no limit: read just the problems


# -- Uploader.scan over a real tree, in many groups -----------------------------------------


def make_tree(root: Path) -> dict[str, os.stat_result]:
    expected: dict[str, os.stat_result] = {}
    for d in range(7):
        directory = root / f"d{d}" / "deeper" if d % 3 == 0 else root / f"d{d}"
        directory.mkdir(parents=True)
        for n in range(13):
            path = directory / f"f{n}.bin"
            path.write_bytes(b"x" * (d * 13 + n))
            expected[path.relative_to(root).as_posix()] = path.lstat()
    (root / "link").symlink_to(root / "d1" / "f0.bin")
    return expected


def test_scan_in_small_groups_records_every_file_as_the_walk_saw_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploader_module, "SCAN_GROUP", 4)  # 92 entries: 23 groups through the thread
    source = tmp_path / "src"
    expected = make_tree(source)
    journal = SQLiteJournal(tmp_path / "journal.db")
    batch = journal.init_batch(str(ULID()), source_root=str(source), bucket="b", prefix="staging/",
                               part_size=8 << 20)

    Uploader(journal, cast(S3Store, None), batch.batch_id, UploadOptions()).scan()

    records = {f.rel_path: f for f in journal.iter_files(batch.batch_id)}
    assert journal.get_batch(batch.batch_id).scan_complete
    assert set(records) == set(expected) | {"link"}
    for rel_path, info in expected.items():
        record = records[rel_path]
        assert (record.key, record.size, record.mtime_ns, record.state, record.identity) == (
            f"{batch.batch_prefix}files/{rel_path}", info.st_size, info.st_mtime_ns, FileState.PENDING,
            identity_of(info))
    assert (records["link"].state, records["link"].error) == (FileState.SKIPPED, "symlink (not followed)")


def test_scan_stopped_midway_is_not_marked_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploader_module, "SCAN_GROUP", 4)
    source = tmp_path / "src"
    make_tree(source)
    journal = SQLiteJournal(tmp_path / "journal.db")
    batch = journal.init_batch(str(ULID()), source_root=str(source), bucket="b", prefix="staging/",
                               part_size=8 << 20)
    uploader = Uploader(journal, cast(S3Store, None), batch.batch_id, UploadOptions())
    real_add = journal.add_files

    def add_then_stop(*args: object, **kwargs: object) -> int:
        uploader.stop.set()  # as the first SIGINT does
        return real_add(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(journal, "add_files", add_then_stop)
    uploader.scan()

    assert not journal.get_batch(batch.batch_id).scan_complete
    assert len(list(journal.iter_files(batch.batch_id))) == 4  # the one group committed before the stop
    assert not [t for t in threading.enumerate() if t.name == "archup-scan"]


def test_scan_of_a_missing_root_raises_in_the_caller(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "journal.db")
    batch = journal.init_batch(str(ULID()), source_root=str(tmp_path / "gone"), bucket="b", prefix="staging/",
                               part_size=8 << 20)

    with pytest.raises(FileNotFoundError):
        Uploader(journal, cast(S3Store, None), batch.batch_id, UploadOptions()).scan()
    assert not journal.get_batch(batch.batch_id).scan_complete
