"""Deterministic file contents for the tests."""

from __future__ import annotations

import hashlib

MiB = 1024 * 1024


def pattern_bytes(size: int, seed: int) -> bytes:
    """Deterministic bytes that differ from MiB to MiB (a swapped or repeated part changes the content)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += counter.to_bytes(8, "big") + block[: MiB - 8]
        counter += 1
    return bytes(out[:size])
