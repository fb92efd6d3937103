"""Which files of the source a batch takes: --include, --exclude, --files-from.

Glob rules (documented in the README): ``*`` and ``?`` never cross a ``/``;
``**`` does. A pattern without a ``/`` matches a file's name in any directory;
a pattern with one matches the path relative to the source root (a leading
``/`` anchors it there explicitly). A pattern ending in ``/`` names a directory
and matches everything under it (``cache/`` is ``**/cache/**``). A file is taken
if it matches some --include (or none is given) and no --exclude.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .errors import UsageError


def compile_glob(pattern: str) -> re.Pattern[str]:
    anchored = "/" in pattern.rstrip("/")
    body = pattern.lstrip("/")
    if body.endswith("/"):
        body += "**"  # a directory: everything under it
    out: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if body.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = body.find("]", index + 2)
            if end == -1:
                out.append(re.escape(char))
            else:
                inner = body[index + 1:end]
                if inner.startswith("!"):
                    inner = "^" + inner[1:]
                out.append(f"[{inner}]")
                index = end
        else:
            out.append(re.escape(char))
        index += 1
    prefix = "" if anchored else "(?:.*/)?"
    try:
        return re.compile(f"^{prefix}{''.join(out)}$", re.DOTALL)
    except re.error as error:
        raise UsageError(f"bad glob {pattern!r}: {error}") from None


class Selector:
    def __init__(self, includes: Iterable[str] = (), excludes: Iterable[str] = ()) -> None:
        self.includes = [compile_glob(pattern) for pattern in includes]
        self.excludes = [compile_glob(pattern) for pattern in excludes]
        # Only a pattern that names a whole directory can exclude one: 'cache/', 'cache/**', '**'.
        self._dir_excludes = [compile_glob(pattern) for pattern in excludes
                              if pattern.endswith("/") or pattern.endswith("/**") or pattern.strip("/") == "**"]

    @property
    def active(self) -> bool:
        return bool(self.includes or self.excludes)

    def __call__(self, rel_path: str) -> bool:
        if self.includes and not any(p.match(rel_path) for p in self.includes):
            return False
        return not any(p.match(rel_path) for p in self.excludes)

    def excludes_dir(self, rel_dir: str) -> bool:
        """Whether some --exclude takes every path under the directory, whatever its names: one
        of the forms ``cache/``, ``cache/**``, ``**``, probed with NUL names (which no file can
        have); a pattern such as ``cache/[!.]**`` keeps ``cache/.keep`` and so never does."""
        deep = (f"{rel_dir}/\0", f"{rel_dir}/\0/\0")
        return any(all(p.match(path) for path in deep) for p in self._dir_excludes)


def read_files_from(path: Path) -> list[str]:
    """Relative paths, one a line; blank lines and lines starting with '#' are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--files-from {path}: {getattr(error, 'strerror', None) or error}") from None
    paths = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("/") or ".." in entry.split("/"):
            raise UsageError(f"--files-from {path}: {entry!r} must be relative to the source, without '..'")
        # One file, one key: 'a/./b', 'a//b' and './a/b' all name 'a/b'.
        canonical = "/".join(part for part in entry.split("/") if part not in ("", "."))
        if canonical:
            paths.append(canonical)
    return paths
