"""A second plain upload of a directory already archived to the same destination sends every file
again (a batch is a whole copy of the tree, as before), and says so in one line with the
--skip-archived hint; --skip-archived itself, and a first upload, say nothing of it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import Cli


def _source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(3):
        (source / f"file-{index}.txt").write_bytes(f"file {index}\n".encode())
    return source


def _hints(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "--skip-archived" in line]


def test_a_second_upload_of_an_archived_directory_says_it_sends_everything_again(cli: Cli, tmp_path: Path) -> None:
    source = _source(tmp_path)
    first = cli("upload", str(source))
    assert first.exit_code == 0, first.stderr
    assert _hints(first.stderr) == [], first.stderr
    earlier = first.stdout.split("batch_id", 1)[1].split()[0]

    second = cli("upload", str(source))
    assert second.exit_code == 0, second.stderr
    [hint] = _hints(second.stderr)
    assert hint.startswith("archup: ") and earlier in hint and "sends every file again" in hint, hint
    assert re.search(r"^files_uploaded +3$", second.stdout, re.MULTILINE), second.stdout  # sent again

    skipping = cli("upload", "--skip-archived", "--json", str(source))
    assert skipping.exit_code == 0, skipping.stderr
    assert json.loads(skipping.stdout)["files_already_archived"] == 3
    assert [line for line in _hints(skipping.stderr) if "sends every file again" in line] == []
