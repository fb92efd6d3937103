"""Reading a small source file whole (``SourceTree.read_whole``): what it refuses, and what
it costs. Each test runs on both ways a path is checked: openat2's look-up without symlinks
(the opened file's identity then checked against the scan's, no ``/proc/self/fd`` read) and
the fallback without openat2 (``readlink`` of the descriptor).

- a file changed before the read is refused before any byte is read; one that grows,
  shrinks or is rewritten in place (same size, new mtime) during the read is refused after;
- a file replaced by another of the same size and mtime (another inode), by a directory, a
  FIFO (never blocking) or a symlink, or gone, is refused as such;
- a directory on the way swapped for a symlink (before the look-up, or between the look-up
  and the open) never gets its files read;
- short reads still give the whole file; with openat2 the read costs two fstat calls and
  no readlink.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from archup import source as source_module
from archup.journal.records import FileRecord, FileState
from archup.scan import identity_of
from archup.source import FileChanged, PathEscaped, SourceTree

DATA = b"the bytes the scan saw\n" * 10
OLD_MTIME_NS = 1_600_000_000_123_456_789  # set before the scan: any write after it moves the mtime


def _has_openat2(tmp_path: Path) -> bool:
    (tmp_path / "probe").write_bytes(b"")
    return source_module._resolved_without_symlinks(str(tmp_path / "probe")) is not None


@pytest.fixture(params=["openat2", "no-openat2"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    if request.param == "openat2" and not _has_openat2(tmp_path):
        pytest.skip("this kernel has no openat2")
    if request.param == "no-openat2":
        monkeypatch.setattr(source_module, "_openat2_missing", True)
    return str(request.param)


def _scanned(path: Path, data: bytes = DATA, identity: bool = True) -> FileRecord:
    """Write ``path`` and record it as the scan would (lstat: size, mtime, identity)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    info = os.lstat(path)
    return FileRecord(batch_id="b", rel_path=path.name, key=f"files/{path.name}", size=info.st_size,
                      mtime_ns=info.st_mtime_ns, state=FileState.PENDING, part_size=None, upload_id=None,
                      sha256=None, etag=None, error=None, attempts=0, updated_at="",
                      identity=identity_of(info) if identity else None)


