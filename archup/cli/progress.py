"""Rendering upload progress: a rich bar on a terminal, nothing at all for cron."""

from __future__ import annotations

import threading

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..scan import display_path
from ..states import FileState
from .common import stderr


class RichProgress:
    """An UploadObserver that draws one bar of bytes and a count of files."""

    def __init__(self, total_bytes: int, total_files: int) -> None:
        self._progress = Progress(
            TextColumn("{task.fields[files]}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=stderr, transient=True)
        self._task = self._progress.add_task("upload", total=total_bytes, files=f"0/{total_files} files")
        self._total_files = total_files
        self._done = 0
        self._lock = threading.Lock()

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def on_bytes(self, count: int) -> None:
        self._progress.advance(self._task, count)

    def on_file_done(self, rel_path: str, state: FileState, size: int, error: str | None) -> None:
        with self._lock:
            self._done += 1
            done = self._done
        self._progress.update(self._task, files=f"{done}/{self._total_files} files")
        if state is FileState.FAILED:
            self._progress.console.print(f"failed: {display_path(rel_path)}: {error}", markup=False)
