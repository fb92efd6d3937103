"""What a person at a terminal sees: the progress display on Ctrl-C (one live area, cleared once,
messages on lines of their own), a failure named once, and one system of units (IEC sizes and
rates, durations as ``2m 14s``) in the bar and the dry run.

The Ctrl-C cases run archup in a pseudo-terminal that is its controlling terminal, and type
Ctrl-C into it as a person does (the terminal echoes ``^C`` and signals the process group);
what the screen finally shows is worked out by a small model of the control codes rich writes."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli
from tcpproxy import TcpProxy

FILES = 8
SIZE = 128 * 1024


def _screen(data: str) -> list[str]:
    """The lines left on a terminal after ``data``: text, CR, LF, cursor up/down, erase line."""
    lines, row, col, index = [""], 0, 0, 0
    while index < len(data):
        match = re.match(r"\x1b\[([0-9;?]*)([A-Za-z])", data[index:])
        if match:
            arg, code = match.groups()
            count = int(arg) if arg.isdigit() else 1
            if code == "A":
                row = max(0, row - count)
            elif code == "B":
                row += count
            elif code == "K":
                lines[row] = "" if arg == "2" else lines[row][:col]
            elif code == "G":
                col = count - 1
            index += len(match.group(0))
            lines.extend([""] * (row + 1 - len(lines)))
            continue
        char = data[index]
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
            lines.extend([""] * (row + 1 - len(lines)))
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + char + line[col + 1:]
            col += 1
        index += 1
    return [line.rstrip() for line in lines]


def _controlling_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _interrupt_in_a_terminal(args: list[str], presses: int, proxy: TcpProxy) -> tuple[int, str]:
    """Run in a pty; once the bar names a file, type Ctrl-C ``presses`` times (the second once the
    'stopping' line is out); everything written, and the exit code.

    With two presses, the connection to the server (``proxy``) is cut before the first: the
    requests in flight then never finish, so the second press always finds the run still
    waiting for them (on a loaded machine they could otherwise all be done, and the run
    ended, before it lands)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                            preexec_fn=_controlling_terminal)
    os.close(slave)
    output, pressed = b"", 0
    deadline = time.monotonic() + 120
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no output: {output[-2000:]!r}"
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            # The first press once the bar names a file in flight: the run has work to finish.
            if pressed == 0 and re.search(rb"\d/\d+ files", output) and b"file-" in output:
                if presses > 1:
                    proxy.cut()
                os.write(master, b"\x03")
                pressed = 1
            elif pressed == 1 and presses > 1 and b"archup: stopping" in output:
                os.write(master, b"\x03")
                pressed = 2
    finally:
        os.close(master)
    return proc.wait(timeout=30), output.decode("utf-8", "replace")


def _slow_upload(cli: Cli, tmp_path: Path, endpoint: str) -> list[str]:
    source = tmp_path / "src"
    source.mkdir()
    for index in range(FILES):
        (source / f"file-{index}.bin").write_bytes(os.urandom(SIZE))
    return [sys.executable, "-m", "archup", "upload", "--journal", str(cli.journal), "--bucket", cli.bucket,
            "--endpoint-url", endpoint, "--parallel", "2", "--bwlimit", "128KiB", str(source)]


def _bar_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r"\d+/\d+ files", line)]


@pytest.mark.parametrize("presses", [1, 2], ids=["one-ctrl-c", "two-ctrl-c"])
def test_ctrl_c_clears_the_live_area_once_and_messages_stand_on_their_own_lines(cli: Cli, tmp_path: Path,
                                                                                 presses: int) -> None:
    address = urllib.parse.urlsplit(cli.endpoint)
    with TcpProxy(address.hostname or "127.0.0.1", address.port or 80) as proxy:
        args = _slow_upload(cli, tmp_path, f"http://127.0.0.1:{proxy.port}")
        code, output = _interrupt_in_a_terminal(args, presses, proxy)
    assert code == 130, output
    lines = _screen(output)
    # On failure: the screen, then what was written (pytest shortens a list, not a string).
    shown = "\n".join(lines) + "\n--- written:\n" + repr(output)
    assert _bar_lines(lines) == [], shown  # the live area is gone, and no second one was drawn
    stopping = [line for line in lines if "archup: stopping" in line]
    assert len(stopping) == 1 and stopping[0].startswith("archup: stopping"), shown
    ends = [line for line in lines if "archup: error:" in line]
    assert len(ends) == 1 and ends[0].startswith("archup: error:"), shown  # never after a '^C' or a bar
    if presses == 2:
        assert "second signal" in ends[0], shown
    assert not any("^C" in line and "archup" in line for line in lines), shown


