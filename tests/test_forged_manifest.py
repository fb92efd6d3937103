"""Forged bucket content, correctly re-sealed: verify stays bounded and trusts the journal's
record of the seal over a summary that seals itself (through the CLI, against the moto server)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import closing
from typing import Any

from test_verify import FILES, make_source, problems, upload, verify_json


def reseal(s3: Any, bucket: str, summary_key: str, entries: bytes) -> None:
    """Rewrite manifest.jsonl and a manifest.json that seals it, as a forger with write access would."""
    summary = json.loads(s3.get_object(Bucket=bucket, Key=summary_key)["Body"].read())
    seal = summary["entries"]
    s3.put_object(Bucket=bucket, Key=seal["key"], Body=entries)
    seal.update(sha256=hashlib.sha256(entries).hexdigest(), bytes=len(entries), count=entries.count(b"\n"))
    s3.put_object(Bucket=bucket, Key=summary_key, Body=json.dumps(summary).encode())


def test_millions_of_empty_lines_keep_the_first_differences_and_count_the_rest(cli, s3, bucket, tmp_path) -> None:
    batch = upload(cli, make_source(tmp_path / "src", {"a.txt": b"a"}))
    # Forgotten by the journal, and sealed before the journal kept the summary's SHA-256: the
    # manifest is the only record, so its entries are all verify has.
    cli("gc", "--forget-after", "0s", "--json")
    with closing(sqlite3.connect(cli.journal)) as conn:
        conn.execute("UPDATE batches SET summary_sha256 = NULL WHERE batch_id = ?", (batch["batch_id"],))
        conn.commit()
    entries_key = batch["prefix"] + "manifest.jsonl"
    good = s3.get_object(Bucket=bucket, Key=entries_key)["Body"].read()
    reseal(s3, bucket, batch["manifest_key"], good + b"\n" * 100_000)

    code, document = verify_json(cli, batch["batch_id"])
    assert code == 3
    assert len(document["differences"]) == 1000
    assert document["differences_omitted"] >= 100_000 - 1000
    assert {d["problem"] for d in document["differences"]} == {"entry_invalid"}


def test_a_resealed_manifest_is_caught_by_the_journal(cli, s3, bucket, tmp_path) -> None:
    batch = upload(cli, make_source(tmp_path / "src", FILES))
    entries_key = batch["prefix"] + "manifest.jsonl"
    lines = s3.get_object(Bucket=bucket, Key=entries_key)["Body"].read().splitlines(keepends=True)
    entry = json.loads(lines[0])
    forged_body = b"forged bytes"
    s3.put_object(Bucket=bucket, Key=entry["key"], Body=forged_body)
    head = s3.head_object(Bucket=bucket, Key=entry["key"])
    entry.update(sha256=hashlib.sha256(forged_body).hexdigest(), size=len(forged_body), etag=head["ETag"])
    lines[0] = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
    body = b"".join(lines)
    summary = json.loads(s3.get_object(Bucket=bucket, Key=batch["manifest_key"])["Body"].read())
    summary["entries"].update(sha256=hashlib.sha256(body).hexdigest(), bytes=len(body))
    summary["total_bytes"] += len(forged_body) - len(FILES[entry["path"]])
    s3.put_object(Bucket=bucket, Key=entries_key, Body=body)
    s3.put_object(Bucket=bucket, Key=batch["manifest_key"], Body=json.dumps(summary).encode())

    code, document = verify_json(cli, batch["batch_id"], "--deep")
    assert code == 3
    # The summary is not the one sealed: the journal's files are checked instead, and the
    # replaced object is found there.
    assert document["source"] == "journal"
    assert problems(document) == [(None, "manifest_replaced"), (entry["path"], "size_mismatch")]


def test_entries_rewritten_under_an_unrecorded_seal_are_held_against_the_journal(cli, s3, bucket, tmp_path) -> None:
    batch = upload(cli, make_source(tmp_path / "src", FILES))
    with closing(sqlite3.connect(cli.journal)) as conn:  # sealed by an archup that did not record it
        conn.execute("UPDATE batches SET summary_sha256 = NULL WHERE batch_id = ?", (batch["batch_id"],))
        conn.commit()
    entries_key = batch["prefix"] + "manifest.jsonl"
    lines = s3.get_object(Bucket=bucket, Key=entries_key)["Body"].read().splitlines(keepends=True)
    entry = json.loads(lines[0])
    entry["sha256"] = "0" * 64
    lines[0] = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
    reseal(s3, bucket, batch["manifest_key"], b"".join(lines))

    code, document = verify_json(cli, batch["batch_id"])
    assert code == 3
    assert problems(document) == [(entry["path"], "entry_differs_from_journal"),
                                  (entry["path"], "metadata_checksum_mismatch")]
