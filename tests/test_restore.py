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

MiB = 1024 * 1024

FILES = {
    "a.txt": b"alpha\n" * 100,
    "dir/b.bin": bytes(range(256)) * 8,
    "dir/sub/c.bin": b"c" * 3000,
    "m\u00e9lange.txt": b"unicode name\n",
    "empty": b"",
}


def make_source(root: Path, files: dict[str, bytes]) -> Path:
    for rel_path, body in files.items():
        path = root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return root


def upload(cli: Any, source: Path, *args: str) -> dict[str, Any]:
    result = cli("upload", "--json", *args, str(source))
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


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
