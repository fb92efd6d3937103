"""Logging with secrets scrubbed: credentials and signatures never reach a log line.

Two layers, because botocore's debug output prints whole requests: literal
masking of the credentials this process resolved (access key, secret key,
session token), and patterns for anything shaped like a signature or token.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

from .scan import display_path

REDACTED = "***"

_PATTERNS = (
    re.compile(r"(Credential=)[^/,\s'\"]+"),
    # botocore.auth's own debug line "Signature:\n<hex>" (after its CanonicalRequest and
    # StringToSign dumps), and any other hex signature after "Signature" and a separator.
    re.compile(r"(Signature['\"]?\s*[:=]?\s*(?:b?['\"])?)[0-9a-fA-F]{16,}", re.IGNORECASE),
    # "Signature=" in an Authorization header or a query string, hex or (SigV2) base64.
    re.compile(r"(Signature=)[^'\"&\s,;}]+", re.IGNORECASE),
    re.compile(r"((?:X-Amz-Security-Token|X-Amz-Signature|X-Amz-Credential|AWSAccessKeyId)['\"]?\s*[:=]\s*b?['\"]?)[^'\"&\s,}]+",
               re.IGNORECASE),
    re.compile(r"((?:Authorization)['\"]?\s*[:=]\s*b?['\"])[^'\"]+", re.IGNORECASE),
    re.compile(r"((?:aws_secret_access_key|aws_session_token|SecretAccessKey|SessionToken)['\"]?\s*[:=]\s*['\"]?)"
               r"[^'\"\s,}]+", re.IGNORECASE),
)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secrets(*values: str | None) -> None:
    """Mask these literal values wherever they would appear in a log line."""
    with _secrets_lock:
        _secrets.update(value for value in values if value and len(value) >= 4)


def scrub(text: str) -> str:
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda match: match.group(1) + REDACTED, text)
    return text


def _bodies_dropped(value: Any, depth: int = 0) -> Any:
    """A copy of a request dict without its bodies: botocore's "Making request" line would
    otherwise hold every PutObject's and UploadPart's bytes, as its ``body`` and again in its
    context's parameters (file contents in the log, and a log as big as the files)."""
    if not isinstance(value, dict) or depth > 8:
        return value
    copy: dict[Any, Any] = {}
    for key, item in value.items():
        if isinstance(key, str) and key.lower() == "body" and item:
            try:
                size = f"{len(item)} bytes"
            except TypeError:
                size = "a stream"
            copy[key] = f"<body not logged: {size}>"
        else:
            copy[key] = _bodies_dropped(item, depth + 1)
    return copy


def _escaped(value: object) -> object:
    if isinstance(value, dict):
        return _bodies_dropped(value)
    if isinstance(value, str):
        return display_path(value)
    if isinstance(value, BaseException | os.PathLike):
        return display_path(str(value))
    return value


class ScrubbingFormatter(logging.Formatter):
    """Scrubs the fully formatted line (message, arguments and traceback alike), and escapes the
    control characters of a record's arguments: a file name, key or server message (archup's
    and botocore's log calls pass them as arguments) cannot break its line or drive a terminal.
    The format strings' own newlines stay (botocore's multi-line request dumps)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.args:
            record = logging.makeLogRecord(record.__dict__)  # the other handlers see the original
            if isinstance(record.args, tuple):
                record.args = tuple(_escaped(value) for value in record.args)
            elif isinstance(record.args, dict):
                record.args = _bodies_dropped({key: _escaped(value) for key, value in record.args.items()})
        return scrub(super().format(record))


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record is emitted (not when configured)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # type: ignore[no-untyped-def]
        pass


# Set on a record whose line archup has already printed on stderr itself (an error
# message): the log file gets it, the stderr handler does not print it a second time.
ALREADY_ON_STDERR = "archup_already_on_stderr"


def _not_already_on_stderr(record: logging.LogRecord) -> bool:
    return not getattr(record, ALREADY_ON_STDERR, False)


def configure(verbosity: int, log_file: Path | None) -> None:
    """Stderr: warnings; -v archup's info; -vv archup's debug; -vvv botocore's debug too.

    The log file gets at least archup's info (each file, each error, the outcome)
    without -v: a cron job that names a log file wants it filled.
    """
    stderr_level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    formatter = ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    on_stderr = _StderrHandler()
    on_stderr.setFormatter(formatter)
    on_stderr.setLevel(stderr_level)
    on_stderr.addFilter(_not_already_on_stderr)
    root = logging.getLogger()
    # Installed before the log file is opened: if that fails, the error is reported once, on stderr.
    root.handlers[:] = [on_stderr]
    root.setLevel(logging.WARNING)
    archup_logger = logging.getLogger("archup")
    archup_logger.setLevel(stderr_level)
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 3 else logging.WARNING)
    if log_file is not None:
        fd = open_log_file(log_file)
        to_file = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
        to_file.setFormatter(formatter)
        to_file.setLevel(min(stderr_level, logging.INFO))
        root.addHandler(to_file)
        archup_logger.setLevel(min(stderr_level, logging.INFO))


def open_log_file(path: Path) -> int:
    """Append to the log file, never through a symlink (it would append to the link's target);
    a new one is created exclusively, 0600, so nothing planted meanwhile is taken."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            try:
                return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "it is a symlink; archup does not follow one there: "
                              "give the real path") from None
            raise
    raise OSError(errno.EEXIST, "it keeps appearing and vanishing")


def quiet_stderr() -> None:
    """--quiet: errors only on stderr, whatever -v asked for (the log file keeps its level)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _StderrHandler):
            handler.setLevel(logging.ERROR)


def log_printed_error(message: str) -> None:
    """Log an error line the caller has printed on stderr already: it goes to the log file only."""
    # Before configure() (a usage error in the group's own options) nothing would receive the
    # record but logging's last-resort handler, which would print the line on stderr again.
    if any(isinstance(handler, _StderrHandler) for handler in logging.getLogger().handlers):
        logging.getLogger("archup").error(message, extra={ALREADY_ON_STDERR: True})
