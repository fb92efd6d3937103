"""Cron-grade options over HTTP: selection, dry run, --skip-archived, archive options, config, output."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from faultstore import Faults, innermost

from archup.journal import SCHEMA_VERSION


def _tree(root: Path) -> Path:
    (root / "docs" / "old").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "b.tmp").write_text("scratch")
    (root / "docs" / "c.md").write_text("see")
    (root / "docs" / "old" / "d.md").write_text("old")
    return root


def _file_keys(s3, bucket: str, summary: dict) -> set[str]:  # type: ignore[no-untyped-def]
    prefix = summary["prefix"] + "files/"
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"][len(prefix):] for item in listing}


def test_include_and_exclude_select_files(cli, s3, bucket, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    result = cli("upload", "--json", "--exclude", "*.tmp", "--exclude", "docs/old/**", str(source))
    assert result.exit_code == 0, result.stderr
    assert _file_keys(s3, bucket, json.loads(result.stdout)) == {"a.txt", "docs/c.md"}


def test_files_from_takes_exactly_the_listed_paths(cli, s3, bucket, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    listing = tmp_path / "list.txt"
    listing.write_text("# wanted\n./a.txt\n\ndocs/old/d.md\nmissing.bin\n")
    result = cli("upload", "--json", "--files-from", str(listing), str(source))
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert _file_keys(s3, bucket, summary) == {"a.txt", "docs/old/d.md"}
    assert summary["files_skipped"] == 1  # the listed file that does not exist is reported, not invented


def test_dry_run_touches_neither_bucket_nor_journal(cli, s3, bucket, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    result = cli("upload", "--dry-run", "--json", "--include", "*.md", str(source))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files"] == 2 and report["bytes"] == 6
    assert all(key.endswith(".md") for key in report["first_keys"])
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
    assert not cli.journal.exists()


def test_skip_archived_sends_only_what_is_new(cli, s3, bucket, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    first = cli("upload", "--json", "--skip-archived", str(source))
    assert first.exit_code == 0, first.stderr
    (source / "new.txt").write_text("new")
    (source / "a.txt").write_text("alpha, changed")
    before = cli.journal.read_bytes()
    dry = cli("upload", "--json", "--dry-run", "--skip-archived", str(source))
    assert dry.exit_code == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert (planned["files"], planned["files_already_archived"]) == (2, 3)
    assert sorted(key.rsplit("/", 1)[-1] for key in planned["first_keys"]) == ["a.txt", "new.txt"]
    assert cli.journal.read_bytes() == before  # read, not written
    second = cli("upload", "--json", "--skip-archived", str(source))
    assert second.exit_code == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["batch_id"] != json.loads(first.stdout)["batch_id"]
    assert _file_keys(s3, bucket, summary) == {"new.txt", "a.txt"}
    # b.tmp, docs/c.md, docs/old/d.md: unchanged since the first batch, counted, not a journal row each
    assert summary["files_already_archived"] == 3 and summary["files_skipped"] == 0
    status = json.loads(cli("status", "--json", summary["batch_id"]).stdout)
    assert status["files_already_archived"] == 3 and status["files"]["total"] == 2
    with sqlite3.connect(cli.journal) as conn:
        rows = conn.execute("SELECT rel_path FROM files WHERE batch_id = ?", (summary["batch_id"],)).fetchall()
    assert sorted(row[0] for row in rows) == ["a.txt", "new.txt"]
    text = cli("upload", "--skip-archived", str(source))  # nothing new: an empty batch, said in one line
    assert text.exit_code == 0, text.stderr
    assert "5 file(s) unchanged since an earlier batch, not sent again" in text.stderr


ARCHIVE_OPTIONS = ("--storage-class", "standard_ia", "--sse", "AES256", "--metadata", "project=alpha",
                   "--tag", "retention=7y")


@pytest.mark.parametrize("rerun", [None, "resume", "upload"])
def test_archive_options_reach_the_objects(cli, s3, bucket, tmp_path: Path, rerun: str | None) -> None:
    """Every object of a batch is stored alike: also those a resume sends (``archup resume``
    has no archive options; a plain rerun that forgot them still resumes the batch as started)."""
    source = tmp_path / "src"
    source.mkdir()
    for index in range(4):
        (source / f"small-{index}.bin").write_bytes(b"x" * 100)
    (source / "large.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    args = ("upload", "--json", "--part-size", "5MiB", "--parallel", "1", *ARCHIVE_OPTIONS, str(source))
    if rerun is None:
        result = cli(*args)
    else:
        crashed = cli.subprocess(*args, env={"ARCHUP_CRASH_AT": "after-put-object:2"})
        assert crashed.exit_code == -9, crashed.stderr
        (batch_id,) = [row[0] for row in sqlite3.connect(cli.journal).execute("SELECT batch_id FROM batches")]
        result = cli("resume", "--json", batch_id) if rerun == "resume" else cli("upload", "--json", str(source))
        if rerun == "upload":
            assert "keeps the options it was started with" not in result.stderr  # --json: stdout only
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files_uploaded"] == 5
    for name in [f"small-{index}.bin" for index in range(4)] + ["large.bin"]:
        key = f"{summary['prefix']}files/{name}"
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["StorageClass"] == "STANDARD_IA"
        assert head["ServerSideEncryption"] == "AES256"
        assert head["Metadata"]["project"] == "alpha"
        assert head["Metadata"]["archup-batch"] == summary["batch_id"]
        tags = s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
        assert {"Key": "retention", "Value": "7y"} in tags
    manifest = s3.head_object(Bucket=bucket, Key=summary["manifest_key"])
    assert manifest.get("StorageClass", "STANDARD") == "STANDARD"  # the manifest stays readable


@pytest.mark.parametrize(("value", "message"), [("--metadata=novalue", "key=value"), ("--tag=k=é", "ASCII"),
                                                ("--sse=rot13", "AES256"), ("--retries=-1", "between"),
                                                ("--storage-class=GLACEIR", "unknown"),
                                                ("--sse-kms-key-id=alias/k", "needs --sse aws:kms")])
def test_bad_archive_options_are_usage_errors(cli, tmp_path: Path, value: str, message: str) -> None:
    source = _tree(tmp_path / "src")
    result = cli("upload", value, str(source))
    assert result.exit_code == 2
    assert message in result.stderr


def test_config_file_is_the_lowest_layer(cli, s3, bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _tree(tmp_path / "src")
    config = tmp_path / "config.toml"
    config.write_text('bucket = "no-such-bucket-from-config"\n[upload]\nprefix = "from-config/"\n'
                      'exclude = ["*.tmp"]\n')
    monkeypatch.setenv("ARCHUP_CONFIG", str(config))
    monkeypatch.setenv("ARCHUP_PREFIX", "from-env/")
    from typer.testing import CliRunner

    from archup.cli import app

    # --bucket (a flag) beats the file; ARCHUP_PREFIX (environment) beats the file; exclude comes from the file.
    result = CliRunner().invoke(app, ["upload", "--journal", str(cli.journal), "--bucket", bucket,
                                      "--endpoint-url", cli.endpoint, "--json", str(source)])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["prefix"].startswith("from-env/")
    assert "b.tmp" not in _file_keys(s3, bucket, summary)


def test_config_file_with_unknown_setting_is_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from archup.cli import app

    config = tmp_path / "config.toml"
    config.write_text('buckett = "typo"\n')
    result = CliRunner().invoke(app, ["--config", str(config), "list", "--journal", str(tmp_path / "j.db")])
    assert result.exit_code == 2
    assert "buckett" in result.stderr


def test_preflight_fails_before_any_file_is_read(cli, bucket, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    result = cli.subprocess("upload", "--bucket", "archup-no-such-bucket", str(source))
    assert result.exit_code == 5, result.stderr
    assert "does not exist" in result.stderr
    if cli.journal.exists():
        with sqlite3.connect(cli.journal) as conn:
            assert conn.execute("SELECT count(*) FROM files").fetchone()[0] == 0


def test_cron_output_has_no_escape_codes_and_quiet_prints_nothing(cli, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src")
    (source / "link").symlink_to(source / "a.txt")
    plain = cli.subprocess("upload", str(source))  # stdout and stderr are pipes, as under cron
    assert plain.exit_code == 0, plain.stderr
    assert "\x1b" not in plain.stdout + plain.stderr
    assert "uploading" in plain.stderr and "status" in plain.stdout and "enqueued" in plain.stdout
    assert "skipped: link: symlink" in plain.stderr  # the run names what it skipped
    (source / "more.txt").write_text("more")
    quiet = cli.subprocess("upload", "--quiet", "--new-batch", str(source))
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""


def test_profile_credentials_pool_and_retry_mode(cli, s3, bucket, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, store_faults: Faults) -> None:
    """--profile takes the profile's keys from the shared credentials file (not the environment's);
    the connection pool has room for every stream; retries are botocore's standard mode, set."""
    credentials = tmp_path / "credentials"
    credentials.write_text("[archive]\naws_access_key_id = AKIAPROFILEARCHIVE01\n"
                           "aws_secret_access_key = profile-secret-not-env\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    source = _tree(tmp_path / "src")
    stores = store_faults.stores  # every store the command opens, to look at the client it configured

    result = cli("upload", "--profile", "archive", "--parallel", "16", str(source))

    assert result.exit_code == 0, result.stderr
    (store,) = [innermost(opened) for opened in stores]
    assert store.client._request_signer._credentials.access_key == "AKIAPROFILEARCHIVE01"
    config = store.client.meta.config
    assert config.max_pool_connections >= 16
    assert config.retries["mode"] == "standard" and config.retries["total_max_attempts"] == 5

    missing = cli("upload", "--profile", "no-such-profile", str(source))
    assert missing.exit_code == 5, missing.stderr
    assert "no-such-profile" in missing.stderr


def test_a_batch_begun_before_settings_were_recorded_takes_the_runs_options(cli, s3, bucket,
                                                                           tmp_path: Path) -> None:
    """A batch from a schema-3 journal has no recorded options: the job's next run supplies them
    (and they are recorded), instead of defaults that would drop its encryption or storage class."""
    source = tmp_path / "src"
    source.mkdir()
    for index in range(4):
        (source / f"f{index}.bin").write_bytes(b"y" * 100)
    crashed = cli.subprocess("upload", "--parallel", "1", "--storage-class", "STANDARD_IA", str(source),
                             env={"ARCHUP_CRASH_AT": "after-put-object:2"})
    assert crashed.exit_code == -9, crashed.stderr
    with sqlite3.connect(cli.journal) as conn:
        conn.execute("UPDATE batches SET settings = NULL")  # as migration 4 leaves an older batch

    rerun = cli("upload", "--json", "--parallel", "1", "--storage-class", "STANDARD_IA", "--sse", "AES256",
                str(source))

    assert rerun.exit_code == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["files_uploaded"] == 4
    heads = [s3.head_object(Bucket=bucket, Key=f"{summary['prefix']}files/f{index}.bin") for index in range(4)]
    assert [head["StorageClass"] for head in heads] == ["STANDARD_IA"] * 4
    assert sum(head.get("ServerSideEncryption") == "AES256" for head in heads) >= 2  # those the rerun sent
    with sqlite3.connect(cli.journal) as conn:
        (recorded,) = conn.execute("SELECT settings FROM batches").fetchone()
    assert json.loads(recorded)["storage_class"] == "STANDARD_IA"


def test_dry_run_never_writes_the_journal_it_reads(cli, s3, bucket, tmp_path: Path) -> None:
    """--dry-run --skip-archived reads the journal read-only: one of another schema version is
    neither upgraded nor touched (read as nothing archived), and the dry run still answers."""
    source = _tree(tmp_path / "src")
    assert cli("upload", "--skip-archived", str(source)).exit_code == 0
    with sqlite3.connect(cli.journal) as conn:
        conn.execute("PRAGMA user_version = 3")  # as an older archup left it
    # The database and its write-ahead log; the -shm file is shared memory every WAL reader marks.
    files = [cli.journal, cli.journal.with_name(cli.journal.name + "-wal")]
    before = {path.name: path.read_bytes() for path in files if path.exists()}

    dry = cli("upload", "--json", "--dry-run", "--skip-archived", str(source))

    assert dry.exit_code == 0, dry.stderr
    assert json.loads(dry.stdout)["files_already_archived"] == 0  # not readable as this version's
    assert "counting nothing as archived" in dry.stderr
    after = {path.name: path.read_bytes() for path in files if path.exists()}
    assert after == before
    with sqlite3.connect(cli.journal) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
