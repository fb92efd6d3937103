"""Walk a source directory as a stream and map each file to its object key.

The walk never holds the whole file list: it keeps a stack of directories still
to visit and yields files as ``os.scandir`` finds them. Symlinks are not
followed; they, and anything that is not a regular file, are yielded with a
skip reason so the batch reports them by name.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

FILES_DIR = "files/"
"""Source files live under ``<batch prefix>files/``; the manifest sits beside that
folder, so no source file name can collide with it."""


@dataclass(frozen=True)
class ScanItem:
    rel_path: str          # POSIX-style path relative to the source root
    path: str              # the path to open
    size: int
    mtime_ns: int
    skip_reason: str | None = None


def object_key(batch_prefix: str, rel_path: str) -> str:
    return f"{batch_prefix}{FILES_DIR}{rel_path}"


def _printable(name: str) -> str:
    """A name that is not valid UTF-8, shown with its bad bytes escaped."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _valid_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scan(root: str | os.PathLike[str]) -> Iterator[ScanItem]:
    root_path = os.fspath(root)
    pending: list[tuple[str, str]] = [(root_path, "")]
    while pending:
        directory, rel_dir = pending.pop()
        try:
            entries = os.scandir(directory)
        except OSError as error:
            if rel_dir:
                yield ScanItem(_printable(rel_dir.rstrip("/")), directory, 0, 0,
                               f"directory unreadable: {error.strerror}")
                continue
            raise
        with entries:
            for entry in entries:
                rel_path = rel_dir + entry.name
                if not _valid_utf8(rel_path):
                    yield ScanItem(_printable(rel_path), entry.path, 0, 0, "file name is not valid UTF-8")
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError as error:
                    yield ScanItem(rel_path, entry.path, 0, 0, f"vanished or unreadable: {error.strerror}")
                    continue
                mode = info.st_mode
                if stat.S_ISDIR(mode):
                    pending.append((entry.path, rel_path + "/"))
                elif stat.S_ISREG(mode):
                    yield ScanItem(rel_path, entry.path, info.st_size, info.st_mtime_ns)
                elif stat.S_ISLNK(mode):
                    yield ScanItem(rel_path, entry.path, 0, info.st_mtime_ns, "symlink (not followed)")
                else:
                    yield ScanItem(rel_path, entry.path, 0, info.st_mtime_ns,
                                   "not a regular file (fifo, socket or device)")
