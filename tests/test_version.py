"""archup --version / archup version, and shell completion (typer's own mechanism).

Completion is run the way typer's own tests run it: the program started with
``_ARCHUP_COMPLETE=complete_<shell>`` and the words typed so far in
``_TYPER_COMPLETE_ARGS`` (bash: ``COMP_WORDS``/``COMP_CWORD``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archup import __version__
from archup.cli import app
from archup.journal import SQLiteJournal

# Prints whether boto3 was imported by the time the process exits (completion must not pay for it).
REPORT_BOTO3 = ("import atexit, sys\n"
                "atexit.register(lambda: sys.stderr.write('boto3 imported' if 'boto3' in sys.modules "
                "else 'boto3 not imported'))\n"
                "from archup.cli import main\n"
                "main()\n")


def archup(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", REPORT_BOTO3, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def test_version_names_archup_python_and_the_s3_libraries() -> None:
    done = archup("--version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"archup {__version__}"
    assert f"- python {sys.version.split()[0]} " in done.stdout
    assert f"- boto3 {metadata.version('boto3')}" in lines and f"- botocore {metadata.version('botocore')}" in lines
    assert "boto3 not imported" in done.stderr  # read from package metadata


def test_version_json_is_one_object_with_every_library() -> None:
    result = CliRunner().invoke(app, ["version", "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["archup"] == __version__ == metadata.version("archup")
    assert document["botocore"] == metadata.version("botocore")
    try:
        awscrt: str | None = metadata.version("awscrt")
    except metadata.PackageNotFoundError:
        awscrt = None
    assert document["awscrt"] == awscrt  # null where it is not installed
    assert set(document) == {"archup", "python", "boto3", "botocore", "awscrt"}


@pytest.fixture
def journal_with_batches(tmp_path: Path) -> tuple[Path, list[str]]:
    path = tmp_path / "state" / "journal.db"
    journal = SQLiteJournal(path)
    ids = ["01KAAAAAAAAAAAAAAAAAAAAAAA", "01KABBBBBBBBBBBBBBBBBBBBBB", "01KCCCCCCCCCCCCCCCCCCCCCCC"]
    for batch_id in ids:
        journal.init_batch(batch_id, source_root="/data/src", bucket="archive", prefix="staging/", part_size=1)
    journal.close()
    return path, ids


def complete(shell: str, words: str, journal: Path) -> subprocess.CompletedProcess[str]:
    env = {"_ARCHUP_COMPLETE": f"complete_{shell}", "_TYPER_COMPLETE_ARGS": words, "ARCHUP_JOURNAL": str(journal)}
    if shell == "fish":
        env["_TYPER_COMPLETE_FISH_ACTION"] = "get-args"  # what the fish script asks first
    if shell == "bash":
        env |= {"COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
    return archup(env=env)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_batch_ids_complete_from_the_journal(shell: str, journal_with_batches: tuple[Path, list[str]]) -> None:
    path, ids = journal_with_batches
    done = complete(shell, "archup status 01KA", path)
    assert done.returncode == 0, done.stderr
    assert ids[0] in done.stdout and ids[1] in done.stdout
    assert ids[2] not in done.stdout  # only the ids that start with what was typed
    assert "boto3 not imported" in done.stderr


@pytest.mark.parametrize("words", ["archup finalize ", "archup verify ", "archup abort ", "archup resume ",
                                   "archup upload --batch "])
def test_every_batch_argument_completes(words: str, journal_with_batches: tuple[Path, list[str]]) -> None:
    path, ids = journal_with_batches
    done = complete("zsh", words, path)
    assert done.returncode == 0, done.stderr
    assert all(batch_id in done.stdout for batch_id in ids), done.stdout


def test_completion_reads_the_journal_named_by_the_flag(journal_with_batches: tuple[Path, list[str]],
                                                        tmp_path: Path) -> None:
    path, ids = journal_with_batches
    done = complete("zsh", f"archup status --journal {path} ", tmp_path / "elsewhere.db")
    assert all(batch_id in done.stdout for batch_id in ids), done.stdout


def test_completion_never_creates_a_journal(tmp_path: Path) -> None:
    missing = tmp_path / "state" / "journal.db"
    done = complete("zsh", "archup status ", missing)
    assert done.returncode == 0, done.stderr
    assert "01" not in done.stdout
    assert not missing.parent.exists()


def test_completion_of_a_damaged_journal_offers_nothing_and_changes_nothing(tmp_path: Path) -> None:
    damaged = tmp_path / "journal.db"
    damaged.write_bytes(b"not a database" * 100)
    done = complete("zsh", "archup status ", damaged)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "01" not in done.stdout
    assert damaged.read_bytes() == b"not a database" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.db"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_show_completion_prints_the_script_for_the_shell_it_runs_in(tmp_path: Path) -> None:
    # "; exit $?" keeps bash from exec'ing python in its place: bash stays the parent that the
    # shell detection finds, even when the test runner itself has no shell among its ancestors.
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m archup --show-completion; exit $?"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "SHELL": "/bin/bash"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "_ARCHUP_COMPLETE=complete_bash" in done.stdout and "complete -o default -F _archup_completion archup" \
        in done.stdout


# Modules a command that only reads the journal has no use for: the S3 client stack, the
# sending engine, and typer 0.29's pydantic-based option coercion (0.25-0.3 s of every start).
SENDING_MODULES = ("boto3", "botocore", "awscrt", "pydantic", "archup.run", "archup.uploader", "archup.multipart",
                   "archup.batches", "archup.store.s3", "rich.progress")
REPORT_MODULES = ("import atexit, sys\n"
                  f"atexit.register(lambda: sys.stderr.write('loaded: ' + ' '.join(m for m in {SENDING_MODULES!r} "
                  "if m in sys.modules)))\n"
                  "from archup.cli import main\n"
                  "main()\n")


def test_status_loads_none_of_the_sending_modules(tmp_path: Path) -> None:
    """status is read on every cron check; it must not pay for the S3 client and engine imports."""
    path = tmp_path / "journal.db"
    journal = SQLiteJournal(path)
    journal.init_batch("01K8RNKN488RQCG3YGG72QBZS5", source_root="/srv", bucket="b", prefix="staging/",
                       part_size=8 * 1024 * 1024)
    journal.close()
    done = subprocess.run([sys.executable, "-c", REPORT_MODULES, "status", "01K8RNKN488RQCG3YGG72QBZS5",
                           "--journal", str(path), "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["batch_id"] == "01K8RNKN488RQCG3YGG72QBZS5"
    assert done.stderr.endswith("loaded: "), done.stderr
