"""Finalize reads back only what the journal recorded: a batch without shards does not list
shards/, one whose every file is packed does not list files/ (archup.finalize._compare)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Cli
from faultstore import Faults


def _source(root: Path) -> Path:
    root.mkdir()
    (root / "a.txt").write_bytes(b"a" * 100)
    (root / "b.txt").write_bytes(b"b" * 200)
    return root


@pytest.mark.parametrize("pack, listed, not_listed", [
    ((), "*/files/", "*/shards/"),
    (("--pack-under", "64KiB"), "*/shards/", "*/files/"),
])
def test_finalize_lists_only_the_prefixes_the_journal_recorded_objects_under(
        cli: Cli, tmp_path: Path, store_faults: Faults, pack: tuple[str, ...], listed: str, not_listed: str) -> None:
    result = cli("upload", str(_source(tmp_path / "src")), "--json", *pack)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["files_uploaded"] == 2
    assert store_faults.count("list_objects", listed) == 1
    assert store_faults.count("list_objects", not_listed) == 0


def test_a_missing_object_still_fails_the_read_back(cli: Cli, s3, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    store_faults: Faults) -> None:
    source = _source(tmp_path / "src")
    uploaded = cli("upload", str(source), "--no-finalize", "--json")
    assert uploaded.exit_code == 0, uploaded.stderr
    batch_id = json.loads(uploaded.stdout)["batch_id"]
    listing = s3.list_objects_v2(Bucket=cli.bucket, Prefix=f"staging/{batch_id}/files/")["Contents"]
    s3.delete_object(Bucket=cli.bucket, Key=listing[0]["Key"])
    finalized = cli("finalize", batch_id, "--json")
    assert finalized.exit_code != 0
    assert "failed the read-back" in finalized.stdout + finalized.stderr
    assert store_faults.count("list_objects", "*/shards/") == 0
