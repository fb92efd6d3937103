"""The sealed record names what was not archived: manifest-skipped.jsonl, sealed by manifest.json.

Someone restoring an archive years later must be able to tell what the batch left out and
why, from the bucket alone; `archup verify` checks that list against its seal."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import jsonschema

import archup

SCHEMA = json.loads((Path(archup.__file__).parent / "manifest.schema.json").read_text(encoding="utf-8"))


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{name}"},
                                           format_checker=jsonschema.FormatChecker())


def source_with_a_fifo_and_a_symlink(root: Path) -> dict[str, bytes]:
    files = {"real.txt": b"a real file\n", "dir/inner.txt": b"inner\n"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.mkfifo(root / "a-fifo")
    (root / "dir" / "link").symlink_to("../real.txt")
    return files


def get(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def finalized(cli: Any, source: Path) -> dict[str, Any]:
    result = cli.subprocess("upload", "--json", str(source), timeout=60)  # a FIFO bug must not hang the test
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def verify(cli: Any, batch_id: str) -> tuple[int, dict[str, Any]]:
    result = cli.subprocess("verify", batch_id, "--endpoint-url", cli.endpoint, "--json")
    return result.exit_code, json.loads(result.stdout)


def test_a_fifo_and_a_symlink_are_named_with_reasons_in_the_sealed_record(cli, s3, bucket: str,
                                                                          tmp_path: Path) -> None:
    source_with_a_fifo_and_a_symlink(tmp_path / "src")
    summary = finalized(cli, tmp_path / "src")
    assert summary["files_skipped"] == 2
    document = json.loads(get(s3, bucket, summary["manifest_key"]))
    seal = document["skipped"]
    assert seal["key"] == f"{summary['prefix']}manifest-skipped.jsonl"
    body = get(s3, bucket, seal["key"])
    assert hashlib.sha256(body).hexdigest() == seal["sha256"] and len(body) == seal["bytes"]
    lines = [json.loads(line) for line in body.decode("utf-8").splitlines()]
    assert seal["count"] == len(lines) == document["files_skipped"] == 2
    named = {line["path"]: line["reason"] for line in lines}
    assert set(named) == {"a-fifo", "dir/link"}
    assert "fifo" in named["a-fifo"].lower() and "symlink" in named["dir/link"].lower(), named
    for line in lines:
        validator("skipped_entry").validate(line)
        assert not validator("entry").is_valid(line) and not validator("summary").is_valid(line)
    validator("summary").validate(document)
    jsonschema.Draft202012Validator(SCHEMA).validate(lines[0])  # the top level accepts a skipped line too

    code, report = verify(cli, summary["batch_id"])
    assert code == 0 and report["ok"] and report["source"] == "manifest", report


def test_a_batch_with_nothing_skipped_seals_an_empty_list(cli, s3, bucket: str, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "only.txt").write_bytes(b"x")
    summary = finalized(cli, tmp_path / "src")
    seal = json.loads(get(s3, bucket, summary["manifest_key"]))["skipped"]
    assert (seal["count"], seal["bytes"], seal["sha256"]) == (0, 0, hashlib.sha256(b"").hexdigest())
    assert get(s3, bucket, seal["key"]) == b""


def test_verify_catches_a_changed_or_missing_skipped_list(cli, s3, bucket: str, tmp_path: Path) -> None:
    source_with_a_fifo_and_a_symlink(tmp_path / "src")
    summary = finalized(cli, tmp_path / "src")
    key = json.loads(get(s3, bucket, summary["manifest_key"]))["skipped"]["key"]
    original = get(s3, bucket, key)

    s3.put_object(Bucket=bucket, Key=key, Body=original.splitlines(keepends=True)[0])  # one line dropped
    code, report = verify(cli, summary["batch_id"])
    assert code == 3
    found = {d["problem"] for d in report["differences"]}
    assert {"skipped_checksum_mismatch", "skipped_size_mismatch", "skipped_count_mismatch"} <= found, report

    s3.put_object(Bucket=bucket, Key=key, Body=b"not json\n" + original)
    code, report = verify(cli, summary["batch_id"])
    assert code == 3 and "skipped_entry_invalid" in {d["problem"] for d in report["differences"]}

    s3.delete_object(Bucket=bucket, Key=key)
    code, report = verify(cli, summary["batch_id"])
    assert code == 3 and [d["problem"] for d in report["differences"]] == ["skipped_missing"]


def test_a_manifest_written_before_the_skipped_list_still_verifies(cli, s3, bucket: str, tmp_path: Path) -> None:
    """Today's summaries without the new field (as the archup before this one wrote them)."""
    source_with_a_fifo_and_a_symlink(tmp_path / "src")
    summary = finalized(cli, tmp_path / "src")
    document = json.loads(get(s3, bucket, summary["manifest_key"]))
    s3.delete_object(Bucket=bucket, Key=document.pop("skipped")["key"])
    older = (json.dumps(document, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")
    s3.put_object(Bucket=bucket, Key=summary["manifest_key"], Body=older)
    validator("summary").validate(document)
    # That archup recorded no SHA-256 of the summary it sealed, either.
    with closing(sqlite3.connect(cli.journal)) as conn:
        conn.execute("UPDATE batches SET summary_sha256 = NULL WHERE batch_id = ?", (summary["batch_id"],))
        conn.commit()

    code, report = verify(cli, summary["batch_id"])
    assert code == 0 and report["ok"] and report["source"] == "manifest", report
    rerun = cli("finalize", summary["batch_id"], "--endpoint-url", cli.endpoint, "--json")
    assert rerun.exit_code == 0, rerun.stderr  # and finalize still takes it as the batch's seal


def sealed_but_not_recorded(cli: Any, source: Path) -> str:
    """A finalize killed after writing manifest.json, before the journal's commit: 'finalizing'."""
    result = cli.subprocess("upload", "--json", str(source), env={"ARCHUP_CRASH_AT": "after-manifest-summary:1"})
    assert result.exit_code == -signal.SIGKILL, result.stderr
    listed = cli("list", "--json")
    [batch] = json.loads(listed.stdout)["batches"]
    assert batch["status"] == "finalizing", batch
    return str(batch["batch_id"])


def test_finalize_adopts_a_summary_written_before_the_skipped_list(cli, s3, bucket: str, tmp_path: Path) -> None:
    """Sealed by the archup before this one, which died before its journal commit; finalized by this one."""
    source_with_a_fifo_and_a_symlink(tmp_path / "src")
    batch_id = sealed_but_not_recorded(cli, tmp_path / "src")
    key = f"staging/{batch_id}/manifest.json"
    document = json.loads(get(s3, bucket, key))
    del document["skipped"]
    older = (json.dumps(document, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")
    s3.put_object(Bucket=bucket, Key=key, Body=older)

    adopted = cli("finalize", batch_id, "--endpoint-url", cli.endpoint, "--json")
    assert adopted.exit_code == 0, adopted.stderr
    assert json.loads(adopted.stdout)["finalized_at"] == document["finalized_at"]
    assert get(s3, bucket, key) == older  # adopted, never rewritten
    code, report = verify(cli, batch_id)
    assert code == 0 and report["ok"], report


def test_finalize_refuses_a_summary_sealing_other_skipped_files(cli, s3, bucket: str, tmp_path: Path) -> None:
    source_with_a_fifo_and_a_symlink(tmp_path / "src")
    batch_id = sealed_but_not_recorded(cli, tmp_path / "src")
    key = f"staging/{batch_id}/manifest.json"
    document = json.loads(get(s3, bucket, key))
    document["skipped"]["sha256"] = hashlib.sha256(b"other skipped files\n").hexdigest()
    other = (json.dumps(document, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode("utf-8")
    s3.put_object(Bucket=bucket, Key=key, Body=other)

    refused = cli("finalize", batch_id, "--endpoint-url", cli.endpoint, "--json")
    assert refused.exit_code == 1, refused.stdout
    assert "already exists and describes other contents" in refused.stderr
    assert get(s3, bucket, key) == other
