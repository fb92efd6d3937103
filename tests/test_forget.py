"""gc --forget-after over HTTP: terminal batches forgotten (their summaries kept), the journal
shrunk, --skip-archived still right from the archived index, and status, list and verify
of a forgotten batch."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from ulid import ULID

from archup.journal import Destination, NewFile, PartRecord, SQLiteJournal
from archup.states import BatchState, FileState


def _tree(root: Path, count: int = 6) -> Path:
    (root / "docs").mkdir(parents=True)
    for n in range(count):
        (root / "docs" / f"f{n}.txt").write_text(f"file {n}\n" * (n + 1))
    return root


def _upload(cli: Any, source: Path, *extra: str) -> dict[str, Any]:
    result = cli("upload", "--json", *extra, str(source))
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


def _gc(cli: Any, *extra: str) -> dict[str, Any]:
    result = cli("gc", "--json", "--endpoint-url", cli.endpoint, *extra)
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


def _file_rows(cli: Any, batch_id: str) -> int:
    with sqlite3.connect(cli.journal) as conn:
        return int(conn.execute("SELECT count(*) FROM files WHERE batch_id = ?", (batch_id,)).fetchone()[0])


def _index(cli: Any, source: Path) -> dict[str, str]:
    journal = SQLiteJournal(cli.journal)
    try:
        destination = Destination(str(source.resolve()), cli.bucket, "staging/", cli.endpoint)
        return {row.rel_path: row.batch_id for row in journal.iter_archived(destination)}
    finally:
        journal.close()


def _sent(s3: Any, bucket: str, summary: dict[str, Any]) -> set[str]:
    prefix = summary["prefix"] + "files/"
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"][len(prefix):] for item in listing}


def test_a_forgotten_batch_keeps_its_summary_and_status_list_and_verify_say_so(cli, s3, bucket,
                                                                               tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    summary = _upload(cli, source)
    batch_id = summary["batch_id"]
    before = json.loads(cli("status", "--json", batch_id).stdout)

    report = _gc(cli, "--forget-after", "0s")

    assert report["forgotten"] == [batch_id] and report["errors"] == []
    assert report["bytes_freed"] == report["journal_bytes_before"] - report["journal_bytes_after"] >= 0
    assert _file_rows(cli, batch_id) == 0
    after = json.loads(cli("status", "--json", batch_id).stdout)
    assert (after["files"], after["bytes_uploaded"], after["manifest_key"]) == (
        before["files"], before["bytes_uploaded"], before["manifest_key"])
    assert (after["file_list"], before["file_list"]) == ("manifest", "journal") and after["forgotten_at"]
    text = cli("status", batch_id)
    assert text.exit_code == 0, text.stderr
    assert f"its file list is in its manifest, s3://{bucket}/{summary['manifest_key']}" in text.stdout
    listed = json.loads(cli("list", "--json").stdout)["batches"]
    assert [(row["batch_id"], row["status"], bool(row["forgotten_at"]), row["files_uploaded"]) for row in listed] == [
        (batch_id, "enqueued", True, 6)]
    assert "(forgotten)" in cli("list").stdout

    verified = cli("verify", "--json", "--endpoint-url", cli.endpoint, batch_id)
    assert verified.exit_code == 0, verified.stdout
    document = json.loads(verified.stdout)
    assert (document["checked"], document["source"], document["differences"]) == (6, "manifest", [])

    # Still a real check: an object gone from the bucket is found from the manifest alone.
    s3.delete_object(Bucket=bucket, Key=f"{summary['prefix']}files/docs/f3.txt")
    broken = cli("verify", "--endpoint-url", cli.endpoint, batch_id)
    assert broken.exit_code == 3 and "docs/f3.txt" in broken.stdout, broken.stdout
    # Without its manifest a forgotten batch has no file list left to check against: said, exit 3.
    s3.delete_object(Bucket=bucket, Key=summary["manifest_key"])
    lost = cli("verify", "--json", "--endpoint-url", cli.endpoint, batch_id)
    assert lost.exit_code == 3
    lost_report = json.loads(lost.stdout)
    assert [d["problem"] for d in lost_report["differences"]] == ["manifest_missing"]
    assert lost_report["checked"] == 0


def test_skip_archived_stays_right_after_the_batches_that_archived_the_files_are_forgotten(
        cli, s3, bucket, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    first = _upload(cli, source, "--skip-archived")
    (source / "docs" / "f1.txt").write_text("changed\n")
    (source / "docs" / "f5.txt").unlink()
    (source / "new.txt").write_text("new\n")
    second = _upload(cli, source, "--skip-archived")
    assert _sent(s3, bucket, second) == {"docs/f1.txt", "new.txt"}

    assert _gc(cli, "--forget-after", "0s")["forgotten"] == [first["batch_id"], second["batch_id"]]

    # One row a path: where its latest version is; the deleted one dropped out.
    assert _index(cli, source) == {"docs/f0.txt": first["batch_id"], "docs/f1.txt": second["batch_id"],
                                   "docs/f2.txt": first["batch_id"], "docs/f3.txt": first["batch_id"],
                                   "docs/f4.txt": first["batch_id"], "new.txt": second["batch_id"]}
    (source / "docs" / "f2.txt").write_text("changed too\n")
    (source / "docs" / "f5.txt").write_text("back again\n")
    dry = json.loads(cli("upload", "--json", "--dry-run", "--skip-archived", str(source)).stdout)
    assert (dry["files"], dry["files_already_archived"]) == (2, 5)
    third = _upload(cli, source, "--skip-archived")
    assert _sent(s3, bucket, third) == {"docs/f2.txt", "docs/f5.txt"}
    assert third["files_already_archived"] == 5


def test_a_selective_run_drops_only_what_its_selection_would_have_found(cli, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    (source / "keep.log").write_text("log\n")
    first = _upload(cli, source)
    (source / "docs" / "f0.txt").unlink()
    (source / "keep.log").unlink()

    _upload(cli, source, "--skip-archived", "--include", "docs/**")

    index = _index(cli, source)
    assert "docs/f0.txt" not in index  # deleted where the run looked
    assert index["keep.log"] == first["batch_id"]  # outside its selection: never looked for


def test_gc_never_forgets_an_unfinalized_batch(cli, tmp_path: Path) -> None:
    """A batch in every state, each with files and a recorded part; gc forgets exactly the
    terminal ones, whatever their age, and leaves every other batch's rows as they were."""
    paths = {
        BatchState.OPEN: (), BatchState.UPLOADING: (BatchState.UPLOADING,),
        BatchState.FAILED: (BatchState.UPLOADING, BatchState.FAILED),
        BatchState.FINALIZING: (BatchState.UPLOADING, BatchState.FINALIZING),
        BatchState.ENQUEUED: (BatchState.UPLOADING, BatchState.FINALIZING, BatchState.ENQUEUED),
        BatchState.ABORTED: (BatchState.ABORTED,), BatchState.EXPIRED: (BatchState.EXPIRED,),
    }
    assert set(paths) == set(BatchState)
    journal = SQLiteJournal(cli.journal)
    batches: dict[BatchState, str] = {}
    try:
        for state, moves in paths.items():
            batch_id = batches[state] = str(ULID())
            # Each its own source: no batch of one source blocks another's state.
            journal.init_batch(batch_id, source_root=str(tmp_path / state.value), bucket=cli.bucket,
                               prefix="staging/", part_size=5, endpoint_url=cli.endpoint)
            journal.add_files(batch_id, [NewFile("a", f"staging/{batch_id}/files/a", 1, 1),
                                         NewFile("b", f"staging/{batch_id}/files/b", 10, 1)])
            journal.complete_file(batch_id, "a", sha256="ab" * 32, etag="e")
            journal.start_file(batch_id, "b")
            journal.record_upload_id(batch_id, "b", "upload-b", 5)
            journal.record_part(batch_id, "b", PartRecord(1, 5, "e1", None))
            for target in moves:
                journal.set_batch_state(batch_id, target, manifest_key=(
                    f"staging/{batch_id}/manifest.json" if target is BatchState.ENQUEUED else None))
    finally:
        journal.close()

    report = _gc(cli, "--forget-after", "0s", "--older-than", "9999d")

    terminal = sorted(batch_id for state, batch_id in batches.items() if state.terminal)
    assert sorted(report["forgotten"]) == terminal and report["expired"] == []
    for state, batch_id in batches.items():
        assert _file_rows(cli, batch_id) == (0 if state.terminal else 2), state
        status = json.loads(cli("status", "--json", batch_id).stdout)
        assert (status["status"], status["files"]["total"]) == (state.value, 2)
        assert status["file_list"] == ({"enqueued": "manifest", "aborted": "none", "expired": "none"}
                                       .get(state.value, "journal"))
    with sqlite3.connect(cli.journal) as conn:
        parts = {row[0] for row in conn.execute("SELECT DISTINCT batch_id FROM parts")}
    assert parts == {batch_id for state, batch_id in batches.items() if not state.terminal}
    assert _gc(cli, "--forget-after", "0s")["forgotten"] == []  # once