class _SlowTerminal:
    """stderr on a terminal slow to take a line: each write waits for ``release`` (bounded)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.writing = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        assert self.release.wait(30), "the test never let the write through"
        written = self.real.write(text)
        self.real.flush()
        return int(written)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return False


class _Exited(Exception):
    """os._exit, as the tests below take it: the caller goes no further, and the process stays."""


@pytest.fixture
def no_exit(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Stopping's forced exits, recorded and raised as _Exited instead of taken; the note lock
    is this test's own (a forced exit never releases it)."""
    from archup.cli import upload

    exits: list[int] = []

    def exit_now(code: int) -> None:
        exits.append(code)
        raise _Exited

    monkeypatch.setattr(upload.os, "_exit", exit_now)
    monkeypatch.setattr(upload, "_NOTE_LOCK", threading.RLock())
    monkeypatch.setattr(upload, "_live_display", lambda: None)
    return exits


def _waits_for_the_note(monkeypatch: pytest.MonkeyPatch, then: Callable[[Any], None], why: str) -> None:
    """A first signal's 'stopping' note is being written to a slow terminal: ``then(stopping)``,
    run in a thread, must wait until the note is written whole, and end after it."""
    from archup.cli.common import Invocation
    from archup.cli.upload import Stopping

    terminal = _SlowTerminal(sys.stderr)
    monkeypatch.setattr(sys, "stderr", terminal)
    stopping = Stopping(30.0, run_state=Invocation())
    stopping.handler(signal.SIGINT, None)
    try:
        assert terminal.writing.wait(30)  # the note is being written
        waiting = threading.Thread(target=then, args=(stopping,))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive(), why
        terminal.release.set()
        waiting.join(30)
        assert not waiting.is_alive()
    finally:
        terminal.release.set()
        stopping.cancel()


def test_a_second_signal_lets_the_stopping_note_finish_before_its_own_line(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], no_exit: list[int]) -> None:
    """Seen on CI: the second Ctrl-C came while the 'stopping' note was being written; the
    forced exit erased the half-written line ('\\r' and erase) and the note was gone."""

    def second_signal(stopping: Any) -> None:
        with pytest.raises(_Exited):
            stopping.handler(signal.SIGINT, None)

    _waits_for_the_note(monkeypatch, second_signal, "the forced exit did not wait for the note being written")
    assert no_exit == [130]
    err = capfd.readouterr().err
    assert err.index("archup: stopping:") < err.index("archup: error: second signal"), err
    assert "archup: stopping: finishing the requests in flight" in err.splitlines()[0], err


def test_a_run_ends_only_once_its_stopping_note_is_out(monkeypatch: pytest.MonkeyPatch,
                                                       capfd: pytest.CaptureFixture[str],
                                                       no_exit: list[int]) -> None:
    """The note's thread is a daemon: the run's end waits for it (settle), or the note could
    come after the run's last line, or be cut off by the exit."""
    _waits_for_the_note(monkeypatch, lambda stopping: stopping.settle(),
                        "the run ended while its stopping note was still being written")
    assert "archup: stopping: finishing the requests in flight" in capfd.readouterr().err
    assert no_exit == []


def test_a_signal_while_the_last_line_is_written_adds_no_second_line(capfd: pytest.CaptureFixture[str],
                                                                      no_exit: list[int]) -> None:
    from archup.cli.common import Invocation
    from archup.cli.upload import Stopping

    run = Invocation()
    stopping = Stopping(30.0, run_state=run)
    stopping.handler(signal.SIGINT, None)
    stopping.settle()
    assert run.signalled
    run.last_error = "batch B interrupted; resume with 'archup resume B'"  # report_error's first step
    stopping.handler(signal.SIGINT, None)
    assert no_exit == []
    assert "archup: error:" not in capfd.readouterr().err


