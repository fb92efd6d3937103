"""Walk a source directory as a stream and map each file to its object key.

The walk never holds the whole file list: it keeps a stack of directories still
to visit and yields files as ``os.scandir`` finds them. Symlinks are not
followed unless asked (``follow_symlinks``, then only to a target inside the
source root, and never into a directory already on the path: no loop); they,
and anything that is not a regular file, are yielded with a skip reason so the
batch reports them by name. :func:`read_ahead` runs a walk in
its own thread, a bounded number of groups ahead of the journal writes.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from .select import Selector

T = TypeVar("T")
G = TypeVar("G")

# Skip reasons that are not a policy but a failure to read what should be archived: a
# run that meets one still seals what it could, and exits 3 (partial).
UNREADABLE_REASONS = ("directory unreadable", "vanished or unreadable", "symlink unreadable", "file unreadable")
# A name that is not valid UTF-8 (archup's keys and manifest are UTF-8): a file is skipped by
# name; a directory counts as unreadable, since what it holds is neither counted nor named.
NOT_UTF8_FILE = "file name is not valid UTF-8"
NOT_UTF8_DIRECTORY = f"{UNREADABLE_REASONS[0]}: its name is not valid UTF-8"
# A --files-from path that is not there: the source no longer has it (not a file kept unread).
LISTED_BUT_MISSING = "listed in --files-from but no such file or directory"

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
    identity: str | None = None


def identity_of(info: os.stat_result) -> str:
    """Device, inode and ctime: a file replaced, or rewritten with its mtime put back
    (cp -p, rsync -t, touch -r), differs here though its size and mtime do not."""
    return f"{info.st_dev}:{info.st_ino}:{info.st_ctime_ns}"


def object_key(batch_prefix: str, rel_path: str) -> str:
    return f"{batch_prefix}{FILES_DIR}{rel_path}"


def _printable(name: str) -> str:
    """A name that is not valid UTF-8, shown with its bad bytes escaped."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def display_path(name: str) -> str:
    """A file name made safe for one line of terminal output: control characters escaped."""
    if name.isprintable():
        return name
    return "".join(char if char.isprintable() or char == " " else
                   char.encode("unicode_escape").decode("ascii") for char in name)


def _name_for(directory: str, rel_path: str) -> str:
    """The journal's name for a path that is not valid UTF-8: its escaped form, unless a real
    file of that very name sits beside it; then a trailing '/' keeps the two apart (no real
    file's relative path ends in '/')."""
    shown = _printable(rel_path)
    real = os.path.join(directory, shown.rsplit("/", 1)[-1])
    return shown + "/" if os.path.lexists(real) else shown


def _valid_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _item(rel_path: str, path: str, info: os.stat_result) -> ScanItem | None:
    """A file's scan item from its lstat; None for a directory."""
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        return None
    if stat.S_ISREG(mode):
        return ScanItem(rel_path, path, info.st_size, info.st_mtime_ns, identity=identity_of(info))
    if stat.S_ISLNK(mode):
        return ScanItem(rel_path, path, 0, info.st_mtime_ns, "symlink (not followed)")
    return ScanItem(rel_path, path, 0, info.st_mtime_ns, "not a regular file (fifo, socket or device)")


def inside(root_real: str, path: str) -> bool:
    """Whether a resolved path is the root itself or lies under it."""
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


DirId = tuple[int, int]  # (st_dev, st_ino)


def _follow(rel_path: str, path: str, root_real: str,
            ancestors: tuple[DirId, ...]) -> ScanItem | tuple[os.stat_result, DirId]:
    """A symlink met with follow_symlinks: the item it stands for (a file, or a skip with
    its reason), or the stat and id of the directory it leads to, to walk."""
    try:
        info = os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return ScanItem(rel_path, path, 0, 0, "symlink loop (not followed)")
        if error.errno == errno.ENOENT:
            return ScanItem(rel_path, path, 0, 0, "dangling symlink (its target does not exist)")
        return ScanItem(rel_path, path, 0, 0, f"{UNREADABLE_REASONS[2]}: {error.strerror}")
    if not inside(root_real, os.path.realpath(path)):
        return ScanItem(rel_path, path, 0, info.st_mtime_ns, "symlink leads out of the source root (not followed)")
    if stat.S_ISDIR(info.st_mode):
        directory = (info.st_dev, info.st_ino)
        if directory in ancestors:
            return ScanItem(rel_path, path, 0, info.st_mtime_ns,
                            "symlink loop: leads to a directory above it (not followed)")
        return info, directory
    if stat.S_ISREG(info.st_mode):
        return ScanItem(rel_path, path, info.st_size, info.st_mtime_ns, identity=identity_of(info))
    return ScanItem(rel_path, path, 0, info.st_mtime_ns, "not a regular file (fifo, socket or device)")


