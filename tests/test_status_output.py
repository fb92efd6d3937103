"""What status shows of failed and skipped files, read-only commands on a missing journal, and --quiet.

Batches are built through the Journal library, then read by the CLI in-process; the
journal is always read back through a connection of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from ulid import ULID

from archup.cli import app
from archup.journal import NewFile, SQLiteJournal
from archup.states import FileState

WELL_FORMED_UNKNOWN = "01K8RNKN488RQCG3YGG72QBZS5"


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def one_json(stdout: str) -> dict[str, Any]:
    document = json.loads(stdout)
    assert isinstance(document, dict), stdout
    return document


def problem_batch(journal_path: Path, *, skipped: int, failed: int, bucket: str = "archup-test-bucket",
                  endpoint_url: str | None = None) -> str:
    """A batch whose skipped files all sort before its failed ones ('a-…' before 'z-…')."""
    batch_id = str(ULID())
    journal = SQLiteJournal(journal_path)
    try:
        batch = journal.init_batch(batch_id, source_root="/srv/exports", bucket=bucket, prefix="staging/",
                                   part_size=8 * 1024 * 1024, endpoint_url=endpoint_url)
        files = [NewFile(f"a-skipped-{n:02d}", f"{batch.batch_prefix}files/a-skipped-{n:02d}", 0, 1,
                         FileState.SKIPPED, "symlink (not followed)") for n in range(skipped)]
        files += [NewFile(f"z-failed-{n:02d}", f"{batch.batch_prefix}files/z-failed-{n:02d}", 10, 1)
                  for n in range(failed)]
        files.append(NewFile("m-pending", f"{batch.batch_prefix}files/m-pending", 5, 1))
        journal.add_files(batch_id, files)
        for n in range(failed):
            journal.fail_file(batch_id, f"z-failed-{n:02d}", f"AccessDenied: z-failed-{n:02d}")
    finally:
        journal.close()
    return batch_id


def paths(lines: list[str], state: str) -> list[str]:
    return [line.split(": ")[1] for line in lines if line.startswith(f"{state}: ")]


# -- 1. status: failed files are never hidden behind skipped ones --------------------------------


def test_status_text_shows_the_failed_file_that_25_skipped_files_sort_before(tmp_path: Path) -> None:
    journal_path = tmp_path / "journal.db"
    batch_id = problem_batch(journal_path, skipped=25, failed=1)

    result = run("status", "--journal", str(journal_path), batch_id)

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "failed: z-failed-00: AccessDenied: z-failed-00" in lines
    assert paths(lines, "skipped") == [f"a-skipped-{n:02d}" for n in range(20)]
    assert f"... and 5 more skipped ('archup status {batch_id} --all' lists them all)" in lines
    assert not any("more failed" in line for line in lines)
    # Failed first: the line that matters is not below twenty that do not.
    assert lines.index("failed: z-failed-00: AccessDenied: z-failed-00") < lines.index(
        "skipped: a-skipped-00: symlink (not followed)")


def test_status_json_lists_failed_first_and_says_how_many_of_each_it_left_out(tmp_path: Path) -> None:
    journal_path = tmp_path / "journal.db"
    batch_id = problem_batch(journal_path, skipped=25, failed=1)

    document = one_json(run("status", "--journal", str(journal_path), batch_id, "--json").stdout)

    assert document["problems"][0] == {"path": "z-failed-00", "state": "failed", "error": "AccessDenied: z-failed-00"}
    assert [p["path"] for p in document["problems"][1:]] == [f"a-skipped-{n:02d}" for n in range(20)]
    assert {p["state"] for p in document["problems"][1:]} == {"skipped"}
    assert document["problems_omitted"] == {"failed": 0, "skipped": 5}
    assert (document["files"]["failed"], document["files"]["skipped"]) == (1, 25)


def test_status_caps_failed_files_too_and_all_lists_every_one(tmp_path: Path) -> None:
    journal_path = tmp_path / "journal.db"
    batch_id = problem_batch(journal_path, skipped=25, failed=23)

    capped = run("status", "--journal", str(journal_path), batch_id)
    lines = capped.stdout.splitlines()
    assert paths(lines, "failed") == [f"z-failed-{n:02d}" for n in range(20)]
    assert f"... and 3 more failed ('archup status {batch_id} --all' lists them all)" in lines
    assert f"... and 5 more skipped ('archup status {batch_id} --all' lists them all)" in lines

    every = one_json(run("status", "--journal", str(journal_path), batch_id, "--json", "--all").stdout)
    assert [p["path"] for p in every["problems"]] == ([f"z-failed-{n:02d}" for n in range(23)]
                                                      + [f"a-skipped-{n:02d}" for n in range(25)])
    assert every["problems_omitted"] == {"failed": 0, "skipped": 0}


def test_get_state_lists_failed_and_skipped_apart_and_keeps_the_mixed_list(tmp_path: Path) -> None:
    journal_path = tmp_path / "journal.db"
    batch_id = problem_batch(journal_path, skipped=25, failed=1)
    reader = SQLiteJournal(journal_path)
    try:
        summary = reader.get_state(batch_id)
        three = reader.get_state(batch_id, problem_limit=3)
        unlimited = reader.get_state(batch_id, problem_limit=-1)
    finally:
        reader.close()

    assert [(f.rel_path, f.error) for f in summary.failed] == [("z-failed-00", "AccessDenied: z-failed-00")]
    assert [f.rel_path for f in summary.skipped] == [f"a-skipped-{n:02d}" for n in range(20)]
    # 'problems' keeps its meaning for its callers: the first failed-or-skipped files in key order.
    assert [f.rel_path for f in summary.problems] == [f"a-skipped-{n:02d}" for n in range(20)]
    assert [f.rel_path for f in three.problems] == ["a-skipped-00", "a-skipped-01", "a-skipped-02"]
    assert (len(three.failed), len(three.skipped)) == (1, 3)
    assert (len(unlimited.failed), len(unlimited.skipped), len(unlimited.problems)) == (1, 25, 26)


# -- 2. read-only commands never create a journal ------------------------------------------------


MISSING_JOURNAL_CASES = [
    # command and arguments, exit code, and whether the note or the error names the journal
    (["status", WELL_FORMED_UNKNOWN], 2),
    (["abort", WELL_FORMED_UNKNOWN], 2),
    (["list"], 0),
    (["gc"], 0),
]


@pytest.mark.parametrize(("args", "code"), MISSING_JOURNAL_CASES, ids=lambda case: str(case))
def test_a_missing_journal_is_not_created_and_is_named(tmp_path: Path, args: list[str], code: int) -> None:
    journal_path = tmp_path / "state" / "journal.db"

    result = run(args[0], "--journal", str(journal_path), *args[1:])

    assert result.exit_code == code, (result.stdout, result.stderr)
    assert f"no journal at {journal_path} (nothing uploaded yet)" in result.stderr
    assert not journal_path.exists() and not journal_path.parent.exists()


@pytest.mark.parametrize(("args", "code"), MISSING_JOURNAL_CASES, ids=lambda case: str(case))
def test_a_missing_journal_with_json_prints_one_object(tmp_path: Path, args: list[str], code: int) -> None:
    journal_path = tmp_path / "state" / "journal.db"

    result = run(args[0], "--journal", str(journal_path), *args[1:], "--json")

    assert result.exit_code == code, (result.stdout, result.stderr)
    document = one_json(result.stdout)
    if code:
        assert document == {"error": f"no journal at {journal_path} (nothing uploaded yet); "
                                     "check --journal or ARCHUP_JOURNAL", "exit_code": 2}
    elif args[0] == "list":
        assert document == {"batches": []}
    else:
        assert document["expired"] == [] and document["orphan_uploads"] == [] and document["errors"] == []
    assert not journal_path.exists() and not journal_path.parent.exists()


def test_the_default_journal_place_is_not_created_by_gc_or_list(tmp_path: Path) -> None:
    default_directory = tmp_path / "state" / "archup"  # conftest points XDG_STATE_HOME at tmp_path/state
    assert run("gc").exit_code == 0
    assert run("list").exit_code == 0
    assert run("status", WELL_FORMED_UNKNOWN).exit_code == 2
    assert not default_directory.exists()


# -- 3. --quiet on gc, abort and list ------------------------------------------------------------


def test_gc_quiet_with_nothing_to_do_prints_nothing(tmp_path: Path) -> None:
    journal_path = tmp_path / "journal.db"
    SQLiteJournal(journal_path).close()  # there, and empty

    loud = run("gc", "--journal", str(journal_path))
    quiet = run("gc", "--journal", str(journal_path), "--quiet")

    assert loud.exit_code == quiet.exit_code == 0
    assert "0 batch(es) expired" in loud.stdout  # without --quiet, the summary as before
    assert (quiet.stdout, quiet.stderr) == ("", "")


@pytest.mark.parametrize("mode", ["--quiet", "--json", None])
def test_gc_errors_go_to_stderr_and_exit_5(cli: Any, tmp_path: Path, mode: str | None) -> None:
    # A batch whose bucket does not exist: listing its uploads fails, and gc reports that.
    problem_batch(cli.journal, skipped=0, failed=0, bucket=f"{cli.bucket}-absent", endpoint_url=cli.endpoint)

    result = cli("gc", *([mode] if mode else []))

    assert result.exit_code == 5, result.stderr  # a destination gc could not look at: cron hears of it
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"archup: error: listing uploads under s3://{cli.bucket}-absent/")
    if mode == "--quiet":
        assert result.stdout == ""
    elif mode == "--json":
        assert one_json(result.stdout)["errors"] == [lines[0].removeprefix("archup: error: ")]
    else:
        assert "0 batch(es) expired" in result.stdout and "error" not in result.stdout


def test_gc_quiet_json_still_prints_its_object(tmp_path: Path) -> None:
    journal_path = tmp_path / "journal.db"
    SQLiteJournal(journal_path).close()

    result = run("gc", "--journal", str(journal_path), "--quiet", "--json")

    assert result.exit_code == 0, result.stderr
    assert one_json(result.stdout)["expired"] == []


def test_abort_quiet_prints_nothing_and_aborts(cli: Any) -> None:
    batch_id = problem_batch(cli.journal, skipped=0, failed=0, bucket=cli.bucket, endpoint_url=cli.endpoint)

    quiet = cli("abort", batch_id, "--quiet")

    assert quiet.exit_code == 0, quiet.stderr
    assert (quiet.stdout, quiet.stderr) == ("", "")
    assert one_json(cli("status", batch_id, "--json").stdout)["status"] == "aborted"
    again = cli("abort", batch_id, "--quiet", "--json")
    assert again.exit_code == 0 and one_json(again.stdout)["state"] == "aborted"


def test_abort_quiet_still_reports_an_unknown_batch(cli: Any) -> None:
    problem_batch(cli.journal, skipped=0, failed=0)  # the journal exists, without this batch

    result = cli("abort", WELL_FORMED_UNKNOWN, "--quiet")

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("archup: error: ") and WELL_FORMED_UNKNOWN in result.stderr


def test_list_quiet_prints_nothing_and_json_still_lists(tmp_path: Path) -> None:
    journal_path = tmp_path / "journal.db"
    batch_id = problem_batch(journal_path, skipped=1, failed=1)

    loud = run("list", "--journal", str(journal_path))
    quiet = run("list", "--journal", str(journal_path), "--quiet")
    listed = run("list", "--journal", str(journal_path), "--quiet", "--json")

    assert batch_id in loud.stdout
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, "", "")
    assert [row["batch_id"] for row in one_json(listed.stdout)["batches"]] == [batch_id]
