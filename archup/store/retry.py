"""One retry policy for every request archup sends, on either transport (restic's retry
backend: the rules in one place, the transports only say what a failure was).

- **Attempts**: ``--retries`` + 1 in all, the first included.
- **Which failures another attempt may cure**: a 5xx, a 429 or a throttling code
  (SlowDown, ...), a request timeout, a connection that broke or stalled: back off, then
  send again. A body that arrived changed (BadDigest: its checksum did not match): send
  it again at once; the server is not asking anyone to wait. Anything in
  :data:`archup.store.answers.FATAL_CODES` (denied, no such bucket, a clock too far from
  the server's: RequestTimeTooSkewed) is never sent again: no attempt can succeed.
- **Backoff**: botocore's standard mode, "full jitter": a random wait of up to
  ``min(20 s, 2 ** (attempt - 1))`` seconds.

botocore's client runs this policy's backoff itself, in its standard or adaptive mode
(adaptive adds its client-side rate limiter): :meth:`RetryPolicy.botocore_retries` sets
it up with the same attempts. What botocore does not retry (a changed body is a 400) is
sent again through :meth:`RetryPolicy.run` with ``client_retried=True``; the CRT's single
attempts go through :meth:`RetryPolicy.run` for everything.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .answers import CORRUPTED, FATAL_CODES

if TYPE_CHECKING:
    from . import StoreConfig

# Answers botocore's standard retry mode retries besides a 5xx (botocore/retries/standard.py),
# and the changed-body answers (CORRUPTED) archup sends again.
RETRIED_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "TransactionInProgressException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled",
    "SlowDown", "PriorRequestNotComplete", "EC2ThrottledException", "RequestTimeout", "RequestTimeoutException",
    "IDPCommunicationError", *CORRUPTED,
})
MAX_BACKOFF = 20.0  # seconds, as botocore's standard mode

# What to do after a failed attempt: give up, send again at once, or wait and send again.
Verdict = Literal["fail", "resend", "back-off"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5                 # in all, the first included
    mode: str = "standard"            # botocore's retry mode: standard or adaptive
    max_backoff: float = MAX_BACKOFF
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    jitter: Callable[[], float] = field(default=random.random, compare=False)

    @classmethod
    def of(cls, config: StoreConfig) -> RetryPolicy:
        """The policy of ``--retries`` and ``--retry-mode``."""
        return cls(attempts=config.max_attempts, mode=config.retry_mode)

    def botocore_retries(self) -> dict[str, Any]:
        """botocore's ``retries`` setting for this policy (total_max_attempts counts the first try)."""
        return {"mode": self.mode, "total_max_attempts": self.attempts}

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (1 for the first), full jitter."""
        return self.jitter() * min(self.max_backoff, 2.0 ** (attempt - 1))

    @staticmethod
    def answer_verdict(status: int, code: str, *, client_retried: bool = False) -> Verdict:
        """What an S3 error answer (its HTTP status, its code: the status itself for a bare
        answer) calls for. ``client_retried``: the client already spent the attempts on the
        answers it backs off from (botocore), so only a changed body is sent again."""
        if code in FATAL_CODES:
            return "fail"
        if code in CORRUPTED:
            return "resend"
        if client_retried:
            return "fail"
        return "back-off" if status >= 500 or status == 429 or code in RETRIED_CODES else "fail"

    def run(self, send: Callable[[], T], failed: Callable[[Exception, bool], tuple[Exception, Verdict]]) -> T:
        """``send()`` until it returns or the attempts are spent. ``failed(raised, last)`` says
        what an attempt's exception means (the error to raise if none follows, and the
        verdict); ``last`` tells it no attempt follows."""
        attempts = max(1, self.attempts)
        for attempt in range(1, attempts + 1):
            try:
                return send()
            except Exception as raised:
                last = attempt == attempts
                error, verdict = failed(raised, last)
                if verdict == "fail" or last:
                    raise error from None
                if verdict == "back-off":
                    self.sleep(self.backoff(attempt))
        raise AssertionError("unreachable")  # the last attempt returns or raises
