"""--follow-symlinks (issue 6, point 2): a symlink inside the source root is taken as what
it points to; one that leads out of the root, dangles, or loops is skipped by name; and a
link re-pointed after the scan is never read out of the root. Without the option, every
symlink is skipped (tests/test_inputs.py), and a directory swapped for a symlink after the
scan is not read through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_inputs import after_scan, bucket_files, check_batch, only_batch, upload_json, write

from archup.scan import scan

SECRET = b"outside the source tree: must never be uploaded\n"


def _tree(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    outside = tmp_path / "outside"
    write(outside / "secret.txt", SECRET)
    write(outside / "deeper" / "secret2.txt", SECRET)
    source = tmp_path / "src"
    files = {"real.txt": b"a real file\n", "dir/inner.txt": b"inner\n", "dir/sub/leaf.txt": b"leaf\n"}
    for rel, data in files.items():
        write(source / rel, data)
    return source, outside, files


LINKS_SKIPPED = {
    "loop-a": ("loop-b", "symlink loop"),                          # a loop of two
    "self-loop": ("self-loop", "symlink loop"),                    # a loop of one
    "dir/up": ("..", "symlink loop: leads to a directory above it"),
    "dir/sub/top": ("../..", "symlink loop: leads to a directory above it"),
    "to-outside-dir": ("../outside", "leads out of the source root"),
    "dangling": ("does-not-exist", "dangling symlink"),
}


def test_follow_symlinks_takes_links_inside_the_root_and_skips_the_rest(cli, s3, bucket, tmp_path: Path) -> None:
    source, outside, files = _tree(tmp_path)
    links = {**LINKS_SKIPPED, "loop-b": ("loop-a", "symlink loop"),
             "to-outside-file": (str(outside / "secret.txt"), "leads out of the source root")}
    for rel, (target, _) in links.items():
        os.symlink(target, source / rel)
    # Inside the root: a file link, a relative directory link, an absolute one, a link to a link.
    os.symlink("../real.txt", source / "dir" / "to-real")
    os.symlink("dir/sub", source / "linked-sub", target_is_directory=True)
    os.symlink(str(source / "dir" / "sub"), source / "abs-sub", target_is_directory=True)
    os.symlink("dir/to-real", source / "chain")

    code, summary = upload_json(cli, source, "--follow-symlinks")
    assert code == 0, summary
    expected = {**files, "dir/to-real": files["real.txt"], "chain": files["real.txt"],
                "linked-sub/leaf.txt": files["dir/sub/leaf.txt"], "abs-sub/leaf.txt": files["dir/sub/leaf.txt"]}
    batch = only_batch(cli.journal)
    assert SECRET not in bucket_files(s3, bucket, batch).values()
    skipped = {rel: reason for rel, (_, reason) in links.items()}
    # dir/sub walked again through the two links: its link to the root is a loop there too.
    skipped.update({f"{via}/top": "symlink loop: leads to a directory above it" for via in ("linked-sub", "abs-sub")})
    check_batch(cli, s3, bucket, uploaded=expected, skipped=skipped, finalized=True)


def test_mutual_directory_links_end_in_a_skip_not_a_walk_without_end(tmp_path: Path) -> None:
    """a/to-b -> b and b/to-a -> a: each directory is walked through the other once, then
    the link back to a directory already on the path is skipped."""
    source = tmp_path / "src"
    write(source / "a" / "x.txt", b"x")
    write(source / "b" / "y.txt", b"y")
    os.symlink("../b", source / "a" / "to-b")
    os.symlink("../a", source / "b" / "to-a")
    items = {item.rel_path: item.skip_reason for item in scan(source, follow_symlinks=True)}
    assert items == {
        "a/x.txt": None, "a/to-b/y.txt": None, "a/to-b/to-a": "symlink loop: leads to a directory above it (not followed)",
        "b/y.txt": None, "b/to-a/x.txt": None, "b/to-a/to-b": "symlink loop: leads to a directory above it (not followed)",
    }


def test_follow_symlinks_with_files_from(cli, s3, bucket, tmp_path: Path) -> None:
    source, outside, files = _tree(tmp_path)
    os.symlink("dir", source / "linked-dir", target_is_directory=True)
    os.symlink("../outside", source / "out", target_is_directory=True)
    listing = write(tmp_path / "list.txt", b"real.txt\nlinked-dir/inner.txt\nout/secret.txt\nmissing.txt\n")

    code, summary = upload_json(cli, source, "--follow-symlinks", "--files-from", str(listing))
    assert code == 0, summary
    check_batch(cli, s3, bucket, uploaded={"real.txt": files["real.txt"], "linked-dir/inner.txt": files["dir/inner.txt"]},
                skipped={"out/secret.txt": "leads out of the source root", "missing.txt": "no such file"},
                finalized=True)


def test_a_followed_link_repointed_out_of_the_root_after_the_scan_is_not_read(
        cli, s3, bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, outside, files = _tree(tmp_path)
    inside = write(source / "data.txt", SECRET)       # the link's target at the scan ...
    link = source / "link.txt"
    os.symlink("data.txt", link)

    def repoint() -> None:                          # ... then a file of the same size outside
        link.unlink()
        os.symlink(outside / "secret.txt", link)

    after_scan(monkeypatch, repoint)
    result = cli("upload", "--follow-symlinks", str(source))
    assert result.exit_code == 3, result.stderr
    assert "failed: link.txt: a symlink on its path now leads out of the source root" in result.stderr
    batch = only_batch(cli.journal)
    stored = bucket_files(s3, bucket, batch)
    assert stored.get("data.txt") == inside.read_bytes() and "link.txt" not in stored


def test_a_directory_swapped_for_a_symlink_after_the_scan_is_not_read_through(
        cli, s3, bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --follow-symlinks: the scan walked a real directory; it is then renamed and a
    symlink to the same directory put in its place (same files, same inodes). archup opens
    nothing through it."""
    source = tmp_path / "src"
    write(source / "real.txt", b"real\n")
    write(source / "sub" / "inner.txt", b"inner\n")

    def swap() -> None:
        (source / "sub").rename(source / "moved")
        os.symlink("moved", source / "sub", target_is_directory=True)

    after_scan(monkeypatch, swap)
    result = cli("upload", str(source))
    assert result.exit_code == 3, result.stderr
    assert "failed: sub/inner.txt: a directory on its path was replaced by a symlink" in result.stderr
    check_batch(cli, s3, bucket, uploaded={"real.txt": b"real\n"},
                failed={"sub/inner.txt": "replaced by a symlink"}, finalized=False)


