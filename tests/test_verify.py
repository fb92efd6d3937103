"""archup verify over HTTP to a moto server: the bucket against the manifest, or the journal before finalize."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import botocore.exceptions
import jsonschema
import pytest
import typer
from typer.testing import CliRunner

import archup
from archup.checksums import crc_b64, crc_of
from archup.cli.verify import verify
from archup.errors import TransferError
from archup.manifest import reader as manifest_reader
from archup.store import S3Store, StoreConfig

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = Path(archup.__file__).parent / "manifest.schema.json"
MiB = 1024 * 1024

# verify is registered in archup/cli/__init__.py separately; here it gets an app of its own.
verify_app = typer.Typer(add_completion=False)


@verify_app.callback()
def _root() -> None:
    """Keeps 'verify' a subcommand, as in the real app."""


verify_app.command("verify")(verify)


def run_verify(cli: Any, batch_id: str, *args: str) -> Any:
    return CliRunner().invoke(verify_app, ["verify", batch_id, "--journal", str(cli.journal),
                                           "--endpoint-url", cli.endpoint, *args], catch_exceptions=False)


def verify_json(cli: Any, batch_id: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = run_verify(cli, batch_id, "--json", *args)
    return result.exit_code, json.loads(result.stdout)  # exactly one JSON object, or this raises


def problems(document: dict[str, Any]) -> list[tuple[str | None, str]]:
    return [(d["path"], d["problem"]) for d in document["differences"]]


UNICODE_NAME = "m\u00e9lange.txt"
FILES = {
    "a.txt": b"alpha\n" * 100,
    "dir/b.bin": bytes(range(256)) * 8,
    "dir/sub/c.bin": b"c" * 3000,
    UNICODE_NAME: b"unicode name\n",
    "z.bin": b"\x00" * 10,
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


@pytest.fixture
def batch(cli: Any, tmp_path: Path) -> dict[str, Any]:
    """A finalized batch of FILES; its summary plus where its files live."""
    summary = upload(cli, make_source(tmp_path / "src", FILES))
    summary["files_prefix"] = summary["prefix"] + "files/"
    return summary


@pytest.mark.localstack
def test_clean_finalized_batch_verifies(cli, batch) -> None:
    code, document = verify_json(cli, batch["batch_id"])
    assert code == 0
    assert document == {"batch_id": batch["batch_id"], "source": "manifest", "checked": len(FILES),
                        "ok": True, "differences": []}

    code, document = verify_json(cli, batch["batch_id"], "--deep")
    assert (code, document["ok"], document["checked"]) == (0, True, len(FILES))

    human = run_verify(cli, batch["batch_id"])
    assert human.exit_code == 0, human.stderr
    assert human.stdout.strip().splitlines() == [
        f"batch {batch['batch_id']}: {len(FILES)} file(s) checked against the manifest: 0 difference(s)"]


@pytest.mark.localstack
def test_same_size_rewrite_is_caught_by_etag_and_by_deep_rehash(cli, s3, bucket, batch) -> None:
    key = batch["files_prefix"] + "dir/b.bin"
    original = FILES["dir/b.bin"]
    metadata = s3.head_object(Bucket=bucket, Key=key)["Metadata"]
    assert metadata["archup-sha256"] == hashlib.sha256(original).hexdigest()
    forged = bytes(reversed(original))
    # Same size, same archup-sha256 metadata: only the bytes (and so the ETag) differ.
    s3.put_object(Bucket=bucket, Key=key, Body=forged, Metadata=metadata)

    code, document = verify_json(cli, batch["batch_id"])
    assert code == 3
    assert problems(document) == [("dir/b.bin", "etag_mismatch")]

    code, document = verify_json(cli, batch["batch_id"], "--deep")
    assert code == 3
    assert problems(document) == [("dir/b.bin", "etag_mismatch"), ("dir/b.bin", "checksum_mismatch")]
    rehash = document["differences"][1]
    assert rehash["expected"] == hashlib.sha256(original).hexdigest()
    assert rehash["actual"] == hashlib.sha256(forged).hexdigest()


def test_rewritten_checksum_metadata_is_reported(cli, s3, bucket, batch) -> None:
    key = batch["files_prefix"] + "a.txt"
    # Same bytes (so same size and ETag), but metadata claiming another SHA-256.
    s3.put_object(Bucket=bucket, Key=key, Body=FILES["a.txt"],
                  Metadata={"archup-batch": batch["batch_id"], "archup-sha256": "0" * 64})
    code, document = verify_json(cli, batch["batch_id"])
    assert code == 3
    assert document["differences"] == [{"key": key, "path": "a.txt", "problem": "metadata_checksum_mismatch",
                                        "expected": hashlib.sha256(FILES["a.txt"]).hexdigest(),
                                        "actual": "0" * 64}]


def test_size_change_is_reported_without_deep(cli, s3, bucket, batch) -> None:
    key = batch["files_prefix"] + "dir/sub/c.bin"
    s3.put_object(Bucket=bucket, Key=key, Body=b"c" * 2999)
    code, document = verify_json(cli, batch["batch_id"])
    assert code == 3
    assert document["differences"] == [{"key": key, "path": "dir/sub/c.bin", "problem": "size_mismatch",
                                        "expected": 3000, "actual": 2999}]


def test_deleted_object_is_missing(cli, s3, bucket, batch) -> None:
    key = batch["files_prefix"] + UNICODE_NAME
    s3.delete_object(Bucket=bucket, Key=key)
    result = run_verify(cli, batch["batch_id"])
    assert result.exit_code == 3
    lines = result.stdout.strip().splitlines()
    assert lines == [f"missing: {UNICODE_NAME}: expected {len(FILES[UNICODE_NAME])} bytes, found no object",
                     f"batch {batch['batch_id']}: {len(FILES)} file(s) checked against the manifest: "
                     "1 difference(s)"]
    assert "differs from the manifest" in result.stderr

    code, document = verify_json(cli, batch["batch_id"])
    assert (code, problems(document)) == (3, [(UNICODE_NAME, "missing")])


def test_extra_objects_under_files_are_unexpected(cli, s3, bucket, batch) -> None:
    # One sorts between the batch's keys, one after the last: both loops of the merge.
    for rel_path in ("dir/a-intruder", "zz-intruder"):
        s3.put_object(Bucket=bucket, Key=batch["files_prefix"] + rel_path, Body=b"x" * 7)
    # Beside files/, not under it: not the batch's files, not reported.
    s3.put_object(Bucket=bucket, Key=batch["prefix"] + "notes.txt", Body=b"n")
    code, document = verify_json(cli, batch["batch_id"])
    assert code == 3
    assert problems(document) == [("dir/a-intruder", "unexpected"), ("zz-intruder", "unexpected")]
    assert document["differences"][0]["actual"] == 7
    assert document["checked"] == len(FILES)


@pytest.mark.localstack
@pytest.mark.parametrize("prehash", [True, False], ids=["prehash", "no-prehash"])
def test_multipart_file_verifies_and_a_rewrite_is_caught(cli, s3, bucket, tmp_path, prehash: bool) -> None:
    big = hashlib.sha256(b"seed").digest() * (11 * MiB // 32) + b"tail"
    source = make_source(tmp_path / "src", {"big.bin": big, "small.txt": b"small"})
    summary = upload(cli, source, "--part-size", "5MiB", "--prehash" if prehash else "--no-prehash")
    key = summary["prefix"] + "files/big.bin"
    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3")  # really multipart: 5 + 5 + 1 MiB
    # The server keeps a CRC64NVME of the whole object (checked against the parts at completion).
    assert (head["ChecksumType"], head["ChecksumCRC64NVME"]) == ("FULL_OBJECT",
                                                                 crc_b64("CRC64NVME", crc_of("CRC64NVME", big)))
    if prehash:  # hashed before the upload: the whole file's SHA-256 is in the metadata
        assert head["Metadata"]["archup-sha256"] == hashlib.sha256(big).hexdigest()
    else:
        assert "archup-sha256" not in head["Metadata"]

    code, document = verify_json(cli, summary["batch_id"])
    assert (code, document["ok"], document["checked"]) == (0, True, 2)
    code, document = verify_json(cli, summary["batch_id"], "--deep")
    assert (code, document["ok"]) == (0, True), document

    # A same-size rewrite (its metadata copied) shows in the ETag, and --deep rehashes it.
    forged = big[:-4] + b"TAIL"
    s3.put_object(Bucket=bucket, Key=key, Body=forged, Metadata=head["Metadata"])
    code, document = verify_json(cli, summary["batch_id"])
    assert (code, problems(document)) == (3, [("big.bin", "etag_mismatch")])
    code, document = verify_json(cli, summary["batch_id"], "--deep")
    assert code == 3
    assert document["differences"][-1] == {"key": key, "path": "big.bin", "problem": "checksum_mismatch",
                                           "expected": hashlib.sha256(big).hexdigest(),
                                           "actual": hashlib.sha256(forged).hexdigest()}


def test_unfinalized_batch_verifies_against_the_journal(cli, s3, bucket, tmp_path) -> None:
    report = upload(cli, make_source(tmp_path / "src", FILES), "--no-finalize")
    batch_id = report["batch_id"]
    prefix = f"staging/{batch_id}/"
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "manifest")

    code, document = verify_json(cli, batch_id, "--deep")
    assert (code, document) == (0, {"batch_id": batch_id, "source": "journal", "checked": len(FILES),
                                     "ok": True, "differences": []})

    s3.delete_object(Bucket=bucket, Key=prefix + "files/a.txt")
    s3.put_object(Bucket=bucket, Key=prefix + "files/extra.bin", Body=b"e")
    code, document = verify_json(cli, batch_id)
    assert code == 3
    assert document["source"] == "journal"
    assert problems(document) == [("a.txt", "missing"), ("extra.bin", "unexpected")]


def test_altered_manifest_entries_break_the_seal(cli, s3, bucket, batch) -> None:
    entries_key = batch["prefix"] + "manifest.jsonl"
    original = s3.get_object(Bucket=bucket, Key=entries_key)["Body"].read()
    # Flip one digit of a modification time: still valid JSON, same length, same objects.
    altered = re.sub(rb'"mtime_ns":(\d)', lambda m: b'"mtime_ns":' + (b"1" if m[1] != b"1" else b"2"),
                     original, count=1)
    assert altered != original and len(altered) == len(original)
    s3.put_object(Bucket=bucket, Key=entries_key, Body=altered)

    code, document = verify_json(cli, batch["batch_id"])
    assert code == 3
    assert document["differences"] == [{"key": entries_key, "path": None, "problem": "entries_checksum_mismatch",
                                        "expected": hashlib.sha256(original).hexdigest(),
                                        "actual": hashlib.sha256(altered).hexdigest()}]


def test_entries_out_of_order_or_malformed_are_reported(cli, s3, bucket, batch) -> None:
    entries_key = batch["prefix"] + "manifest.jsonl"
    lines = s3.get_object(Bucket=bucket, Key=entries_key)["Body"].read().splitlines(keepends=True)
    assert [json.loads(line)["path"] for line in lines[1:3]] == ["dir/b.bin", "dir/sub/c.bin"]
    lines[1], lines[2] = lines[2], lines[1]
    s3.put_object(Bucket=bucket, Key=entries_key, Body=b"".join(lines) + b"not json\n")

    code, document = verify_json(cli, batch["batch_id"])
    assert code == 3
    # dir/b.bin, out of place, cannot be matched with its object: both are reported.
    assert problems(document) == [("dir/b.bin", "unexpected"), ("dir/b.bin", "entry_out_of_order"),
                                  (None, "entry_invalid"), (None, "entries_checksum_mismatch"),
                                  (None, "entries_size_mismatch")]


def test_missing_summary_is_reported_and_the_journal_used(cli, s3, bucket, batch) -> None:
    s3.delete_object(Bucket=bucket, Key=batch["manifest_key"])
    code, document = verify_json(cli, batch["batch_id"])
    assert code == 3
    assert document["source"] == "journal"
    assert document["checked"] == len(FILES)
    assert problems(document) == [(None, "manifest_missing")]


def test_unknown_batch_is_a_usage_error(cli, batch) -> None:
    result = run_verify(cli, "01K8RNKN488RQCG3YGG72QBZS5")
    assert result.exit_code == 2
    assert "no batch 01K8RNKN488RQCG3YGG72QBZS5" in result.stderr


def test_real_manifests_match_the_schema_and_the_docs(cli, s3, bucket, tmp_path) -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    files = {**FILES, "big.bin": b"\x01" * (6 * MiB)}  # one multipart entry: part_size and a "-2" ETag
    summary = upload(cli, make_source(tmp_path / "src", files), "--part-size", "5MiB")

    def validator(name: str) -> Any:
        return jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": f"#/$defs/{name}"},
                                               format_checker=jsonschema.FormatChecker())

    document = json.loads(s3.get_object(Bucket=bucket, Key=summary["manifest_key"])["Body"].read())
    validator("summary").validate(document)
    jsonschema.Draft202012Validator(schema).validate(document)  # the top level accepts either object
    lines = s3.get_object(Bucket=bucket, Key=document["entries"]["key"])["Body"].read().decode().splitlines()
    assert len(lines) == len(files)
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        validator("entry").validate(entry)
        with pytest.raises(jsonschema.ValidationError):
            validator("summary").validate(entry)
    assert [e["part_size"] is not None for e in entries if e["path"] == "big.bin"] == [True]

    # Every field written is declared in the schema and documented, so neither drifts from the code.
    docs = (ROOT / "docs" / "manifest.md").read_text(encoding="utf-8")

    def declared(definition: dict[str, Any], written: dict[str, Any], prefix: str = "",
                 absent: frozenset[str] = frozenset()) -> None:
        assert set(written) == set(definition["properties"]) - absent, prefix
        for name, value in written.items():
            assert f"`{prefix}{name}`" in docs, f"docs/manifest.md does not document {prefix}{name}"
            if isinstance(value, dict):
                declared(definition["properties"][name], value, f"{prefix}{name}.")

    # A batch without shards has neither of the packed batch's fields (tests/test_pack.py checks those).
    declared(schema["$defs"]["summary"], document, absent=frozenset({"shards", "files_packed"}))
    declared(schema["$defs"]["entry"], entries[0])


class DroppingBody:
    """A response body whose connection drops after a few chunks, as an idle one may."""

    def __init__(self, body: Any, after: int) -> None:
        self.body = body
        self.after = after

    def iter_chunks(self, chunk_size: int) -> Any:
        for number, chunk in enumerate(self.body.iter_chunks(chunk_size)):
            if number == self.after:
                raise botocore.exceptions.ResponseStreamingError(error="connection reset by peer")
            yield chunk

    def close(self) -> None:
        self.body.close()


def dropping_entries(s3: Any, bucket: str, endpoint: str, monkeypatch: pytest.MonkeyPatch,
                     body: bytes) -> Any:
    s3.put_object(Bucket=bucket, Key="batch/manifest.jsonl", Body=body)
    monkeypatch.setattr(manifest_reader, "CHUNK_SIZE", 100)
    store = S3Store(StoreConfig(bucket=bucket, endpoint_url=endpoint))
    reader = store.open_object("batch/manifest.jsonl")
    assert reader is not None
    reader._stream = DroppingBody(reader._stream, after=3)
    return manifest_reader.SealedStream(store, "batch/manifest.jsonl", reader)


def test_entries_stream_resumes_where_a_dropped_connection_left(s3, bucket, moto_endpoint, monkeypatch) -> None:
    body = b"".join(b'{"n":%d}\n' % number for number in range(200))
    stream = dropping_entries(s3, bucket, moto_endpoint, monkeypatch, body)
    lines = list(stream.lines())
    assert lines == body.splitlines()
    assert (stream.bytes, stream.hasher.hexdigest()) == (len(body), hashlib.sha256(body).hexdigest())


def test_entries_stream_refuses_to_resume_on_other_bytes(s3, bucket, moto_endpoint, monkeypatch) -> None:
    body = b"".join(b'{"n":%d}\n' % number for number in range(200))
    stream = dropping_entries(s3, bucket, moto_endpoint, monkeypatch, body)
    lines = stream.lines()
    next(lines)
    s3.put_object(Bucket=bucket, Key="batch/manifest.jsonl", Body=body.replace(b"7", b"8"))
    with pytest.raises(TransferError, match="PreconditionFailed"):
        list(lines)
