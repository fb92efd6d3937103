"""Rendering upload progress: a rich bar on a terminal, nothing at all for cron."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..scan import display_path
from ..states import FileState


class RichProgress:
    """An UploadObserver that draws one bar of bytes and a count of files."""

    def __init__(self, total_bytes: int, total_files: int) -> None:
        self._progress = Progress(
            TextColumn("{task.fields[files]}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[in_flight]}"),
            console=Console(stderr=True, highlight=False, soft_wrap=True), transient=True)
        self._task = self._progress.add_task("upload", total=total_bytes, files=f"0/{total_files} files",
                                             in_flight="")
        self._in_flight: dict[str, None] = {}
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

    def _flight_text(self) -> str:
        names = [display_path(name) for name in list(self._in_flight)[-3:]]
        more = len(self._in_flight) - len(names)
        return ", ".join(name if len(name) <= 40 else "..." + name[-37:] for name in names) + (
            f" +{more}" if more > 0 else "")

    def on_file_started(self, rel_path: str, size: int) -> None:
        with self._lock:
            self._in_flight[rel_path] = None
            text = self._flight_text()
        self._progress.update(self._task, in_flight=text)

    def on_file_done(self, rel_path: str, state: FileState, size: int, error: str | None) -> None:
        with self._lock:
            self._done += 1
            done = self._done
            self._in_flight.pop(rel_path, None)
            text = self._flight_text()
        self._progress.update(self._task, files=f"{done}/{self._total_files} files", in_flight=text)
        if state is FileState.FAILED:
            self._progress.console.print(f"failed: {display_path(rel_path)}: {display_path(str(error))}",
                                         markup=False)
