"""Logging with secrets scrubbed: credentials and signatures never reach a log line.

Two layers, because botocore's debug output prints whole requests: literal
masking of the credentials this process resolved (access key, secret key,
session token), and patterns for anything shaped like a signature or token.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path

REDACTED = "***"

_PATTERNS = (
    re.compile(r"(Credential=)[^/,\s'\"]+"),
    re.compile(r"(Signature=)[0-9a-fA-F]+"),
    re.compile(r"((?:X-Amz-Security-Token|X-Amz-Signature|X-Amz-Credential)['\"]?\s*[:=]\s*b?['\"]?)[^'\"&\s,}]+",
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


class ScrubbingFormatter(logging.Formatter):
    """Scrubs the fully formatted line (message, arguments and traceback alike)."""

    def format(self, record: logging.LogRecord) -> str:
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


def configure(verbosity: int, log_file: Path | None) -> None:
    """-v: archup's info; -vv: archup's debug; -vvv: botocore's debug too. Warnings always."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    formatter = ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [_StderrHandler()]
    if log_file is not None:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        handlers.append(logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8")))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(level)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(logging.WARNING)
    logging.getLogger("archup").setLevel(level)
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 3 else logging.WARNING)