@pytest.mark.parametrize("how", ["resume", "plain-upload"])
def test_a_batch_that_follows_symlinks_is_resumed_following_them(cli, s3, bucket, tmp_path: Path, how: str) -> None:
    """Whether a batch follows symlinks is its own, kept in the journal: a rerun without the
    flag (a resume, or the same cron line missing it) still takes the linked files."""
    source, _, files = _tree(tmp_path)
    os.symlink("dir/sub", source / "linked-sub", target_is_directory=True)
    crashed = cli.subprocess("upload", "--follow-symlinks", "--parallel", "1", str(source),
                             env={"ARCHUP_CRASH_AT": "after-put-object"})
    assert crashed.exit_code == -9, crashed.stderr
    batch = only_batch(cli.journal)
    assert batch.settings.follow_symlinks is True

    rerun = (cli("resume", batch.batch_id) if how == "resume" else cli("upload", str(source)))
    assert rerun.exit_code == 0, rerun.stderr
    expected = {**files, "linked-sub/leaf.txt": files["dir/sub/leaf.txt"]}
    check_batch(cli, s3, bucket, uploaded=expected, finalized=True)


def test_follow_symlinks_on_a_rerun_of_a_batch_started_without_says_so(cli, s3, bucket, tmp_path: Path) -> None:
    source, _, files = _tree(tmp_path)
    os.symlink("dir/sub", source / "linked-sub", target_is_directory=True)
    crashed = cli.subprocess("upload", "--parallel", "1", str(source), env={"ARCHUP_CRASH_AT": "after-put-object"})
    assert crashed.exit_code == -9, crashed.stderr

    rerun = cli("upload", "--follow-symlinks", str(source))
    assert rerun.exit_code == 0, rerun.stderr
    assert "keeps the options it was started with (follow_symlinks differ" in rerun.stderr
    check_batch(cli, s3, bucket, uploaded=files, skipped={"linked-sub": "symlink (not followed)"}, finalized=True)