def scan(root: str | os.PathLike[str], select: Selector | None = None, *,
         follow_symlinks: bool = False) -> Iterator[ScanItem]:
    """Every file under root (depth first, directories as a stack, never the whole list).

    With ``follow_symlinks`` a symlink to a file or directory inside the root is taken
    as what it points to, under the symlink's own path; one that leads out of the root,
    dangles, or leads to a directory on its own path (a loop) is skipped with the reason.
    """
    root_path = os.fspath(root)
    root_real = os.path.realpath(root_path)
    root_info = os.stat(root_path)
    # Each directory still to visit carries the (device, inode) of the directories on its
    # path: a followed symlink into one of them would walk for ever.
    pending: list[tuple[str, str, tuple[DirId, ...]]] = [(root_path, "", ((root_info.st_dev, root_info.st_ino),))]
    while pending:
        directory, rel_dir, ancestors = pending.pop()
        try:
            entries = os.scandir(directory)
        except OSError as error:
            if rel_dir and select is not None and select.excludes_dir(rel_dir.rstrip("/")):
                continue  # excluded as a whole (e.g. --exclude lost+found/): nothing of it was wanted
            if rel_dir:
                yield ScanItem(_printable(rel_dir.rstrip("/")), directory, 0, 0,
                               f"{UNREADABLE_REASONS[0]}: {error.strerror}")
                continue
            raise
        with entries:
            for entry in entries:
                rel_path = rel_dir + entry.name
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError as error:
                    if not _valid_utf8(rel_path):
                        yield ScanItem(_name_for(directory, rel_path), entry.path, 0, 0, NOT_UTF8_FILE)
                        continue
                    yield ScanItem(rel_path, entry.path, 0, 0, f"{UNREADABLE_REASONS[1]}: {error.strerror}")
                    continue
                if not _valid_utf8(rel_path):
                    # Never archived: no key could be restored to this name. A file is skipped
                    # by name, with its real size and mtime; a directory is unreadable (its
                    # files can be neither counted nor named): the run exits 3.
                    yield ScanItem(_name_for(directory, rel_path), entry.path,
                                   0 if stat.S_ISDIR(info.st_mode) else info.st_size, info.st_mtime_ns,
                                   NOT_UTF8_DIRECTORY if stat.S_ISDIR(info.st_mode) else NOT_UTF8_FILE)
                    continue
                if follow_symlinks and stat.S_ISLNK(info.st_mode):
                    followed = _follow(rel_path, entry.path, root_real, ancestors)
                    if isinstance(followed, ScanItem):
                        if select is None or select(rel_path):
                            yield followed
                    else:
                        pending.append((entry.path, rel_path + "/", ancestors + (followed[1],)))
                    continue
                item = _item(rel_path, entry.path, info)
                if item is None:
                    pending.append((entry.path, rel_path + "/", ancestors + ((info.st_dev, info.st_ino),)))
                elif select is None or select(rel_path):
                    yield item


def _symlinked_parent(root: str, rel_path: str) -> str | None:
    """The first directory on the way to rel_path that is a symlink (never followed), if any."""
    parts = rel_path.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        if os.path.islink(os.path.join(root, *parts[:depth])):
            return "/".join(parts[:depth])
    return None


def scan_list(root: str | os.PathLike[str], rel_paths: Iterable[str],
              select: Selector | None = None, *, follow_symlinks: bool = False) -> Iterator[ScanItem]:
    """The files a --files-from list names, in its order; a listed path that is missing is reported."""
    root_path = os.fspath(root)
    root_real = os.path.realpath(root_path)
    for rel_path in rel_paths:
        if select is not None and not select(rel_path):
            continue
        path = os.path.join(root_path, rel_path)
        if follow_symlinks and os.path.lexists(path):
            followed = _follow(rel_path, path, root_real, ())
            yield (followed if isinstance(followed, ScanItem)
                   else ScanItem(rel_path, path, 0, 0, "listed in --files-from but a directory"))
            continue
        parent = _symlinked_parent(root_path, rel_path)
        if parent is not None:
            yield ScanItem(rel_path, path, 0, 0, f"symlink (not followed): {parent}")
            continue
        try:
            info = os.lstat(path)
        except OSError as error:
            yield ScanItem(rel_path, path, 0, 0, LISTED_BUT_MISSING if error.errno == errno.ENOENT
                           else f"listed in --files-from but {(error.strerror or str(error)).lower()}")
            continue
        item = _item(rel_path, path, info)
        yield item if item is not None else ScanItem(rel_path, path, 0, 0, "listed in --files-from but a directory")


class _Done:
    """The producer's last message: the walk ended, normally or with ``error``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def read_ahead(items: Iterable[T], group_size: int, prepare: Callable[[list[T]], G],
               depth: int = 2) -> Generator[G, None, None]:
    """``prepare(group)`` for each group of up to ``group_size`` items, computed in a background thread.

    The walk (and ``prepare``) run while the caller writes the previous group, so a
    journal insert that releases the GIL overlaps the Python-heavy walk. At most
    ``depth`` prepared groups wait in the queue: the producer blocks when the caller
    falls behind, so memory stays bounded by ``(depth + 2) * group_size`` items.
    An exception in the walk is raised here, in the caller's thread. Stopping early
    (break, an exception, close()) stops the producer at its next item.
    """
    if group_size < 1 or depth < 1:
        raise ValueError(f"group_size and depth must be at least 1 (got {group_size}, {depth})")
    handoff: queue.Queue[G | _Done] = queue.Queue(maxsize=depth)
    cancelled = threading.Event()

    def put(message: G | _Done) -> bool:
        while not cancelled.is_set():
            try:
                handoff.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            group: list[T] = []
            for item in items:
                if cancelled.is_set():
                    return
                group.append(item)
                if len(group) >= group_size:
                    if not put(prepare(group)):
                        return
                    group = []
            if group and not put(prepare(group)):
                return
            put(_Done())
        except BaseException as error:  # noqa: BLE001 -- handed to the caller, who re-raises it
            put(_Done(error))

    producer = threading.Thread(target=produce, name="archup-scan", daemon=True)
    producer.start()
    try:
        while True:
            message = handoff.get()
            if isinstance(message, _Done):
                if message.error is not None:
                    raise message.error
                return
            yield message
    finally:
        cancelled.set()
        producer.join()
