"""Safe reading of source files: open only what the scan found, and notice any change.

Every read of a source file opens it through :func:`_open_checked` (``os.open`` of its
path): it never follows a symlink or blocks on a FIFO that replaced the file since the
scan, and a :class:`PathGuard` checks what the kernel actually opened. The read helpers
check the file unchanged (size, mtime, identity) around the read, so a file that
changes, vanishes or cannot be read is never recorded as uploaded (PRODUCT.md,
guarantee 4).

A small file costs :func:`read_whole` two ``fstat`` calls and no ``readlink`` where the
kernel has openat2 (docs/benchmarks.md, "Per-file costs"): the look-up of its path with
no symlink on the way, the open, one ``fstat`` for its type and its size, mtime and
identity as the scan recorded them, the read, and one ``fstat`` after it.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import mimetypes
import os
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from .journal import FileRecord
from .scan import identity_of, inside

MiB = 1024 * 1024


class FileChanged(Exception):
    """The file differs from what the scan recorded (size, mtime) or was short-read."""


class PathEscaped(FileChanged):
    """What was opened is not the file the scan found there: a directory on its path was
    replaced by a symlink, or (following symlinks) one now leads out of the source root."""


@dataclass(frozen=True)
class PathGuard:
    """Where an opened file must turn out to be: ``exact``, the very path asked for (no
    directory on the way swapped for a symlink since the scan); ``within``, inside that
    directory (following symlinks, but never out of the source root)."""

    within: str | None = None
    exact: bool = False
    # With ``exact``: the source root the path lies beneath. Where the kernel has openat2,
    # the path is resolved beneath it with no symlink anywhere on the way, so nothing a
    # swapped directory leads to (a device, a FIFO) is ever opened.
    beneath: str | None = None


def same_identity(recorded: str | None, info: os.stat_result) -> bool:
    """Inode and ctime as recorded (or nothing recorded). The device is left out: it differs
    between the NFS clients of one export, so another host of a shared batch would see every
    file as replaced; an inode and a nanosecond ctime both matching by chance is what it loses."""
    if recorded is None:
        return True
    return recorded.split(":", 1)[-1] == identity_of(info).split(":", 1)[-1]


def same_file(info: os.stat_result, record: FileRecord) -> bool:
    return (info.st_size == record.size and info.st_mtime_ns == record.mtime_ns
            and same_identity(record.identity, info))


def check_unchanged(info: os.stat_result, record: FileRecord) -> None:
    if not same_file(info, record):
        raise FileChanged(f"changed since the scan (size {record.size} -> {info.st_size}, "
                          f"mtime changed: {info.st_mtime_ns != record.mtime_ns}, "
                          f"inode or ctime changed: {not same_identity(record.identity, info)})")


def _opened_path(fd: int) -> str | None:
    """The path the kernel resolved for an open file (Linux: /proc/self/fd); None if unknown."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # one number on every Linux architecture (the unified table, Linux 5.6)
_AT_FDCWD = -100
_RESOLVE_NO_SYMLINKS = 0x04
_openat2_missing = sys.platform != "linux"
_libc: Any = None


# openat2's arguments for a look-up that opens nothing: O_PATH touches no device and no FIFO.
_LOOK_UP = _OpenHow(getattr(os, "O_PATH", 0) | os.O_NOFOLLOW | os.O_CLOEXEC, 0, _RESOLVE_NO_SYMLINKS)
_T = TypeVar("_T")


def _look_up_without_symlinks(path: str) -> int | None:
    """An O_PATH descriptor of what ``path`` resolves to with no symlink on any component
    (openat2, RESOLVE_NO_SYMLINKS); the caller closes it. None where the kernel (or a seccomp
    filter) has no openat2. OSError otherwise."""
    global _openat2_missing, _libc
    if _openat2_missing:
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.byref(_LOOK_UP), ctypes.c_size_t(ctypes.sizeof(_LOOK_UP)))
    if fd < 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EPERM, errno.E2BIG):
            _openat2_missing = True  # an old kernel or a sandbox: today's open() and checks
            return None
        raise OSError(code, os.strerror(code), path)
    return int(fd)


def _resolved_without_symlinks(path: str) -> tuple[int, int] | None:
    """The (device, inode) ``path`` resolves to with no symlink on any component, looked up
    with openat2(O_PATH, RESOLVE_NO_SYMLINKS): O_PATH opens nothing (no device, no FIFO is
    touched). None where the kernel (or a seccomp filter) has no openat2. OSError otherwise."""
    fd = _look_up_without_symlinks(path)
    if fd is None:
        return None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return info.st_dev, info.st_ino


