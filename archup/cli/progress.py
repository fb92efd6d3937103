"""Rendering upload progress: a rich bar on a terminal, nothing at all for cron.

One live area at a time: while it is drawn, every note goes through :func:`say` (printed
above the bar, never through it), and a forced exit clears it first (:func:`clear`), so
the terminal keeps lines of its own and no frame of the bar. Units are the summary's:
IEC sizes and rates, durations as ``2m 14s`` (:mod:`archup.cli.human`)."""

from __future__ import annotations

import os
import sys
import threading

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

from ..scan import display_path
from ..states import FileState
from . import human

_live: RichProgress | None = None  # the one drawn now, if any
_live_lock = threading.Lock()
# A note and the live area's end never interleave: a note printed while the area is being
# taken off the screen was erased with it (the 'stopping' line, printed by a thread of its own,
# lost under load). Reentrant: a second signal's handler clears in the thread it interrupted.
_print_lock = threading.RLock()


def _console() -> Console:
    # stderr as it is now: while the bar is live, rich puts a proxy in sys.stderr that prints
    # through this console, and a console writing to that proxy would print each note twice.
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def say(line: str) -> None:
    """A note on a line of its own: above the live area while one is drawn."""
    with _print_lock:
        live = _live
        if live is not None and not live.stopped:
            live.console.print(line, markup=False, highlight=False)
        else:
            sys.stderr.write(line + "\n")  # one write: the line and its end together
            sys.stderr.flush()


def clear() -> None:
    """Take the live area off the screen (before an exit that will not unwind), and put
    the cursor at the start of an empty line, over any '^C' the terminal echoed there."""
    global _live
    with _print_lock:  # not in the middle of a note
        with _live_lock:
            live, _live = _live, None
        if live is not None:
            live.stop()
        if sys.stderr.isatty():
            os.write(2, b"\r\x1b[K")


class RateColumn(ProgressColumn):
    """Bytes per second in IEC units (``84.2 MiB/s``), as the summary's rate."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text("?" if speed is None else human.rate(speed), style="progress.data.speed")


class RemainingColumn(ProgressColumn):
    """Time left in the summary's style (``2m 14s``)."""

    max_refresh = 0.5

    def render(self, task: Task) -> Text:
        left = task.time_remaining
        return Text("-" if left is None else human.duration(left), style="progress.remaining")


class RichProgress:
    """An UploadObserver that draws one bar of bytes and a count of files. A failed file is
    named once, above the bar, and added to ``named`` (the end of the run leaves it out)."""

    def __init__(self, total_bytes: int, total_files: int, named: set[str] | None = None) -> None:
        self.console = _console()
        self._progress = Progress(
            TextColumn("{task.fields[files]}"), BarColumn(), DownloadColumn(binary_units=True),
            RateColumn(), RemainingColumn(), TextColumn("{task.fields[in_flight]}"),
            console=self.console, transient=True)
        self._task = self._progress.add_task("upload", total=total_bytes, files=f"0/{total_files} files",
                                             in_flight="")
        self._in_flight: dict[str, None] = {}
        self._total_files = total_files
        self._done = 0
        self._lock = threading.Lock()
        self.named = named if named is not None else set()
        self._stopped = False

    def __enter__(self) -> RichProgress:
        global _live
        self._progress.start()
        with _live_lock:
            _live = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _live
        with _live_lock:
            if _live is self:
                _live = None
        self.stop()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        with _print_lock:
            with self._lock:
                if self._stopped:
                    return  # cleared once
                self._stopped = True
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
            first = state is FileState.FAILED and rel_path not in self.named
            if first:
                self.named.add(rel_path)
        self._progress.update(self._task, files=f"{done}/{self._total_files} files", in_flight=text)
        if first:
            self.console.print(f"failed: {display_path(rel_path)}: {display_path(str(error))}", markup=False,
                               highlight=False)


class RestoreProgress(RichProgress):
    """A RestoreObserver on the same live area: files and bytes done, of the batch's totals
    once they are known (``?`` while a selection hides them)."""

    def __init__(self) -> None:
        super().__init__(total_bytes=0, total_files=0)
        self._progress.update(self._task, total=None, files="0/? files")
        self._of = "?"

    def on_totals(self, files: int, size: int) -> None:
        with self._lock:
            self._of = str(files)
            self._total_files = files
        self._progress.update(self._task, total=size, files=f"0/{files} files")

    def on_file_done(self, rel_path: str, ok: bool, size: int, error: str | None) -> None:  # type: ignore[override]
        super().on_file_done(rel_path, FileState.UPLOADED if ok else FileState.FAILED, size, error)
        if self._of == "?":
            self._progress.update(self._task, files=f"{self._done}/? files")
