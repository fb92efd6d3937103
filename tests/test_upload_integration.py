"""Upload, status and finalize end to end, over HTTP to a moto S3 server through the real boto3 stack.

Every check on the bucket goes through the separate ``s3`` client, never through
archup's own store, and every check on the journal reads it back through a new
connection after the command has exited.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import both_transports
from testdata import pattern_bytes
from ulid import ULID

from archup.journal import NewFile, SQLiteJournal
from archup.states import FileState

MiB = 1024 * 1024
PART_SIZE = 5 * MiB

SMALL_TREE: dict[str, bytes] = {
    "top.txt": b"top level\n",
    "a/one.txt": b"one\n" * 100,
    "a/b/two.bin": bytes(range(256)) * 40,
    "a/b/c/three.txt": b"three levels down\n",
    "a/b/c/d/four.dat": b"\x00\x01\x02" * 999,
    "dir with spaces/file with spaces.txt": b"spaces in names\n",
    "caf\u00e9/r\u00e9sum\u00e9.txt": "r\u00e9sum\u00e9 \u00e9\n".encode(),
    "\u65e5\u672c/\u30c6\u30b9\u30c8 \u6587\u66f8.txt": "\u65e5\u672c\u8a9e\n".encode(),
    "emoji \U0001F389/party \U0001F680.txt": "\U0001F389\n".encode(),
    "empty.txt": b"",
    "a/b/empty-deep": b"",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel_path, data in files.items():
        path = root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def list_keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def get_bytes(s3: Any, bucket: str, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def one_json_object(stdout: str) -> dict[str, Any]:
    """stdout must be exactly one JSON object (json.loads refuses anything after it)."""
    document = json.loads(stdout)
    assert isinstance(document, dict), stdout
    assert stdout.count("\n") == 1 and stdout.endswith("\n"), repr(stdout)
    return document


def upload_json(cli: Any, source: Path, *args: str) -> dict[str, Any]:
    result = cli("upload", "--json", *args, str(source))
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return one_json_object(result.stdout)


def status_json(cli: Any, batch_id: str) -> dict[str, Any]:
    result = cli("status", batch_id, "--json")
    assert result.exit_code == 0, result.stderr
    return one_json_object(result.stdout)


def manifest_entries(s3: Any, bucket: str, summary_key: str) -> tuple[dict[str, Any], bytes, list[dict[str, Any]]]:
    document = json.loads(get_bytes(s3, bucket, summary_key))
    raw = get_bytes(s3, bucket, document["entries"]["key"])
    entries = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    return document, raw, entries


# -- the full tree -----------------------------------------------------------------------------


@pytest.mark.localstack
@both_transports  # what sends the files' PutObject: each one, on every server
def test_upload_tree_every_byte_key_checksum_and_manifest_entry(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = dict(SMALL_TREE)
    files["big/three-parts.bin"] = pattern_bytes(12 * MiB + 12345, seed=1)  # 5 MiB + 5 MiB + a short last part
    files["exact part size.bin"] = pattern_bytes(PART_SIZE, seed=2)
    files["\u65e5\u672c/just under.bin"] = pattern_bytes(PART_SIZE - 1, seed=3)
    write_tree(source, files)

    result = cli.subprocess("upload", "--parallel", "4", "--part-size", "5MiB", "--prefix", "backups/nightly",
                            "--json", str(source))
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = one_json_object(result.stdout)

    # The contract with the original design.
    assert {"batch_id", "status", "files_uploaded", "total_bytes", "prefix", "manifest_key"} <= summary.keys()
    batch_id = summary["batch_id"]
    assert str(ULID.from_str(batch_id)) == batch_id
    assert summary["status"] == "enqueued"
    assert summary["files_uploaded"] == len(files)
    assert summary["total_bytes"] == sum(len(data) for data in files.values())
    prefix = f"backups/nightly/{batch_id}/"
    assert summary["prefix"] == prefix
    assert summary["manifest_key"] == f"{prefix}manifest.json"

    # Exactly the files, under <prefix><batch>/files/<relative path>, byte for byte.
    expected_keys = {f"{prefix}files/{rel_path}": rel_path for rel_path in files}
    keys = list_keys(s3, bucket)
    assert all(key.startswith(prefix) for key in keys), keys
    assert sorted(key for key in keys if key.startswith(f"{prefix}files/")) == sorted(expected_keys)
    assert {f"{prefix}manifest.json", f"{prefix}manifest.jsonl"} <= set(keys)
    heads: dict[str, dict[str, Any]] = {}
    for key, rel_path in expected_keys.items():
        assert get_bytes(s3, bucket, key) == files[rel_path], rel_path
        heads[rel_path] = s3.head_object(Bucket=bucket, Key=key)
        if len(files[rel_path]) < PART_SIZE:  # single PUT: the SHA-256 travels in the object's metadata
            assert heads[rel_path]["Metadata"]["archup-sha256"] == sha256(files[rel_path]), rel_path
    assert heads["big/three-parts.bin"]["ETag"].strip('"').endswith("-3")
    assert heads["exact part size.bin"]["ETag"].strip('"').endswith("-1")

    # The manifest: the summary seals the entries, and each entry matches the file and its object.
    document, raw_entries, entries = manifest_entries(s3, bucket, summary["manifest_key"])
    assert document["batch_id"] == batch_id
    assert document["entries"]["key"] == f"{prefix}manifest.jsonl"
    assert document["entries"]["sha256"] == sha256(raw_entries)
    assert document["entries"]["count"] == len(files)
    assert document["files_uploaded"] == len(files)
    assert document["total_bytes"] == summary["total_bytes"]
    assert document["finalized_at"] == summary["finalized_at"]
    assert [entry["key"] for entry in entries] == sorted(expected_keys, key=lambda k: k.encode("utf-8"))
    for entry in entries:
        rel_path = expected_keys[entry["key"]]
        data = files[rel_path]
        assert entry["path"] == rel_path
        assert entry["size"] == len(data), rel_path
        assert entry["sha256"] == sha256(data), rel_path
        assert entry["etag"] == heads[rel_path]["ETag"], rel_path
        if len(data) >= PART_SIZE:
            assert entry["part_size"] == PART_SIZE, rel_path
        else:
            assert entry["part_size"] is None, rel_path

    # The journal, read back through a new connection, agrees.
    journal = SQLiteJournal(cli.journal)
    try:
        records = {record.rel_path: record for record in journal.iter_files(batch_id)}
    finally:
        journal.close()
    assert set(records) == set(files)
    for rel_path, record in records.items():
        assert record.state is FileState.UPLOADED, rel_path
        assert record.sha256 == sha256(files[rel_path]), rel_path


def test_empty_directory_makes_an_empty_finalized_batch(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "empty"
    source.mkdir()
    summary = upload_json(cli, source)
    assert summary["status"] == "enqueued"
    assert summary["files_uploaded"] == 0 and summary["total_bytes"] == 0
    document, raw_entries, entries = manifest_entries(s3, bucket, summary["manifest_key"])
    assert entries == [] and raw_entries == b""
    assert document["entries"]["sha256"] == sha256(b"")
    assert [k for k in list_keys(s3, bucket) if "/files/" in k] == []


# -- status and finalize -----------------------------------------------------------------------


def test_status_reports_state_counts_and_bytes(cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_tree(source, SMALL_TREE)
    (source / "link-to-top").symlink_to(source / "top.txt")
    summary = upload_json(cli, source)
    batch_id = summary["batch_id"]

    status = status_json(cli, batch_id)
    assert status["batch_id"] == batch_id
    assert status["status"] == "enqueued"
    assert status["scan_complete"] is True
    assert status["files"] == {"pending": 0, "uploading": 0, "uploaded": len(SMALL_TREE), "failed": 0,
                               "skipped": 1, "total": len(SMALL_TREE) + 1}
    assert status["bytes_uploaded"] == sum(len(data) for data in SMALL_TREE.values())
    assert status["finalized_at"] == summary["finalized_at"]
    assert status["manifest_key"] == summary["manifest_key"]

    human = cli("status", batch_id)
    assert human.exit_code == 0, human.stderr
    assert batch_id in human.stdout
    assert "enqueued" in human.stdout
    assert f"{len(SMALL_TREE)} uploaded" in human.stdout
    assert "link-to-top" in human.stdout  # the skipped file is named
    with pytest.raises(ValueError):
        json.loads(human.stdout)


@pytest.mark.localstack
def test_finalize_again_is_idempotent_and_writes_nothing(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_tree(source, SMALL_TREE)
    summary = upload_json(cli, source)
    batch_id = summary["batch_id"]
    manifest_key = summary["manifest_key"]
    entries_key = manifest_key + "l"
    before = {key: s3.head_object(Bucket=bucket, Key=key) for key in (manifest_key, entries_key)}
    keys_before = sorted(list_keys(s3, bucket))

    for _ in range(2):
        again = cli("finalize", batch_id, "--json")
        assert again.exit_code == 0, again.stderr
        document = one_json_object(again.stdout)
        assert {"batch_id", "status", "files_uploaded", "total_bytes", "prefix", "manifest_key",
                "finalized_at"} <= document.keys()
        # The same summary: every key finalize prints has the value upload printed.
        assert document == {key: summary[key] for key in document}

    human = cli("finalize", batch_id)
    assert human.exit_code == 0, human.stderr
    assert batch_id in human.stdout and summary["finalized_at"] in human.stdout

    assert sorted(list_keys(s3, bucket)) == keys_before
    for key, head in before.items():
        now = s3.head_object(Bucket=bucket, Key=key)
        assert (now["ETag"], now["LastModified"]) == (head["ETag"], head["LastModified"]), key
    assert status_json(cli, batch_id)["finalized_at"] == summary["finalized_at"]


# -- finalize refuses what is not complete -----------------------------------------------------


def _library_batch(cli: Any, s3: Any, source: Path, *, leave_pending: set[str], scan_complete: bool,
                   files: dict[str, bytes] | None = None) -> tuple[str, dict[str, bytes]]:
    """A batch built through the library: every file added, all but ``leave_pending`` really uploaded."""
    files = files or {"a.txt": b"alpha\n", "sub/b.txt": b"bravo\n", "sub/deeper/c \u00e9.txt": b"charlie\n"}
    write_tree(source, files)
    batch_id = str(ULID())
    journal = SQLiteJournal(cli.journal)
    try:
        batch = journal.init_batch(batch_id, source_root=str(source), bucket=cli.bucket, prefix="staging/",
                                   part_size=8 * MiB, endpoint_url=cli.endpoint)
        new_files = []
        for rel_path in files:
            info = (source / rel_path).stat()
            new_files.append(NewFile(rel_path, f"{batch.batch_prefix}files/{rel_path}", info.st_size,
                                     info.st_mtime_ns))
        assert journal.add_files(batch_id, new_files) == len(files)
        for new_file in new_files:
            if new_file.rel_path in leave_pending:
                continue
            data = files[new_file.rel_path]
            answer = s3.put_object(Bucket=cli.bucket, Key=new_file.key, Body=data)
            journal.complete_file(batch_id, new_file.rel_path, sha256=sha256(data), etag=answer["ETag"])
        if scan_complete:
            journal.mark_scan_complete(batch_id)
    finally:
        journal.close()
    return batch_id, files


def _assert_refused(result: Any, batch_id: str, *names: str, as_json: bool = False) -> str:
    assert result.exit_code == 3, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    message = lines[0]
    assert message.startswith("archup: error: "), message
    assert batch_id in message
    for name in names:
        assert name in message, (name, message)
    assert f"archup resume {batch_id} --journal" in message  # says how to resume
    if as_json:  # still exactly one JSON object on stdout: the error
        assert one_json_object(result.stdout) == {"error": message.removeprefix("archup: error: "), "exit_code": 3}
    else:
        assert result.stdout == ""
    return message


def test_finalize_names_the_first_20_files_not_uploaded_and_counts_the_rest(cli, s3, bucket,
                                                                             tmp_path: Path) -> None:
    files = {f"p/{index:02d}.txt": f"file {index}\n".encode() for index in range(25)} | {"done.txt": b"done\n"}
    pending = {rel_path for rel_path in files if rel_path.startswith("p/")}
    batch_id, _ = _library_batch(cli, s3, tmp_path / "src", leave_pending=pending, scan_complete=True, files=files)

    result = cli("finalize", batch_id)

    message = _assert_refused(result, batch_id)
    assert "has 25 file(s) not uploaded" in message
    assert sum(f"p/{index:02d}.txt" in message for index in range(25)) == 20
    assert "and 5 more" in message, message


def test_finalize_refuses_a_batch_with_a_pending_file(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    batch_id, _ = _library_batch(cli, s3, source, leave_pending={"sub/deeper/c \u00e9.txt"}, scan_complete=True)

    result = cli("finalize", batch_id)
    message = _assert_refused(result, batch_id, "sub/deeper/c \u00e9.txt")
    assert "a.txt" not in message and "sub/b.txt" not in message  # names only the file not uploaded

    assert [k for k in list_keys(s3, bucket) if k.endswith(("manifest.json", "manifest.jsonl"))] == []
    status = status_json(cli, batch_id)
    assert status["status"] != "enqueued" and status["finalized_at"] is None
    assert status["files"]["pending"] == 1 and status["files"]["uploaded"] == 2


def test_finalize_refuses_a_batch_whose_scan_never_completed(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    batch_id, _ = _library_batch(cli, s3, source, leave_pending=set(), scan_complete=False)

    result = cli("finalize", batch_id, "--json")
    message = _assert_refused(result, batch_id, "scan", as_json=True)
    assert str(source) in message
    assert [k for k in list_keys(s3, bucket) if "manifest" in k] == []
    assert status_json(cli, batch_id)["finalized_at"] is None


@pytest.mark.localstack
def test_finalize_reads_back_the_bucket_and_refuses_a_missing_object(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_tree(source, SMALL_TREE)
    result = cli("upload", "--no-finalize", "--json", str(source))
    assert result.exit_code == 0, result.stderr
    report = one_json_object(result.stdout)
    batch_id = report["batch_id"]
    assert report["files_uploaded"] == len(SMALL_TREE)
    prefix = f"staging/{batch_id}/"
    assert [k for k in list_keys(s3, bucket, prefix) if "manifest" in k] == []

    lost = "\u65e5\u672c/\u30c6\u30b9\u30c8 \u6587\u66f8.txt"
    s3.delete_object(Bucket=bucket, Key=f"{prefix}files/{lost}")

    refused = cli("finalize", batch_id)
    message = _assert_refused(refused, batch_id, lost)
    assert "missing" in message
    assert [k for k in list_keys(s3, bucket, prefix) if "manifest" in k] == []

    status = status_json(cli, batch_id)
    assert status["files"]["pending"] == 1
    assert status["files"]["uploaded"] == len(SMALL_TREE) - 1
    assert status["finalized_at"] is None
    journal = SQLiteJournal(cli.journal)
    try:
        assert journal.get_file(batch_id, lost).state is FileState.PENDING
    finally:
        journal.close()

    # The resume command the message names puts the file back and seals the batch.
    resumed = cli("upload", "--batch", batch_id, "--json", str(source))
    assert resumed.exit_code == 0, resumed.stderr
    summary = one_json_object(resumed.stdout)
    assert summary["status"] == "enqueued" and summary["files_uploaded"] == len(SMALL_TREE)
    assert get_bytes(s3, bucket, f"{prefix}files/{lost}") == SMALL_TREE[lost]
    _, _, entries = manifest_entries(s3, bucket, summary["manifest_key"])
    assert sorted(entry["path"] for entry in entries) == sorted(SMALL_TREE)


# -- what is not a regular file ----------------------------------------------------------------


def test_symlinks_and_special_files_are_skipped_and_reported_not_followed(cli, s3, bucket, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"outside the source tree: must never be uploaded\n"
    (outside / "secret.txt").write_bytes(secret)
    (outside / "nested.txt").write_bytes(secret)
    source = tmp_path / "src"
    files = {"real.txt": b"a real file\n", "dir/inner.txt": b"inner\n"}
    write_tree(source, files)
    (source / "link-to-file").symlink_to(outside / "secret.txt")
    (source / "dir" / "link-to-dir").symlink_to(outside, target_is_directory=True)
    (source / "dangling").symlink_to(tmp_path / "does-not-exist")
    os.mkfifo(source / "a-fifo")  # opening it would block: it must be skipped, never read
    skipped = {"link-to-file", "dir/link-to-dir", "dangling", "a-fifo"}

    # A subprocess with a timeout: a follow-the-fifo bug fails the test instead of hanging it.
    result = cli.subprocess("upload", "--json", str(source), timeout=60)
    assert result.exit_code == 0, result.stderr
    summary = one_json_object(result.stdout)
    assert summary["files_uploaded"] == len(files)
    assert summary["files_skipped"] == len(skipped)
    assert summary["total_bytes"] == sum(len(data) for data in files.values())

    keys = [k for k in list_keys(s3, bucket) if "/files/" in k]
    assert sorted(k.split("/files/", 1)[1] for k in keys) == sorted(files)
    for key in keys:
        assert get_bytes(s3, bucket, key) != secret
    _, _, entries = manifest_entries(s3, bucket, summary["manifest_key"])
    assert sorted(entry["path"] for entry in entries) == sorted(files)

    status = status_json(cli, summary["batch_id"])
    assert status["files"]["skipped"] == len(skipped)
    problems = {problem["path"]: problem for problem in status["problems"]}
    assert set(problems) == skipped
    assert all(problem["state"] == "skipped" for problem in problems.values())
    assert "symlink" in problems["link-to-file"]["error"]
    assert "symlink" in problems["dir/link-to-dir"]["error"]


# -- the acceptance: no lost file, every run --------------------------------------------

ACCEPTANCE_FILES = 300
ACCEPTANCE_RUNS = 5


@pytest.fixture(scope="module")
def acceptance_source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    source = tmp_path_factory.mktemp("acceptance")
    files = {f"d{index % 7}/sub{index % 3}/file-{index:04d}.bin": f"file {index}\n".encode() * (1 + index % 50)
             for index in range(ACCEPTANCE_FILES)}
    write_tree(source, files)
    return {"path": source, "files": files}


@pytest.mark.parametrize("run", range(ACCEPTANCE_RUNS))
def test_parallel_16_never_loses_a_file(cli, s3, bucket, acceptance_source: dict[str, Any], run: int) -> None:
    files: dict[str, bytes] = acceptance_source["files"]
    summary = upload_json(cli, acceptance_source["path"], "--parallel", "16")
    assert summary["status"] == "enqueued"
    assert summary["files_uploaded"] == ACCEPTANCE_FILES
    assert summary["total_bytes"] == sum(len(data) for data in files.values())

    prefix = f"{summary['prefix']}files/"
    listed = list_keys(s3, bucket, prefix)
    assert len(listed) == ACCEPTANCE_FILES
    assert sorted(key[len(prefix):] for key in listed) == sorted(files)
    _, _, entries = manifest_entries(s3, bucket, summary["manifest_key"])
    assert sorted(entry["path"] for entry in entries) == sorted(files)
    assert all(entry["sha256"] == sha256(files[entry["path"]]) for entry in entries)


# -- two batches side by side ------------------------------------------------------------------


def test_two_concurrent_uploads_get_their_own_batches_and_do_not_interfere(cli, s3, bucket,
                                                                           tmp_path: Path) -> None:
    trees = {
        "left": {f"l{index:03d}.txt": f"left {index}\n".encode() for index in range(60)},
        "right": {f"sub/r{index:03d}.txt": f"right {index}\n".encode() for index in range(40)},
    }
    for name, files in trees.items():
        write_tree(tmp_path / name, files)

    def run(name: str) -> Any:
        return cli.subprocess("upload", "--parallel", "8", "--json", str(tmp_path / name))

    # Two processes at once, one journal, one bucket.
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(trees, pool.map(run, trees)))

    summaries = {}
    for name, result in results.items():
        assert result.exit_code == 0, (name, result.stderr)
        summaries[name] = one_json_object(result.stdout)
    assert summaries["left"]["batch_id"] != summaries["right"]["batch_id"]
    assert summaries["left"]["prefix"] != summaries["right"]["prefix"]

    for name, files in trees.items():
        summary = summaries[name]
        assert summary["files_uploaded"] == len(files)
        prefix = f"{summary['prefix']}files/"
        listed = list_keys(s3, bucket, prefix)
        assert sorted(key[len(prefix):] for key in listed) == sorted(files)
        for key in listed:
            assert get_bytes(s3, bucket, key) == files[key[len(prefix):]]
        _, _, entries = manifest_entries(s3, bucket, summary["manifest_key"])
        assert sorted(entry["path"] for entry in entries) == sorted(files)
        status = status_json(cli, summary["batch_id"])
        assert status["source_root"] == str((tmp_path / name).resolve())
        assert status["files"]["total"] == len(files) and status["files"]["uploaded"] == len(files)

    # The same directory uploaded again is a new batch, not a merge into the old one.
    again = upload_json(cli, tmp_path / "left")
    assert again["batch_id"] not in {s["batch_id"] for s in summaries.values()}
    assert again["files_uploaded"] == len(trees["left"])
    assert status_json(cli, summaries["left"]["batch_id"])["files"]["total"] == len(trees["left"])