def _tree(tmp_path: Path) -> tuple[Path, SourceTree]:
    root = tmp_path / "src"
    root.mkdir(exist_ok=True)
    return root, SourceTree(str(root), follow_symlinks=False)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Callable[[int, int], None]]]:
    """Actions run around os.read: each is called (fd, n) after the real read of the call."""
    after: list[Callable[[int, int], None]] = []
    real_read = os.read

    def spy(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        for action in after:
            action(fd, n)
        return data

    monkeypatch.setattr(source_module.os, "read", spy)
    yield after


def test_the_whole_file_is_read(route: str, tmp_path: Path) -> None:
    root, tree = _tree(tmp_path)
    record = _scanned(root / "d" / "a.bin")
    empty = _scanned(root / "empty.txt", b"")
    assert tree.read_whole(str(root / "d" / "a.bin"), record) == DATA
    assert tree.read_whole(str(root / "empty.txt"), empty) == b""


def test_short_reads_still_give_the_whole_file(route: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, tree = _tree(tmp_path)
    record = _scanned(root / "a.bin")
    real_read = os.read
    monkeypatch.setattr(source_module.os, "read", lambda fd, n: real_read(fd, min(n, 7)))
    assert tree.read_whole(str(root / "a.bin"), record) == DATA


def test_a_file_changed_before_the_read_is_refused_unread(route: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root, tree = _tree(tmp_path)
    record = _scanned(root / "a.bin")
    (root / "a.bin").write_bytes(DATA + b"more")
    calls: list[int] = []
    real_read = os.read
    monkeypatch.setattr(source_module.os, "read", lambda fd, n: calls.append(fd) or real_read(fd, n))
    with pytest.raises(FileChanged, match="changed since the scan"):
        tree.read_whole(str(root / "a.bin"), record)
    assert calls == []


@pytest.mark.parametrize("change", ["grows", "shrinks", "rewritten-in-place"])
def test_a_file_changed_during_the_read_is_refused(route: str, change: str, tmp_path: Path,
                                                   reads: list[Callable[[int, int], None]]) -> None:
    """The change lands right after the first read call returned the scan's bytes. A rewrite
    in place keeps the size: only the fstat after the read sees it (its new mtime)."""
    root, tree = _tree(tmp_path)
    path = root / "a.bin"
    record = _scanned(path)
    done = threading.Event()

    def change_it(fd: int, n: int) -> None:
        if done.is_set():
            return
        done.set()
        if change == "grows":
            with open(path, "ab") as handle:
                handle.write(b"appended during the read\n")
        elif change == "shrinks":
            os.truncate(path, len(DATA) // 2)
        else:
            with open(path, "r+b") as handle:
                handle.write(b"X" * 16)
        os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS + 1_000_000))

    reads.append(change_it)
    # Growth shows in the read itself (one byte more than the scan's size); the rest in the fstat after it.
    expected = "bytes, expected" if change == "grows" else "changed since the scan"
    with pytest.raises(FileChanged, match=expected):
        tree.read_whole(str(path), record)
    assert done.is_set()


def test_a_file_replaced_by_another_of_the_same_size_and_mtime_is_refused(route: str, tmp_path: Path) -> None:
    root, tree = _tree(tmp_path)
    path = root / "a.bin"
    record = _scanned(path)
    other = tmp_path / "other.bin"
    other.write_bytes(b"Y" * len(DATA))
    os.utime(other, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    other.rename(path)
    with pytest.raises(FileChanged, match="inode or ctime changed: True"):
        tree.read_whole(str(path), record)


@pytest.mark.parametrize("replacement", ["gone", "directory", "fifo", "symlink"])
def test_a_file_replaced_after_the_scan_is_refused_as_such(route: str, replacement: str, tmp_path: Path) -> None:
    root, tree = _tree(tmp_path)
    path = root / "a.bin"
    record = _scanned(path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(DATA)
    path.unlink()
    if replacement == "directory":
        path.mkdir()
    elif replacement == "fifo":
        os.mkfifo(path)
    elif replacement == "symlink":
        path.symlink_to(outside)
    raised: list[BaseException] = []

    def read() -> None:
        try:
            tree.read_whole(str(path), record)
        except BaseException as error:  # noqa: BLE001 (handed to the test's thread)
            raised.append(error)

    # A FIFO is opened without blocking: the read ends on its own (bounded wait, no writer).
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # free the blocked reader, then fail
        pytest.fail("blocked opening a FIFO that replaced a scanned file")
    (error,) = raised
    if replacement == "gone":
        assert isinstance(error, FileNotFoundError)
    elif replacement == "directory":
        assert isinstance(error, IsADirectoryError)
    elif replacement == "fifo":
        assert isinstance(error, FileChanged) and "no longer a regular file" in str(error)
    else:  # the file itself: ELOOP, as a permission refusal, not a directory on the way
        assert isinstance(error, OSError) and error.errno == errno.ELOOP and not isinstance(error, PathEscaped)


def _swap_for_symlink(root: Path, tmp_path: Path) -> Path:
    """src/sub renamed away, and a symlink to a directory outside holding a same-sized file put
    in its place; returns that file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "inner.txt").write_bytes(b"S" * len(DATA))
    os.utime(outside / "inner.txt", ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    (root / "sub").rename(tmp_path / "moved")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    return outside / "inner.txt"


def _opens(monkeypatch: pytest.MonkeyPatch, before: Callable[[str], None] = lambda path: None) -> list[str]:
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        before(os.fspath(path))
        opened.append(os.path.realpath(os.fspath(path)))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(source_module.os, "open", spy)
    return opened


@pytest.mark.parametrize("identity", [True, False], ids=["identity", "no-identity"])
def test_a_directory_swapped_for_a_symlink_is_not_read_through(route: str, identity: bool, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Also for a journal row from before identities were recorded."""
    root, tree = _tree(tmp_path)
    record = _scanned(root / "sub" / "inner.txt", identity=identity)
    out_there = _swap_for_symlink(root, tmp_path)
    opened = _opens(monkeypatch)
    with pytest.raises(PathEscaped, match="a directory on its path was replaced by a symlink"):
        tree.read_whole(str(root / "sub" / "inner.txt"), record)
    if route == "openat2":  # refused by the look-up: nothing out there is even opened
        assert str(out_there) not in opened


def test_a_swap_between_the_look_up_and_the_open_is_refused(route: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The look-up found no symlink; then, just before the open, a directory on the way is
    swapped: what is opened is not the inode the scan recorded, and none of it is returned."""
    root, tree = _tree(tmp_path)
    path = root / "sub" / "inner.txt"
    record = _scanned(path)
    swapped: list[Path] = []

    def swap_once(opening: str) -> None:
        if opening == str(path) and not swapped:
            swapped.append(_swap_for_symlink(root, tmp_path))

    _opens(monkeypatch, swap_once)
    with pytest.raises(FileChanged):
        tree.read_whole(str(path), record)
    assert swapped


def test_with_openat2_a_read_costs_two_fstat_calls_and_no_readlink(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if not _has_openat2(tmp_path):
        pytest.skip("this kernel has no openat2")
    root, tree = _tree(tmp_path)
    record = _scanned(root / "d" / "a.bin")
    calls: list[str] = []
    for name in ("fstat", "stat", "lstat", "readlink"):
        real = getattr(os, name)
        monkeypatch.setattr(source_module.os, name,
                            lambda *args, _name=name, _real=real, **kwargs: calls.append(_name) or _real(*args, **kwargs))
    assert tree.read_whole(str(root / "d" / "a.bin"), record) == DATA
    assert calls == ["fstat", "fstat"]


def test_a_held_read_keeps_the_very_file_open_for_another_reader(route: str, tmp_path: Path) -> None:
    """read_held: the bytes as read_whole gives them; the file stays open until close(), and
    its descriptor's own path opens that file even after its name is taken by another."""
    root, tree = _tree(tmp_path)
    path = root / "d" / "a.bin"
    record = _scanned(path)
    held = tree.read_held(str(path), record)
    try:
        assert held.body == DATA and held.unchanged()
        assert held.fd_path is not None
        os.rename(path, root / "d" / "moved.bin")
        path.write_bytes(b"another file under the name\n")
        with open(held.fd_path, "rb") as again:
            assert again.read() == DATA
    finally:
        held.close()
        held.close()  # closing twice closes nothing else
    assert held.fd_path is None


@pytest.mark.parametrize("change", ["rewrite", "grow", "truncate"])
def test_a_held_file_changed_after_its_read_says_so(change: str, route: str, tmp_path: Path) -> None:
    root, tree = _tree(tmp_path)
    path = root / "a.bin"
    record = _scanned(path)
    held = tree.read_held(str(path), record)
    try:
        with open(path, "r+b") as handle:
            if change == "rewrite":
                handle.write(DATA.upper())  # the same size; only mtime and ctime move
            elif change == "grow":
                handle.seek(0, os.SEEK_END)
                handle.write(b"more")
            else:
                handle.truncate(3)
        assert not held.unchanged()
        assert held.body == DATA
    finally:
        held.close()


def test_a_held_read_of_a_file_changed_during_the_read_is_refused_and_closed(
        route: str, tmp_path: Path, reads: list[Callable[[int, int], None]]) -> None:
    root, tree = _tree(tmp_path)
    path = root / "a.bin"
    record = _scanned(path)
    opened: list[int] = []
    reads.append(lambda fd, n: opened.append(fd) or path.write_bytes(DATA.upper()))
    with pytest.raises(FileChanged):
        tree.read_held(str(path), record)
    with pytest.raises(OSError) as closed:
        os.fstat(opened[0])
    assert closed.value.errno == errno.EBADF