def _refusing_symlinks_on_the_way(look_up: Callable[[str], _T], path: str) -> _T | None:
    """``look_up(path)``, with a symlink on the way (ELOOP) refused as PathEscaped: before
    opening a file of the tree (its root resolved, so any symlink on the way was put there
    since the scan), nothing out there is opened. None if the file itself is a symlink."""
    try:
        return look_up(path)
    except OSError as error:
        if error.errno == errno.ELOOP and not os.path.islink(path):
            # A symlink on the way, not the file itself: a directory was swapped for one.
            raise PathEscaped("a directory on its path was replaced by a symlink (not followed)") from None
        if error.errno == errno.ELOOP:
            return None  # the file itself is a symlink: open() with O_NOFOLLOW says so, as before
        raise


def _check_no_symlink_on_the_way(path: str) -> tuple[int, int] | None:
    """The (device, inode) of ``path`` looked up with no symlink on the way (None: not looked
    up, or the file itself is a symlink); a symlink on the way is PathEscaped."""
    return _refusing_symlinks_on_the_way(_resolved_without_symlinks, path)


def _no_symlink_on_the_way(path: str) -> bool:
    """Whether ``path`` was looked up with no symlink on the way (False: no openat2, or the
    file itself is a symlink); a symlink on the way is PathEscaped. Costs no fstat: the caller
    checks the opened file's identity against the scan's instead."""
    fd = _refusing_symlinks_on_the_way(_look_up_without_symlinks, path)
    if fd is None:
        return False
    os.close(fd)
    return True