def test_gc_forgets_only_after_the_duration_and_never_with_never(cli, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    batch_id = _upload(cli, source)["batch_id"]

    assert _gc(cli)["forgotten"] == []  # the default, 30 days: a batch of today stays
    assert _gc(cli, "--forget-after", "never")["forgotten"] == []
    assert _file_rows(cli, batch_id) == 6
    text = cli("gc", "--forget-after", "0s")
    assert text.exit_code == 0, text.stderr
    assert f"forgot {batch_id}" in text.stdout and "1 batch(es) forgotten" in text.stdout
    bad = cli("gc", "--forget-after", "soon")
    assert bad.exit_code == 2 and "bad duration 'soon'" in bad.stderr


def test_forget_after_is_a_config_key(cli, tmp_path: Path, monkeypatch) -> None:
    source = _tree(tmp_path / "src")
    batch_id = _upload(cli, source)["batch_id"]
    config = tmp_path / "config.toml"
    config.write_text('[gc]\nforget_after = "0s"\n')
    monkeypatch.setenv("ARCHUP_CONFIG", str(config))

    assert _gc(cli)["forgotten"] == [batch_id]


def test_the_journal_shrinks_after_forgetting(cli, tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for n in range(3000):
        (root / f"file-{n:05d}-with-a-name-long-enough-to-take-some-room.txt").write_bytes(b"")
    _upload(cli, root)
    big = _gc(cli, "--forget-after", "never")  # nothing forgotten, so nothing measured either
    assert big["forgotten"] == [] and big["bytes_freed"] == 0

    report = _gc(cli, "--forget-after", "0s")

    assert report["journal_bytes_after"] < report["journal_bytes_before"] / 2, report
    assert cli.journal.stat().st_size <= report["journal_bytes_after"]
    journal = SQLiteJournal(cli.journal)
    try:
        assert journal.integrity_check() == "ok"
        assert journal.get_state(report["forgotten"][0]).counts[FileState.UPLOADED] == 3000
    finally:
        journal.close()


def test_walk_covers_keeps_what_the_walk_skipped_as_present_and_drops_a_listed_path_gone(tmp_path: Path) -> None:
    """Unit: which paths finalize lets the archived index drop for a batch's walk."""
    from archup.finalize import walk_covers
    from archup.journal import BatchSettings
    from archup.scan import LISTED_BUT_MISSING, UNREADABLE_REASONS

    journal = SQLiteJournal(tmp_path / "j.db")
    try:
        plain = str(ULID())
        journal.init_batch(plain, source_root="/s", bucket="b", prefix="p/", part_size=5)
        assert walk_covers(journal, journal.get_batch(plain)) is None  # the whole tree, nothing skipped

        listed = str(ULID())
        journal.init_batch(listed, source_root="/s", bucket="b", prefix="p/", part_size=5,
                           settings=BatchSettings(files_from=("gone.txt", "locked.txt", "dir/x.txt")))
        journal.add_files(listed, [
            NewFile("gone.txt", "k1", 0, 0, FileState.SKIPPED, LISTED_BUT_MISSING),
            NewFile("locked.txt", "k2", 0, 0, FileState.SKIPPED, "vanished or unreadable: Permission denied")])
        covers = walk_covers(journal, journal.get_batch(listed))
        assert covers is not None
        assert [covers(p) for p in ("gone.txt", "locked.txt", "dir/x.txt", "unlisted.txt")] == [
            True, False, True, False]

        walked = str(ULID())
        journal.init_batch(walked, source_root="/s", bucket="b", prefix="p/", part_size=5)
        journal.add_files(walked, [NewFile("secret", "k3", 0, 0, FileState.SKIPPED,
                                           f"{UNREADABLE_REASONS[0]}: Permission denied")])
        covers = walk_covers(journal, journal.get_batch(walked))
        assert covers is not None
        assert [covers(p) for p in ("secret/a.txt", "secret", "secretly.txt")] == [False, False, True]
    finally:
        journal.close()


def test_a_forgotten_packed_batch_loses_its_file_and_shard_rows_and_its_packed_files_stay_archived(
        cli, s3, bucket, tmp_path: Path) -> None:
    """Packed files are archived like any: after gc forgets the batch (files, shards and shard
    parts gone from the journal), the next --skip-archived batch sends only what changed."""
    source = _tree(tmp_path / "src", count=8)
    (source / "big.bin").write_bytes(b"b" * 70_000)
    first = _upload(cli, source, "--pack-under", "64KiB", "--skip-archived")
    batch_id = first["batch_id"]
    with sqlite3.connect(cli.journal) as conn:
        assert conn.execute("SELECT count(*) FROM shards WHERE batch_id = ?", (batch_id,)).fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM files WHERE batch_id = ? AND shard_no IS NOT NULL",
                            (batch_id,)).fetchone()[0] == 8

    assert _gc(cli, "--forget-after", "0s")["forgotten"] == [batch_id]

    with sqlite3.connect(cli.journal) as conn:
        for table in ("files", "shards", "shard_parts", "parts"):
            assert conn.execute(f"SELECT count(*) FROM {table} WHERE batch_id = ?", (batch_id,)).fetchone()[0] == 0
    status = json.loads(cli("status", "--json", batch_id).stdout)
    assert (status["files"]["uploaded"], status["file_list"]) == (9, "manifest")
    assert _index(cli, source) == {**{f"docs/f{n}.txt": batch_id for n in range(8)}, "big.bin": batch_id}

    (source / "docs" / "f3.txt").write_text("changed\n")
    second = _upload(cli, source, "--pack-under", "64KiB", "--skip-archived")
    assert second["files_already_archived"] == 8
    summary = json.loads(s3.get_object(Bucket=bucket, Key=second["manifest_key"])["Body"].read())
    entries = [json.loads(line) for line in s3.get_object(Bucket=bucket, Key=summary["entries"]["key"])["Body"]
               .read().splitlines()]
    assert [(e["path"], "shard" in e) for e in entries] == [("docs/f3.txt", True)]
    assert _index(cli, source)["docs/f3.txt"] == second["batch_id"]
