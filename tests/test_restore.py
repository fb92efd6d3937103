"""archup restore through the CLI against the moto server: the batch comes back exactly,
every byte checked; a forged or damaged bucket writes nothing unverified and nothing outside
the target."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_verify import make_source, upload

MiB = 1024 * 1024

FILES = {
    "a.txt": b"alpha\n" * 100,
    "dir/b.bin": bytes(range(256)) * 8,
    "dir/sub/c.bin": b"c" * 3000,
    "m\u00e9lange.txt": b"unicode name\n",
    "empty": b"",
}


def restore(cli: Any, batch_id: str, target: Path, *args: str, journal: bool = True) -> tuple[int, dict[str, Any]]:
    """archup restore --json; without ``journal``, from the bucket alone (a journal path that does not exist)."""
    where = str(cli.journal) if journal else str(target.parent / "no-such-journal.db")
    result = cli("restore", batch_id, str(target), "--json", "--journal", where, "--endpoint-url", cli.endpoint,
                 *([] if journal else ["--bucket", cli.bucket]), *args)
    return result.exit_code, json.loads(result.stdout)


def tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def entries(s3: Any, bucket: str, batch: dict[str, Any]) -> list[dict[str, Any]]:
    body = s3.get_object(Bucket=bucket, Key=batch["prefix"] + "manifest.jsonl")["Body"].read()
    return [json.loads(line) for line in body.splitlines()]


def reseal(s3: Any, bucket: str, batch: dict[str, Any], lines: list[dict[str, Any]]) -> None:
    """Rewrite manifest.jsonl and re-seal manifest.json over it, as a forger with write access would."""
    body = b"".join((json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n").encode() for line in lines)
    summary = json.loads(s3.get_object(Bucket=bucket, Key=batch["manifest_key"])["Body"].read())
    s3.put_object(Bucket=bucket, Key=summary["entries"]["key"], Body=body)
    summary["entries"].update(sha256=hashlib.sha256(body).hexdigest(), bytes=len(body), count=len(lines))
    summary["files_uploaded"] = len(lines)
    summary["total_bytes"] = sum(line["size"] for line in lines)
    s3.put_object(Bucket=bucket, Key=batch["manifest_key"], Body=json.dumps(summary).encode())


@pytest.fixture
def batch(cli: Any, tmp_path: Path) -> dict[str, Any]:
    return upload(cli, make_source(tmp_path / "src", FILES))


@pytest.mark.localstack
def test_restore_from_the_bucket_alone_gives_the_exact_tree(cli, batch, tmp_path) -> None:
    target = tmp_path / "out"
    code, report = restore(cli, batch["batch_id"], target, journal=False)
    assert code == 0
    assert tree(target) == FILES
    assert (report["files_restored"], report["bytes_restored"], report["files_failed"]) == (
        len(FILES), sum(map(len, FILES.values())), 0)
    source_mtime = (tmp_path / "src" / "dir/sub/c.bin").stat().st_mtime_ns
    assert (target / "dir/sub/c.bin").stat().st_mtime_ns == source_mtime
    assert not [p for p in target.rglob(".archup-restore-*")]

    # Again: everything is in place and verified; nothing is downloaded a second time.
    code, report = restore(cli, batch["batch_id"], target)
    assert code == 0
    assert (report["files_present"], report["files_restored"], report["bytes_restored"]) == (len(FILES), 0, 0)


@pytest.mark.localstack
def test_large_objects_come_back_as_parallel_ranges(cli, tmp_path) -> None:
    big = os.urandom(3 * MiB + 12345)
    batch = upload(cli, make_source(tmp_path / "src", {"big.bin": big, "small": b"s"}), "--part-size", "5MiB")
    code, report = restore(cli, batch["batch_id"], tmp_path / "out", "--part-size", "1MiB", "--parallel", "4")
    assert code == 0, report
    assert tree(tmp_path / "out") == {"big.bin": big, "small": b"s"}


def test_selection_by_glob_and_files_from(cli, batch, tmp_path) -> None:
    code, report = restore(cli, batch["batch_id"], tmp_path / "one", "--include", "dir/**", "--exclude", "*.bin")
    assert code == 0 and tree(tmp_path / "one") == {}
    code, report = restore(cli, batch["batch_id"], tmp_path / "two", "--include", "dir/**")
    assert set(tree(tmp_path / "two")) == {"dir/b.bin", "dir/sub/c.bin"}
    listed = tmp_path / "list.txt"
    listed.write_text("a.txt\n# a comment\nm\u00e9lange.txt\n", encoding="utf-8")
    code, report = restore(cli, batch["batch_id"], tmp_path / "three", "--files-from", str(listed))
    assert code == 0 and set(tree(tmp_path / "three")) == {"a.txt", "m\u00e9lange.txt"}


@pytest.mark.localstack
def test_a_broken_seal_writes_nothing(cli, s3, bucket, batch, tmp_path) -> None:
    key = batch["prefix"] + "manifest.jsonl"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=body.replace(b"a.txt", b"A.txt"))
    target = tmp_path / "out"
    result = cli("restore", batch["batch_id"], str(target), "--journal", str(tmp_path / "none.db"),
                 "--bucket", bucket, "--endpoint-url", cli.endpoint)
    assert result.exit_code == 3
    assert "does not match its seal" in result.stderr and "manifest.jsonl" in result.stderr
    assert not target.exists()


@pytest.mark.localstack
def test_replaced_bytes_are_never_renamed_into_place(cli, s3, bucket, batch, tmp_path) -> None:
    key = batch["prefix"] + "files/a.txt"
    s3.put_object(Bucket=bucket, Key=key, Body=b"Alpha\n" * 100)  # same size, other bytes
    target = tmp_path / "out"
    code, report = restore(cli, batch["batch_id"], target)
    assert code == 3
    assert [failure["path"] for failure in report["failures"]] == ["a.txt"]
    assert "SHA-256" in report["failures"][0]["reason"]
    assert not (target / "a.txt").exists()
    assert not list(target.rglob(".archup-restore-*"))
    assert {k: v for k, v in tree(target).items()} == {k: v for k, v in FILES.items() if k != "a.txt"}


@pytest.mark.parametrize("path", ["../escape.txt", "/etc/escape.txt", "dir//x", "./x", "dir/../../x"])
def test_a_forged_path_is_refused_and_nothing_leaves_the_target(cli, s3, bucket, batch, tmp_path, path) -> None:
    lines = entries(s3, bucket, batch)
    forged = dict(lines[0], path=path, key=batch["prefix"] + "files/" + path)
    reseal(s3, bucket, batch, sorted(lines + [forged], key=lambda line: line["key"].encode()))
    target = tmp_path / "deep" / "out"
    code, report = restore(cli, batch["batch_id"], target, journal=False)
    assert code == 3
    assert [failure["path"] for failure in report["failures"]] == [path]
    assert "refused" in report["failures"][0]["reason"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]
    assert not (tmp_path / "escape.txt").exists() and not Path("/etc/escape.txt").exists()
    assert tree(target) == FILES


def test_a_symlink_inside_the_target_leads_nowhere(cli, batch, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "dir").symlink_to(outside)
    code, report = restore(cli, batch["batch_id"], target)
    assert code == 3
    assert sorted(failure["path"] for failure in report["failures"]) == ["dir/b.bin", "dir/sub/c.bin"]
    assert list(outside.iterdir()) == []


def test_files_in_the_way_are_kept_or_replaced_only_with_overwrite(cli, batch, tmp_path) -> None:
    target = tmp_path / "out"
    (target / "dir").mkdir(parents=True)
    (target / "a.txt").write_bytes(FILES["a.txt"])                       # the same: kept
    (target / "dir" / "b.bin").write_bytes(b"x" * len(FILES["dir/b.bin"]))  # same size, other bytes
    code, report = restore(cli, batch["batch_id"], target)
    assert code == 3
    assert report["files_present"] == 1
    assert [failure["path"] for failure in report["failures"]] == ["dir/b.bin"]
    assert (target / "dir" / "b.bin").read_bytes() == b"x" * len(FILES["dir/b.bin"])

    code, report = restore(cli, batch["batch_id"], target, "--overwrite")
    assert code == 0
    assert tree(target) == FILES


def test_a_journal_that_knows_the_batch_locates_it(cli, batch, tmp_path) -> None:
    code, report = restore(cli, batch["batch_id"], tmp_path / "out")
    assert code == 0 and tree(tmp_path / "out") == FILES


def test_an_unknown_batch_without_a_bucket_is_a_usage_error(cli, tmp_path) -> None:
    result = cli("restore", "01K8RNKN488RQCG3YGG72QBZS5", str(tmp_path / "out"),
                 "--journal", str(tmp_path / "none.db"))
    assert result.exit_code == 2
    assert "--bucket" in result.stderr
    result = cli("restore", "01K8RNKN488RQCG3YGG72QBZS5", str(tmp_path / "out"),
                 "--journal", str(tmp_path / "none.db"), "--bucket", cli.bucket, "--endpoint-url", cli.endpoint)
    assert result.exit_code == 3 and "no manifest" in result.stderr


def test_dry_run_says_what_it_would_do_and_writes_nothing(cli, batch, tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_bytes(FILES["a.txt"])
    result = cli("restore", batch["batch_id"], str(target), "--dry-run", "--journal", str(cli.journal),
                 "--endpoint-url", cli.endpoint)
    assert result.exit_code == 0, result.stderr
    assert "keep   a.txt" in result.stdout and "fetch  dir/b.bin" in result.stdout
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]


# -- kill -9, signals -----------------------------------------------------------

CRASH_FILES = {**{f"small/{n:02}.txt": f"small {n}\n".encode() * (n + 1) for n in range(8)},
               "big-1.bin": bytes(range(256)) * 9000, "big-2.bin": bytes(reversed(range(256))) * 9000}


@pytest.mark.localstack
@pytest.mark.parametrize("point", ["restore-range-written:3", "restore-before-rename:4", "restore-after-rename:5"])
def test_kill_9_anywhere_then_the_same_command_ends_with_the_exact_tree(cli, tmp_path, point) -> None:
    import signal

    from archup.crashpoints import RESTORE_POINTS

    assert point.partition(":")[0] in RESTORE_POINTS
    batch = upload(cli, make_source(tmp_path / "src", CRASH_FILES))
    target = tmp_path / "out"
    args = ("restore", batch["batch_id"], str(target), "--json", "--endpoint-url", cli.endpoint,
            "--part-size", "1MiB", "--parallel", "2")
    crashed = cli.subprocess(*args, env={"ARCHUP_CRASH_AT": point})
    assert crashed.exit_code == -signal.SIGKILL, crashed.stderr
    in_place_before = {name: body for name, body in tree(target).items() if not name.split("/")[-1].startswith(".")}
    assert all(CRASH_FILES[name] == body for name, body in in_place_before.items())  # nothing unverified in sight

    rerun = cli.subprocess(*args)
    assert rerun.exit_code == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert tree(target) == CRASH_FILES  # the exact tree, no temporary file left
    # What was in place before the rerun was checked, not fetched again.
    assert report["files_present"] == len(in_place_before)
    assert report["files_restored"] == len(CRASH_FILES) - len(in_place_before)


# -- cold storage -------------------------------------------------------------------


def test_archived_objects_are_thawed_then_restored_on_the_next_run(cli, s3, bucket, tmp_path) -> None:
    batch = upload(cli, make_source(tmp_path / "src", FILES), "--storage-class", "GLACIER")
    target = tmp_path / "out"
    code, report = restore(cli, batch["batch_id"], target, journal=False)
    assert code == 75
    assert (report["objects_thawing"], report["thaw_requests"], report["files_failed"]) == (len(FILES), len(FILES), 0)
    assert tree(target) == {}
    head = s3.head_object(Bucket=bucket, Key=batch["prefix"] + "files/a.txt")
    assert "ongoing-request" in head["ResponseMetadata"]["HTTPHeaders"]["x-amz-restore"]

    code, report = restore(cli, batch["batch_id"], target, journal=False)
    assert code == 0 and report["thaw_requests"] == 0
    assert tree(target) == FILES


def test_wait_thaws_and_restores_in_one_run(cli, tmp_path) -> None:
    batch = upload(cli, make_source(tmp_path / "src", FILES), "--storage-class", "DEEP_ARCHIVE")
    code, report = restore(cli, batch["batch_id"], tmp_path / "out", "--wait", "--restore-tier", "Bulk")
    assert code == 0, report
    assert report["thaw_requests"] == len(FILES) and tree(tmp_path / "out") == FILES


def test_dry_run_names_what_would_be_thawed(cli, s3, bucket, tmp_path) -> None:
    batch = upload(cli, make_source(tmp_path / "src", FILES), "--storage-class", "GLACIER")
    result = cli("restore", batch["batch_id"], str(tmp_path / "out"), "--dry-run", "--endpoint-url", cli.endpoint)
    assert result.exit_code == 0, result.stderr
    assert "thaw   a.txt" in result.stdout
    head = s3.head_object(Bucket=bucket, Key=batch["prefix"] + "files/a.txt")
    assert "x-amz-restore" not in head["ResponseMetadata"]["HTTPHeaders"]


def test_a_signal_stops_with_130_and_the_same_command_finishes(cli, tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time

    files = {"a.bin": os.urandom(2 * MiB), "b.bin": os.urandom(2 * MiB), "c.txt": b"c"}
    batch = upload(cli, make_source(tmp_path / "src", files))
    target = tmp_path / "out"
    args = [sys.executable, "-m", "archup", "restore", batch["batch_id"], str(target), "--json", "--journal",
            str(cli.journal), "--endpoint-url", cli.endpoint, "--bwlimit", "1MiB", "--parallel", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # A bounded poll for the first temporary file: the restore is then mid-file.
        while not (target.exists() and list(target.glob(".archup-restore-*"))) and time.monotonic() < deadline:
            try:
                proc.wait(0.02)  # a wait on the restore's end, 20 ms a turn
                break
            except subprocess.TimeoutExpired:
                pass
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert json.loads(stdout)["exit_code"] == 130
    assert not list(target.rglob(".archup-restore-*"))
    assert all(files[name] == body for name, body in tree(target).items())

    code, report = restore(cli, batch["batch_id"], target)
    assert code == 0 and tree(target) == files


def test_metrics_file_says_what_the_restore_did(cli, batch, tmp_path) -> None:
    from test_metrics import parse, value

    metrics_file = tmp_path / "textfile" / "archup.prom"
    metrics_file.parent.mkdir()
    code, _ = restore(cli, batch["batch_id"], tmp_path / "out", "--metrics-file", str(metrics_file))
    assert code == 0
    families = parse(metrics_file)
    assert value(families, "archup_last_run_exit_code", command="restore") == 0
    assert value(families, "archup_restore_files_restored") == len(FILES)
    assert value(families, "archup_restore_bytes_restored") == sum(map(len, FILES.values()))
    assert value(families, "archup_restore_files_failed") == 0


def test_a_terminal_gets_live_progress_then_the_summary(cli, tmp_path) -> None:
    import re
    import sys

    from test_terminal import _run_in_a_terminal

    files = {f"f{n}.bin": os.urandom(256 * 1024) for n in range(6)}
    batch = upload(cli, make_source(tmp_path / "src", files))
    args = [sys.executable, "-m", "archup", "restore", batch["batch_id"], str(tmp_path / "out"), "--journal",
            str(cli.journal), "--endpoint-url", cli.endpoint, "--parallel", "2", "--bwlimit", "512KiB"]
    code, output = _run_in_a_terminal(args)
    assert code == 0, output
    assert "\x1b[" in output
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert re.search(r"\d+/6 files", plain), plain  # the live line: files done of the total
    assert "files restored" in plain  # then the summary, as a table
    assert tree(tmp_path / "out") == files


def test_a_resealed_summary_is_refused_when_the_journal_knows_the_batch(cli, s3, bucket, batch, tmp_path) -> None:
    lines = entries(s3, bucket, batch)
    lines[0]["sha256"] = hashlib.sha256(b"forged").hexdigest()
    reseal(s3, bucket, batch, lines)  # a seal that holds on its own
    code, report = restore(cli, batch["batch_id"], tmp_path / "out")
    assert code == 3 and "not the summary the journal recorded" in report["error"]
    assert not (tmp_path / "out").exists()