@pytest.mark.parametrize("signalled", [True, False], ids=["signalled", "not-signalled"])
def test_once_a_signalled_run_has_ended_signals_are_ignored_to_the_exit(monkeypatch: pytest.MonkeyPatch,
                                                                        signalled: bool) -> None:
    """The interpreter puts the default action back as it shuts down: a Ctrl-C then ended the
    process by SIGINT (-2 to its parent) instead of with exit 130; seen on CI."""
    import archup.cli as cli_module

    def command(*, obj: Any, **_: Any) -> int:
        obj.signalled = signalled
        return 130 if signalled else 0

    monkeypatch.setattr(cli_module, "app", command)
    monkeypatch.setattr(sys, "argv", ["archup", "upload"])
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as ended:
            cli_module.main()
        after = {signum: signal.getsignal(signum) for signum in before}
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert ended.value.code == (130 if signalled else 0)
    if signalled:
        assert set(after.values()) == {signal.SIG_IGN}, after
    else:
        assert after == before


def test_a_failed_file_is_named_once_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The live display and the end of the run each used to print 'failed: X'."""
    from rich.console import Console

    from archup.cli import progress as progress_module
    from archup.cli.upload import Stopping, Talk, render
    from archup.errors import BatchIncomplete
    from archup.outcomes import UploadResult
    from archup.run import RunOutcome
    from archup.states import FileState

    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(stderr, "isatty", lambda: True)
    monkeypatch.setattr(progress_module, "_console",
                        lambda: Console(file=stderr, force_terminal=True, width=120, highlight=False))
    talk = Talk(True, Stopping(30.0, run_state=object()))  # type: ignore[arg-type]
    with talk.progress(2, 200) as observer:
        assert observer is not None
        observer.on_file_started("bad.bin", 100)
        observer.on_file_done("bad.bin", FileState.FAILED, 100, "unreadable: Input/output error")
        observer.on_file_started("good.bin", 100)
        observer.on_file_done("good.bin", FileState.UPLOADED, 100, None)
    result = UploadResult("B", files_uploaded=1, files_failed=1,
                          failures=[("bad.bin", "unreadable: Input/output error")])
    outcome = RunOutcome("B", "archup resume B", result, kind="partial", report={"batch_id": "B"},
                         failures=result.failures, error=BatchIncomplete("batch B: 1 file(s) failed"))
    monkeypatch.setattr("archup.cli.upload.invocation", lambda: _Anything())
    with pytest.raises(BatchIncomplete):
        render(outcome, quiet=False, json_output=False, named=talk.named)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stderr.getvalue())
    assert plain.count("failed: bad.bin: unreadable: Input/output error") == 1, plain


class _Anything:
    def __setattr__(self, name: str, value: Any) -> None:
        pass


def test_the_bar_shows_iec_rates_and_durations_like_the_summary() -> None:
    from types import SimpleNamespace

    from archup.cli.progress import RateColumn, RemainingColumn

    unknown = SimpleNamespace(speed=None, time_remaining=None, finished=False)
    assert str(RateColumn().render(unknown)) == "?"  # type: ignore[arg-type]
    assert str(RemainingColumn().render(unknown)) == "-"  # type: ignore[arg-type]
    running = SimpleNamespace(speed=84.2e6, time_remaining=134.0, finished=False)
    assert str(RateColumn().render(running)) == "80.3 MiB/s"  # type: ignore[arg-type]
    assert str(RemainingColumn().render(running)) == "2m 14s"  # type: ignore[arg-type]


def test_the_dry_run_counts_bytes_in_the_summary_units(cli: Cli, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_bytes(b"x" * 20)
    (source / "b.bin").write_bytes(b"y" * 3 * 1024 * 1024)
    result = cli("upload", "--dry-run", str(source))
    assert result.exit_code == 0, result.stderr
    assert " bytes," not in result.stdout, result.stdout
    assert "would upload 2 files, 3.00 MiB, from" in result.stdout, result.stdout
