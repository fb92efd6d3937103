"""How an upload's process ends: the heap is frozen before interpreter shutdown, so the
shutdown's full collections do not walk botocore's models (archup.cli.upload.freeze_heap_at_exit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import Cli

# Runs archup's console entry point in a child whose gc.freeze records that it was called,
# and how many objects the heap held frozen before (0: nothing froze it during the run).
CHILD = """
import gc, json, sys
real_freeze, marker = gc.freeze, sys.argv[1]
def freeze():
    with open(marker, "w") as out:
        json.dump({"frozen_before": gc.get_freeze_count()}, out)
    real_freeze()
gc.freeze = freeze
from archup.cli import main
sys.argv = ["archup", *sys.argv[2:]]
main()
"""


def _run(cli: Cli, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    marker = tmp_path / "frozen.json"
    full = [args[0], *cli.common(args[0]), *args[1:]]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(marker), *full], capture_output=True, text=True,
                          timeout=120)
    return proc, marker


def test_an_upload_freezes_the_heap_only_at_its_exit(cli: Cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_bytes(b"abc")
    proc, marker = _run(cli, tmp_path, "upload", str(source), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["files_uploaded"] == 1
    assert json.loads(marker.read_text()) == {"frozen_before": 0}


def test_a_resume_freezes_the_heap_at_its_exit(cli: Cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_bytes(b"abc")
    uploaded = cli("upload", str(source), "--no-finalize", "--json")
    assert uploaded.exit_code == 0, uploaded.stderr
    batch_id = json.loads(uploaded.stdout)["batch_id"]
    proc, marker = _run(cli, tmp_path, "resume", batch_id, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(marker.read_text()) == {"frozen_before": 0}


def test_a_usage_error_exits_without_registering_it(cli: Cli, tmp_path: Path) -> None:
    proc, marker = _run(cli, tmp_path, "upload", str(tmp_path / "missing"))
    assert proc.returncode != 0
    assert not marker.exists()
