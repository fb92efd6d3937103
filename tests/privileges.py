"""Running as root (as CI does) without root's power to read anything, for the permission tests."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys


def drop_read_override() -> None:
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    the exec'd archup obeys permission bits (root's new permitted set is the bounding set)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def can_drop_read_override() -> bool:
    return os.geteuid() != 0 or subprocess.run([sys.executable, "-c", "pass"], preexec_fn=drop_read_override,
                                               capture_output=True, check=False).returncode == 0