def _open_checked(path: str, guard: PathGuard | None, record: FileRecord | None = None) -> int:
    """A descriptor of the regular file at ``path``, opened without following a symlink or
    blocking on a FIFO that replaced the file since the scan (anything but a regular file is
    refused), the guard checked against what the kernel opened. With a
    ``record``, the file is also checked unchanged since the scan (size, mtime, identity)."""
    expected = None
    looked_up = False
    if guard is not None and guard.exact and guard.beneath and inside(guard.beneath, path):
        if record is not None and record.identity is not None:
            # The opened file's inode is checked against the scan's below (check_unchanged): it
            # is then the file a walk without symlinks found, as the look-up's inode would say.
            looked_up = _no_symlink_on_the_way(path)
        else:
            expected = _check_no_symlink_on_the_way(path)
            looked_up = expected is not None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if expected is not None and (info.st_dev, info.st_ino) != expected:
            raise PathEscaped("a directory on its path was replaced by a symlink (not followed)")  # swapped meanwhile
        # What the kernel says it opened: needed where no look-up refused symlinks on the way
        # (no openat2; following symlinks, where it must still lie inside the root).
        opened = _opened_path(fd) if guard is not None and not looked_up else None
        if guard is not None and opened is not None:
            if guard.exact and opened != path:
                raise PathEscaped("a directory on its path was replaced by a symlink (not followed)")
            if guard.within and not inside(guard.within, opened):
                raise PathEscaped("a symlink on its path now leads out of the source root (not followed)")
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "replaced by a directory", path)
        if not stat.S_ISREG(info.st_mode):
            raise FileChanged("no longer a regular file (replaced by a fifo, socket or device)")
        if record is not None:
            check_unchanged(info, record)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str, guard: PathGuard | None = None) -> io.BufferedReader:
    """Open for reading without following a symlink or blocking on a FIFO that replaced the
    file since the scan; anything but a regular file is refused. Then the guard is checked
    against what the kernel says it opened."""
    fd = _open_checked(path, guard)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd``: fewer only at its end."""
    body = os.read(fd, limit)
    if not body or len(body) == limit:
        return body
    pieces = [body]
    got = len(body)
    while got < limit:
        more = os.read(fd, limit - got)  # b"" at the end (the common case: one call)
        if not more:
            break
        pieces.append(more)
        got += len(more)
    return body if len(pieces) == 1 else b"".join(pieces)


def read_whole(path: str, record: FileRecord, guard: PathGuard | None = None) -> bytes:
    """The whole file, checked unchanged around the read (a single-request object's body)."""
    held = read_held(path, record, guard)
    held.close()
    return held.body


# Where another reader in this process (the CRT) may open a descriptor's file again: the
# kernel's link to the open file itself, not a path that could be swapped meanwhile.
_FD_PATHS = os.path.isdir("/proc/self/fd")


class HeldRead:
    """A small file read whole (as :func:`read_whole`) and kept open until :meth:`close`:
    the CRT may send it by reading the very file again through :attr:`fd_path`, and
    :meth:`unchanged` says afterwards whether the file is still the one that was read."""

    __slots__ = ("body", "fd", "_record")

    def __init__(self, body: bytes, fd: int, record: FileRecord) -> None:
        self.body = body
        self.fd = fd
        self._record = record

    @property
    def fd_path(self) -> str | None:
        """A path that opens this very file (Linux), or None where there is none."""
        return f"/proc/self/fd/{self.fd}" if _FD_PATHS and self.fd >= 0 else None

    def unchanged(self) -> bool:
        """Size, mtime and identity still those read (a third fstat)."""
        try:
            check_unchanged(os.fstat(self.fd), self._record)
        except (OSError, FileChanged):
            return False
        return True

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def read_held(path: str, record: FileRecord, guard: PathGuard | None = None) -> HeldRead:
    """The whole file, checked unchanged around the read, and kept open (:class:`HeldRead`)."""
    fd = _open_checked(path, guard, record)  # checked unchanged before the read
    try:
        body = _read_at_most(fd, record.size + 1)  # one byte more: a file that grew says so
        if len(body) != record.size:
            raise FileChanged(f"read {len(body)} bytes, expected {record.size}")
        # The size read proves no growth or truncation; a rewrite in place during the read
        # keeps the size and moves only mtime and ctime, which only a second fstat sees.
        check_unchanged(os.fstat(fd), record)
    except BaseException:
        os.close(fd)
        raise
    return HeldRead(body, fd, record)


def hash_handle(handle: IO[bytes], record: FileRecord, stop: threading.Event | None = None,
                chunk: int = MiB) -> str | None:
    """SHA-256 of an open file from its start, checked unchanged around the read; leaves the
    file positioned at its start again. None if ``stop`` was set meanwhile (checked each
    chunk, so a signal never waits for a whole large file to be read)."""
    hasher = hashlib.sha256()
    handle.seek(0)
    check_unchanged(os.fstat(handle.fileno()), record)
    for block in iter(lambda: handle.read(chunk), b""):
        if stop is not None and stop.is_set():
            return None
        hasher.update(block)
    check_unchanged(os.fstat(handle.fileno()), record)
    handle.seek(0)
    return hasher.hexdigest()


def hash_file(path: str, record: FileRecord, guard: PathGuard | None = None) -> str:
    with open_regular(path, guard) as handle:
        digest = hash_handle(handle, record)
        assert digest is not None  # no stop event, never None
        return digest


def describe_read_error(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "vanished: no such file"
    if isinstance(error, IsADirectoryError):
        return "vanished: replaced by a directory"
    if isinstance(error, PermissionError):
        return "unreadable: permission denied"
    if isinstance(error, OSError) and error.errno == errno.ELOOP:
        return "replaced by a symlink (not followed)"
    if isinstance(error, OSError):
        return f"unreadable: {error.strerror or error}"
    return str(error)


def content_type(rel_path: str) -> str:
    return mimetypes.guess_type(rel_path)[0] or "application/octet-stream"


class SourceTree:
    """The batch's source directory as the engine reads it: where a recorded file is, the
    guard every open is checked against, and its current state on disk."""

    def __init__(self, source_root: str, follow_symlinks: bool) -> None:
        self.root = os.path.realpath(source_root)
        self.follow_symlinks = follow_symlinks
        self.guard = (PathGuard(within=self.root) if follow_symlinks
                      else PathGuard(exact=True, beneath=self.root))

    def path(self, record: FileRecord) -> str:
        path = os.path.join(self.root, record.rel_path)
        # Following symlinks, the file is opened where its links lead (checked inside the root).
        return os.path.realpath(path) if self.follow_symlinks else path

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path) if self.follow_symlinks else os.lstat(path)

    def open(self, path: str) -> io.BufferedReader:
        return open_regular(path, self.guard)

    def read_whole(self, path: str, record: FileRecord) -> bytes:
        return read_whole(path, record, self.guard)

    def read_held(self, path: str, record: FileRecord) -> HeldRead:
        return read_held(path, record, self.guard)

    def hash_file(self, record: FileRecord) -> str:
        return hash_file(self.path(record), record, self.guard)
