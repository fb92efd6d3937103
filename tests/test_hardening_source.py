"""Hardening, issue 29 item 10: a directory on a source file's path swapped for a symlink
after the scan: where the kernel has openat2, nothing it leads to is ever opened (a FIFO or a
device out there is not even touched); elsewhere today's check after open() still refuses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from archup import source as source_module
from archup.source import PathEscaped, SourceTree


def _swapped(tmp_path: Path) -> tuple[Path, Path]:
    """src/sub/inner.txt scanned, then src/sub replaced by a symlink to a directory outside the
    root holding a FIFO of the same name."""
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "inner.txt").write_bytes(b"inner\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "inner.txt")
    (root / "sub").rename(tmp_path / "moved")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    return root, outside / "inner.txt"


def _opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(source_module.os, "open", spy)
    return opened


def _has_openat2(tmp_path: Path) -> bool:
    (tmp_path / "probe").write_bytes(b"")
    return source_module._resolved_without_symlinks(str(tmp_path / "probe")) is not None


def test_nothing_a_swapped_directory_leads_to_is_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _has_openat2(tmp_path):
        pytest.skip("this kernel has no openat2: the fallback is tested below")
    root, fifo = _swapped(tmp_path)
    tree = SourceTree(str(root), follow_symlinks=False)
    opened = _opens(monkeypatch)
    with pytest.raises(PathEscaped, match="a directory on its path was replaced by a symlink"):
        tree.open(str(root / "sub" / "inner.txt"))
    assert all(os.path.realpath(path) != str(fifo) for path in opened), opened


def test_without_openat2_the_check_after_open_still_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = _swapped(tmp_path)
    monkeypatch.setattr(source_module, "_openat2_missing", True)
    tree = SourceTree(str(root), follow_symlinks=False)
    with pytest.raises(PathEscaped, match="a directory on its path was replaced by a symlink"):
        tree.open(str(root / "sub" / "inner.txt"))


def test_a_plain_file_and_a_symlink_as_the_file_itself(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f.txt").write_bytes(b"content\n")
    (root / "link").symlink_to(root / "d" / "f.txt")
    tree = SourceTree(str(root), follow_symlinks=False)
    with tree.open(str(root / "d" / "f.txt")) as handle:
        assert handle.read() == b"content\n"
    with pytest.raises(OSError) as raised:
        tree.open(str(root / "link"))
    assert not isinstance(raised.value, PathEscaped) and raised.value.errno == 40  # ELOOP: the file itself
