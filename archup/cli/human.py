"""Numbers as a person reads them on a terminal (``51.7 MiB``, ``2m 14s``); JSON and cron keep them raw."""

from __future__ import annotations

from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

# Summary fields whose name does not say what they are.
_LABELS = {"total_bytes": "size", "bytes_sent": "sent", "bytes_per_s": "rate", "elapsed_s": "elapsed",
           "batch_id": "batch", "manifest_key": "manifest", "files_unreadable": "files unreadable"}


def size(count: int | float) -> str:
    """Binary units, three significant figures: 0 B, 1023 B, 1.0 KiB, 51.7 MiB, 2.00 GiB."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}" if value >= 100 else f"{value:.2f} {unit}" if value < 10 \
                else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """0.4s, 12s, 2m 14s, 3h 05m, 2d 4h."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def rate(bytes_per_second: float) -> str:
    return f"{size(bytes_per_second)}/s"


def count(number: int, noun: str, plural: str | None = None) -> str:
    """``1 file``, ``2 files``, ``0 files``."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def label(name: str) -> str:
    """A summary field's name in words."""
    return _LABELS.get(name, name.replace("_", " "))


def state(name: str) -> str:
    """A batch's state for a person: ``enqueued`` is the seal (the JSON keeps the bare value)."""
    return f"{name} (sealed)" if name == "enqueued" else name


def value(name: str, raw: Any) -> Any:
    """A summary field's value for a person: sizes, rates and durations in units."""
    if name == "status" and isinstance(raw, str):
        return state(raw)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return raw
    if name == "bytes_per_s":
        return rate(raw)
    if name.endswith("_s"):
        return duration(raw)
    if "bytes" in name:
        return size(raw)
    return raw
