import json
from pathlib import Path

import pytest


@pytest.mark.localstack
def test_upload_five_files_and_finalize(cli, s3, bucket, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(5):
        (source / f"file{index}.bin").write_bytes(bytes([index]) * 1024)
    result = cli("upload", "--parallel", "5", "--json", str(source))
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files_uploaded"] == 5
    assert summary["total_bytes"] == 5120
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert summary["manifest_key"] in keys
    assert len([k for k in keys if "/files/" in k]) == 5
