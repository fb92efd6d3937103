"""One owner per batch: an OS-level lock that dies with its process.

``flock`` on ``<journal dir>/locks/<BATCH>.lock``. The kernel releases it when
the owning process exits for any reason, ``kill -9`` included, so it can never
go stale and nothing has to guess whether a PID is still alive. The file's
contents (host, pid, since) only name the holder in the error message.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
from pathlib import Path
from types import TracebackType

from .clock import isoformat, utcnow
from .errors import BatchBusy, JournalError, UnsafeJournalPath
from .locations import check_private


class BatchLock:
    def __init__(self, journal_path: Path, batch_id: str, *, label: str | None = None) -> None:
        self.batch_id = batch_id
        self.label = label or f"batch {batch_id}"
        self.path = journal_path.parent / "locks" / f"{batch_id}.lock"
        self._fd: int | None = None

    def acquire(self) -> BatchLock:
        # The journal's directory and locks/ must be this user's alone: lock names are
        # predictable, and a symlink planted there would have this process overwrite its target.
        check_private(self.path.parent.parent, "journal directory")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise JournalError(f"cannot create lock file {self.path}: {error.strerror or error}") from None
        check_private(self.path.parent, "lock directory")
        fd = _open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise BatchBusy(f"{self.label} is busy: another archup owns it ({holder}); "
                            "wait for it to finish, or stop that process") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": isoformat(utcnow())}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # Closing the descriptor releases the lock. The file stays: unlinking it
            # would let a waiter lock an orphaned inode while a newcomer locks a new one.
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> BatchLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def _open_lock_file(path: Path) -> int:
    """Open the lock file, never through a symlink: an existing one as it is, a new one
    created exclusively (O_EXCL), so nothing planted between the two steps is taken."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue  # another archup created it first: open theirs
            except OSError as error:
                raise JournalError(f"cannot create lock file {path}: {error.strerror or error}") from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UnsafeJournalPath(f"lock file {path} is a symlink; archup does not follow one there: "
                                        "remove it") from None
            raise JournalError(f"cannot open lock file {path}: {error.strerror or error}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            os.close(fd)
            raise UnsafeJournalPath(f"lock file {path} is not a regular file of this user's "
                                    f"(uid {info.st_uid}); remove it")
        return fd
    raise JournalError(f"cannot create lock file {path}: it keeps appearing and vanishing")


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def source_lock(journal_path: Path, source_root: str, bucket: str, prefix: str,
                endpoint_url: str | None) -> BatchLock:
    """Held by a plain ``upload`` while it picks (or creates) and runs its batch, so two
    overlapping cron runs of one job cannot both start a new batch: the second exits busy."""
    digest = hashlib.sha256(json.dumps([source_root, bucket, prefix, endpoint_url]).encode()).hexdigest()[:24]
    return BatchLock(journal_path, f"source-{digest}", label=f"upload of {source_root} to s3://{bucket}/{prefix}")
