"""Which errors opening a scanned file are for good, and which may pass.

A file the scan listed and that cannot be opened for a reason that will not go away by
itself (its permission bits, a security module's refusal, a symlink put in its place) is
skipped by name, as an unreadable directory is: the batch is sealed without it and the run
exits 3, so an hourly job goes on archiving everything else. Any other error (EIO, EAGAIN,
ENOMEM, too many open files, a stale NFS handle, a file that vanished or changed) leaves
the file failed and the batch resumable: the next run reads it again. docs/reliability.md
gives the split and why.
"""

from __future__ import annotations

import errno

from .scan import UNREADABLE_REASONS

# Refusals that only a person changes: mode bits or ACLs (EACCES), a security module,
# an immutable or append-only file, a sealed fd (EPERM), a symlink now at the file's
# place, never followed (ELOOP, from O_NOFOLLOW), a name the kernel will not take.
PERMANENT = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENAMETOOLONG})

REASON = UNREADABLE_REASONS[3]  # "file unreadable"


def permanent_reason(error: BaseException) -> str | None:
    """The skip reason for an open error that will not pass by itself; None: a transient one."""
    if not isinstance(error, OSError) or error.errno not in PERMANENT:
        return None
    if error.errno == errno.ELOOP:
        return f"{REASON}: replaced by a symlink (not followed)"
    return f"{REASON}: {error.strerror or errno.errorcode.get(error.errno or 0, str(error))}"
