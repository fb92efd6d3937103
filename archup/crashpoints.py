"""Named crash points for the crash-test harness.

``ARCHUP_CRASH_AT=after-upload-part`` makes the process SIGKILL itself the first
time it reaches that point; ``ARCHUP_CRASH_AT=after-upload-part:3`` the third
time. Unset (always, outside tests), a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = (
    "after-create-multipart",   # the upload exists on the server, not yet in the journal
    "after-record-upload-id",   # the upload id is in the journal, no part sent
    "after-upload-part",        # a part is stored on the server, not yet in the journal
    "after-complete-multipart", # the object exists, the journal still says uploading
    "before-put-object",        # a single-PUT file is about to be sent
    "during-put-object",        # a file's PutObject is signed and on its way, the server has not got it all
    "after-put-object",         # the object exists, the journal still says pending
    "after-manifest-entries",   # finalize wrote manifest.jsonl and manifest-skipped.jsonl, not the summary
    "after-manifest-summary",   # finalize wrote manifest.json, the journal says finalizing
)
PACK_POINTS = (
    "before-put-shard",          # a shard's members are read and laid out, its PutObject not sent
    "after-put-shard",           # the shard exists, the journal still says uploading
    "after-create-shard-upload", # a large shard's upload id is in the journal, no part sent
    "after-upload-shard-part",   # a shard's part is stored on the server, not yet in the journal
    "after-complete-shard",      # a large shard exists, the journal still says uploading
)
RESTORE_POINTS = (
    "restore-range-written",    # one range of a large file is in its temporary file
    "restore-before-rename",    # a file's bytes are checked, its temporary file not yet renamed
    "restore-after-rename",     # a file is in place, the run goes on
)

_lock = threading.Lock()
_seen: dict[str, int] = {}


def _armed() -> tuple[str, int] | None:
    spec = os.environ.get("ARCHUP_CRASH_AT")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count or 1)


_ARMED = _armed()


def crash_point(name: str) -> None:
    if _ARMED is None or _ARMED[0] != name:
        return
    with _lock:
        _seen[name] = _seen.get(name, 0) + 1
        if _seen[name] >= _ARMED[1]:
            os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    """Whether this process will crash at ``name`` (hooks that cost something are set only then)."""
    return _ARMED is not None and _ARMED[0] == name
