"""PutObject through the AWS Common Runtime's S3 client (``--transport crt``).

A source file's single-request PUT is most of archup's client CPU on small files, and
most of that is botocore's request path (docs/benchmarks.md). Here the request is signed,
pooled and exchanged in C by ``awscrt.s3.S3Client``; the worker thread that calls
:meth:`CrtPut.put` blocks on the request's future, as it would on botocore's socket.

What stays archup's, and why (docs/design.md, "The CRT transport"):

- **Retries.** The CRT's own retries are switched off (``S3RetryMode.NONE``): they cannot
  be set to "none" by count, do not retry 429 or BadDigest, and hide each attempt from a
  per-attempt timeout. :meth:`CrtPut.put` sends single attempts through archup's one
  retry policy (:mod:`archup.store.retry`), the one botocore's client is set up from.
- **Timeouts.** The CRT has a connect timeout but no read timeout: an attempt that sees no
  progress (bytes sent, an answer's headers) for ``read_timeout`` seconds is cancelled
  and counts as a failed attempt, as a botocore read timeout does.
- **Credentials** come from botocore's chain (profiles, environment, instance roles). Keys
  that cannot change (the environment's, a profile's) are handed to the CRT once, as a
  static provider; refreshable ones are asked for at each signature through a delegate
  provider (a call into Python on the CRT's thread, per request), and a failure of the
  chain is kept and raised as itself, not as the CRT's bare delegate error.
- **Addressing.** The URL of a key (path-style or virtual-hosted, region) is what botocore
  would use: taken once from a PutObject that botocore builds and signs but never sends.

This module imports no botocore: :class:`CrtPutStore` wraps the S3 store (a layer, as
``--bwlimit`` is) and asks it for a credentials callable and the endpoint botocore chose;
the headers are the ones botocore's PutObject gets (:mod:`archup.store.putargs`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import heapq
import io
import logging
import os
import sys
import threading
import time
import urllib.parse
import weakref
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DestinationError, TransferError
from . import ChecksumMode, Credentials, ObjectReader
from .answers import answer_error
from .putargs import put_args
from .retry import RetryPolicy, Verdict
from .wrappers import StoreWrapper

if TYPE_CHECKING:
    from .s3 import S3Store

log = logging.getLogger("archup.store")

# The CRT's error names after which another attempt cannot help (the endpoint cannot be
# reached at all is decided after the last attempt, as botocore's EndpointConnectionError).
_UNREACHABLE = frozenset({
    "AWS_IO_SOCKET_CONNECTION_REFUSED", "AWS_IO_DNS_INVALID_NAME", "AWS_IO_DNS_QUERY_FAILED",
    "AWS_IO_DNS_NO_ADDRESS_FOR_HOST", "AWS_IO_SOCKET_NO_ROUTE_TO_HOST", "AWS_IO_SOCKET_NETWORK_DOWN",
    "AWS_IO_SOCKET_TIMEOUT",
})
# Answers the CRT reports by an error name alone, their status and body dropped (even with
# its retries off): the S3 error code each name stands for.
_ANSWER_NAMES = {
    "AWS_ERROR_S3_INTERNAL_ERROR": ("InternalError", 500),
    "AWS_ERROR_S3_SLOW_DOWN": ("SlowDown", 503),
    "AWS_ERROR_S3_REQUEST_TIMEOUT": ("RequestTimeout", 400),
    "AWS_ERROR_S3_REQUEST_TIME_TOO_SKEWED": ("RequestTimeTooSkewed", 403),
}


@dataclass(frozen=True)
class Endpoint:
    """Where a key's PUT goes, as botocore addresses it: ``scheme://host/path_prefix<key>``."""

    scheme: str
    host: str           # the Host header, with a port if the URL has one
    path_prefix: str    # "/bucket/" path-style, "/" virtual-hosted
    region: str

    @classmethod
    def from_request(cls, url: str, authorization: str, key: str) -> Endpoint:
        """From botocore's signed PutObject of ``key``: its URL and its Authorization header
        (whose credential scope names the region it was signed for)."""
        parts = urllib.parse.urlsplit(url)
        quoted = quote_key(key)
        if not parts.path.endswith(quoted):
            raise ValueError(f"unexpected request path {parts.path!r}")
        credential = authorization.partition("Credential=")[2].partition(",")[0]
        scope = credential.split("/")
        region = scope[2] if len(scope) >= 5 else "us-east-1"
        return cls(parts.scheme, parts.netloc, parts.path[:-len(quoted)], region)


def quote_key(key: str) -> str:
    """A key in a request path, as botocore writes it."""
    return urllib.parse.quote(key, safe="/~")


class _Stalled(Exception):
    """No progress for the read timeout: the attempt was cancelled."""


class _Attempt:
    """One request in flight: its answer's status and headers, and when it last moved."""

    __slots__ = ("status", "headers", "moved")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.moved = time.monotonic()

    def on_headers(self, status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
        self.status = status_code
        self.headers = {name.lower(): value for name, value in headers}
        self.moved = time.monotonic()

    def on_progress(self, progress: int, **_: Any) -> None:
        self.moved = time.monotonic()


_shared_lock = threading.Lock()
# The CRT calls a delegate on its own thread and hands an exception it raised to
# sys.unraisablehook, which prints a traceback; put() raises the kept error instead.
_DELEGATES: weakref.WeakSet[Callable[[], Any]] = weakref.WeakSet()
_hook_installed = False


def _quiet_delegate_failures() -> None:
    global _hook_installed
    with _shared_lock:
        if _hook_installed:
            return
        _hook_installed = True
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            if unraisable.object in _DELEGATES:
                return
            previous(unraisable)

        sys.unraisablehook = hook

_shared: Any = None  # one event loop group and bootstrap per process, for every client


def _bootstrap() -> Any:
    global _shared
    with _shared_lock:
        if _shared is None:
            from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup

            group = EventLoopGroup()
            _shared = ClientBootstrap(group, DefaultHostResolver(group))
        return _shared


class _BodyStream(io.RawIOBase):
    """A request body read in place (io.BytesIO would copy it: an 8 MiB shard held twice)."""

    def __init__(self, body: bytes | bytearray) -> None:
        super().__init__()
        self._view = memoryview(body)
        self._at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), len(self._view) - self._at)
        buffer[:count] = self._view[self._at:self._at + count]
        self._at += count
        return count

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: len(self._view)}[whence]
        self._at = max(0, min(len(self._view), base + offset))
        return self._at

    def tell(self) -> int:
        return self._at


PutDone = Callable[[str | None, Exception | None], None]
"""The end of an asynchronous PUT: ``done(etag, None)`` or ``done(None, error)``, called
once, on the CRT's thread (or the retry thread); it must not raise."""

# An asynchronous PUT of a body this size or smaller marks no progress while its bytes go
# out (one call into Python less per request): it must see its answer's headers within the
# connect and read timeouts from when it was handed to the CRT.
QUIET_BODY = 64 * 1024


class _Pending:
    """An asynchronous PUT, from its first attempt to ``done``."""

    __slots__ = ("path", "body", "payload", "headers", "what", "done", "attempt", "seen", "request", "stalled",
                 "patience", "send_filepath")

    def __init__(self, path: str, body: bytes, payload: str, headers: list[tuple[str, str]], what: str,
                 done: PutDone, send_filepath: str | None = None) -> None:
        self.path = path
        self.send_filepath = send_filepath
        self.body = body
        self.payload = payload  # the body's SHA-256 (hex) that every attempt is signed with
        self.headers = headers
        self.what = what
        self.done: PutDone | None = done
        self.attempt = 0
        self.seen = _Attempt()
        self.request: Any = None
        self.stalled = False
        self.patience = 0.0


class _Watch:
    """One thread for a client's asynchronous PUTs: it cancels an attempt that made no
    progress for its patience (the read timeout), and starts the attempts a retry waits
    for. It looks at the attempts in flight every ``tick`` seconds while there are any,
    and ends after ``idle`` seconds with none (started again by the next)."""

    def __init__(self, tick: float, idle: float = 5.0) -> None:
        self.tick = tick
        self.idle = idle
        self._cond = threading.Condition()
        self._inflight: set[_Pending] = set()
        self._later: list[tuple[float, int, Callable[[], None]]] = []
        self._order = 0
        self._running = False

    def track(self, pending: _Pending) -> None:
        with self._cond:
            self._inflight.add(pending)
            self._ensure()

    def untrack(self, pending: _Pending) -> None:
        with self._cond:
            self._inflight.discard(pending)

    def later(self, when: float, action: Callable[[], None]) -> None:
        with self._cond:
            self._order += 1
            heapq.heappush(self._later, (when, self._order, action))
            if self._later[0][1] == self._order:
                self._cond.notify()  # sooner than what the thread waits for
            self._ensure()

    def _ensure(self) -> None:
        if not self._running:
            self._running = True
            threading.Thread(target=self._run, name="archup-crt-watch", daemon=True).start()
        elif len(self._inflight) == 1 and not self._later:
            self._cond.notify()  # it may be waiting out its idle time without a tick

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            with self._cond:
                now = time.monotonic()
                due: list[Callable[[], None]] = []
                while self._later and self._later[0][0] <= now:
                    due.append(heapq.heappop(self._later)[2])
                stalled = [(p, p.request) for p in self._inflight
                           if not p.stalled and p.request is not None and now - p.seen.moved >= p.patience]
                for pending, _ in stalled:
                    pending.stalled = True
                if self._inflight or self._later or due:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since >= self.idle:
                    self._running = False
                    return
                wait = self.tick if self._inflight else self.idle
                if self._later:
                    wait = min(wait, self._later[0][0] - now)
                if not due and not stalled:
                    self._cond.wait(max(0.0, wait))
                    continue
            for _, request in stalled:
                request.cancel()  # its future ends with an error; the attempt counts as stalled
            for action in due:
                action()


class CrtPut:
    """PutObject of one store's bucket through one ``awscrt.s3.S3Client``.

    One client per endpoint: the CRT pools connections by host name, not by port."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials | Callable[[], Credentials], *, retry: RetryPolicy,
                 connect_timeout: float, read_timeout: float, max_connections: int, sign_payload: bool) -> None:
        from awscrt.auth import AwsCredentials, AwsCredentialsProvider, AwsSignedBodyValue
        from awscrt.s3 import (
            S3Client,
            S3RequestTlsMode,
            S3RetryConfig,
            S3RetryMode,
            create_default_s3_signing_config,
        )

        self.endpoint = endpoint
        self.retry = retry
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._credential_error: BaseException | None = None
        self.before_send: list[Callable[[str], None]] = []
        self._watch = _Watch(tick=min(1.0, read_timeout / 4))
        if isinstance(credentials, Credentials):
            # Keys that cannot change: no call into Python (and its GIL) per signature.
            provider = AwsCredentialsProvider.new_static(credentials.access_key, credentials.secret_key,
                                                         credentials.token)
        else:
            chain = credentials

            def delegate() -> Any:
                try:
                    found = chain()
                except BaseException as error:  # kept and raised as itself by put()
                    self._credential_error = error
                    raise
                return AwsCredentials(found.access_key, found.secret_key, found.token)

            _quiet_delegate_failures()
            _DELEGATES.add(delegate)
            provider = AwsCredentialsProvider.new_delegate(delegate)
        signing = create_default_s3_signing_config(region=endpoint.region, credential_provider=provider)
        assert signing.signed_body_value == AwsSignedBodyValue.UNSIGNED_PAYLOAD
        # --checksum none: the signature's SHA-256 is the body's only check. The S3 client
        # leaves a payload unsigned unless told its hash, so each request gets its own.
        self._signing = signing if sign_payload else None
        tls_options = None
        if endpoint.scheme == "https" and os.environ.get("AWS_CA_BUNDLE"):
            from awscrt.io import ClientTlsContext, TlsContextOptions

            context = TlsContextOptions()
            context.override_default_trust_store_from_path(ca_filepath=os.environ["AWS_CA_BUNDLE"])
            tls_options = ClientTlsContext(context).new_connection_options()
        self._client = S3Client(
            bootstrap=_bootstrap(), region=endpoint.region, signing_config=signing,
            tls_mode=S3RequestTlsMode.ENABLED if endpoint.scheme == "https" else S3RequestTlsMode.DISABLED,
            tls_connection_options=tls_options,
            retry_config=S3RetryConfig(retry_mode=S3RetryMode.NONE),
            connect_timeout_ms=max(1, int(connect_timeout * 1000)),
            max_active_connections_override=max_connections)

    def put(self, key: str, body: bytes, headers: list[tuple[str, str]], *, what: str,
            body_sha256: bytes | None = None) -> str:
        """PUT ``body`` at ``key`` with these headers; the answer's ETag. Retried as the retry
        policy says; the last failure is a TransferError or a DestinationError.
        ``body_sha256``: the body's SHA-256 where the caller has it (the signature's payload
        hash), so the body is not hashed again here."""
        path = self.endpoint.path_prefix + quote_key(key)
        all_headers = [("Host", self.endpoint.host), ("Content-Length", str(len(body))), *headers]
        payload = self._payload_hash(body, body_sha256)
        return self.retry.run(lambda: self._attempt(path, body, payload, all_headers),
                              lambda raised, last: self._meaning(raised, what, last=last))

    def _attempt(self, path: str, body: bytes, payload: str, headers: list[tuple[str, str]]) -> str:
        from awscrt.http import HttpHeaders, HttpRequest
        from awscrt.s3 import S3RequestType

        for hook in self.before_send:
            hook(f"{self.endpoint.scheme}://{self.endpoint.host}{path}")
        seen = _Attempt()
        signing = None if self._signing is None else self._signing.replace(signed_body_value=payload)
        request = self._client.make_request(
            type=S3RequestType.DEFAULT, operation_name="PutObject", signing_config=signing,
            request=HttpRequest("PUT", path, HttpHeaders(headers), _BodyStream(body)),
            on_headers=seen.on_headers, on_progress=seen.on_progress)
        self._wait(request, seen)
        etag = seen.headers.get("etag")
        if not etag:
            raise TransferError(f"PutObject {path}: answer {seen.status} without an ETag", "NoETag")
        return etag

    def _payload_hash(self, body: bytes, sha256: bytes | None) -> str:
        """The signature's payload hash, once a PUT (every attempt is signed with it): the
        body's SHA-256 as hex, from the caller's digest if it has one (archup hashed the body
        already), else computed; nothing where the payload is not signed."""
        if self._signing is None:
            return ""
        if sha256 is not None:
            assert len(sha256) == 32, "a SHA-256 digest"
            return sha256.hex()
        return hashlib.sha256(body).hexdigest()

    def put_async(self, key: str, body: bytes, headers: list[tuple[str, str]], *, what: str, done: PutDone,
                  send_filepath: str | None = None, body_sha256: bytes | None = None) -> None:
        """PUT ``body`` at ``key`` as put() does, without waiting: ``done`` is called with the
        ETag, or with the error put() would have raised, when the last attempt ends. Nothing
        waits on a thread meanwhile; the attempts a retry sends after a wait are started by
        one thread of this client's (:class:`_Watch`), which also cancels a stalled one."""
        path = self.endpoint.path_prefix + quote_key(key)
        all_headers = [("Host", self.endpoint.host), ("Content-Length", str(len(body))), *headers]
        self._send(_Pending(path, body, self._payload_hash(body, body_sha256), all_headers, what, done,
                            send_filepath))

    def _send(self, pending: _Pending) -> None:
        from awscrt.http import HttpHeaders, HttpRequest
        from awscrt.s3 import S3RequestType

        pending.attempt += 1
        pending.stalled = False
        pending.request = None
        pending.seen = seen = _Attempt()
        pending.patience = self.connect_timeout + self.read_timeout
        try:
            for hook in self.before_send:
                hook(f"{self.endpoint.scheme}://{self.endpoint.host}{pending.path}")
            signing = None if self._signing is None else self._signing.replace(signed_body_value=pending.payload)
            progress = seen.on_progress if len(pending.body) > QUIET_BODY else None
            self._watch.track(pending)
            request = self._client.make_request(
                type=S3RequestType.DEFAULT, operation_name="PutObject", signing_config=signing,
                request=HttpRequest("PUT", pending.path, HttpHeaders(pending.headers),
                                    None if pending.send_filepath else _BodyStream(pending.body)),
                send_filepath=pending.send_filepath, on_headers=seen.on_headers, on_progress=progress)
        except Exception as error:
            self._watch.untrack(pending)
            self._failed(pending, error)
            return
        pending.request = request
        request.finished_future.add_done_callback(lambda future: self._finished(pending, future))

    def _finished(self, pending: _Pending, future: concurrent.futures.Future[None]) -> None:
        """An attempt ended (on the CRT's thread)."""
        self._watch.untrack(pending)
        raised = future.exception()
        error = raised if raised is None or isinstance(raised, Exception) else Exception(repr(raised))
        if error is None:
            etag = pending.seen.headers.get("etag")
            if etag:
                self._end(pending, etag, None)
                return
            error = TransferError(f"PutObject {pending.path}: answer {pending.seen.status} without an ETag", "NoETag")
        elif pending.stalled:
            error = _Stalled()
        self._failed(pending, error)

    def _failed(self, pending: _Pending, raised: Exception) -> None:
        """What the retry policy makes of a failed attempt: the end, or another attempt."""
        try:
            last = pending.attempt >= max(1, self.retry.attempts)
            error, verdict = self._meaning(raised, pending.what, last=last)
        except Exception as bug:
            self._end(pending, None, bug)
            return
        if verdict == "fail" or last:
            self._end(pending, None, error)
            return
        # Not from the CRT's own thread: another attempt starts on the watch thread.
        wait = self.retry.backoff(pending.attempt) if verdict == "back-off" else 0.0
        self._watch.later(time.monotonic() + wait, lambda: self._send(pending))

    @staticmethod
    def _end(pending: _Pending, etag: str | None, error: Exception | None) -> None:
        done, pending.done = pending.done, None
        pending.body = b""
        pending.request = None
        if done is None:
            return
        try:
            done(etag, error)
        except Exception:  # done must not raise; if it does, it is logged, never lost in the CRT
            log.exception("the end of %s", pending.what)

    def get(self, key: str, *, start: int, length: int, if_match: str | None, what: str) -> CrtBody:
        """GET ``length`` bytes of ``key`` from ``start`` (a Range request), whole into memory:
        for bodies a caller bounds (restore's small files and ranges). Retried as put() is."""
        path = self.endpoint.path_prefix + quote_key(key)
        headers = [("Host", self.endpoint.host), ("Range", f"bytes={start}-{start + length - 1}")]
        if if_match:
            headers.append(("If-Match", if_match))
        return self.retry.run(lambda: self._get_attempt(path, headers, length),
                              lambda raised, last: self._meaning(raised, what, last=last))

    def _get_attempt(self, path: str, headers: list[tuple[str, str]], length: int) -> CrtBody:
        from awscrt.http import HttpHeaders, HttpRequest
        from awscrt.s3 import S3RequestType

        seen = _Attempt()
        body = bytearray()

        def on_body(chunk: bytes, **_: Any) -> None:
            body.extend(chunk)
            seen.moved = time.monotonic()

        request = self._client.make_request(
            type=S3RequestType.DEFAULT, operation_name="GetObject",
            request=HttpRequest("GET", path, HttpHeaders(headers)),
            on_headers=seen.on_headers, on_body=on_body, on_progress=seen.on_progress)
        self._wait(request, seen)
        expected = seen.headers.get("content-length")
        if expected is not None and int(expected) != len(body) or len(body) > length:
            raise TransferError(f"GetObject {path}: {len(body)} bytes of an answer of {expected}", "IncompleteRead")
        return CrtBody(body, seen.headers)

    def _wait(self, request: Any, seen: _Attempt) -> None:
        """Wait for a request to finish; cancel it (``_Stalled``) when it makes no progress
        for the read timeout (the first bytes wait for a connection too)."""
        done = request.finished_future
        patience = self.connect_timeout + self.read_timeout
        while True:
            try:
                done.result(timeout=max(0.0, seen.moved + patience - time.monotonic()))
                return
            except concurrent.futures.TimeoutError:
                if time.monotonic() - seen.moved < patience:
                    continue
                request.cancel()
                concurrent.futures.wait([done])
                raise _Stalled() from None
            finally:
                patience = self.read_timeout

    def _meaning(self, error: Exception, what: str, *, last: bool) -> tuple[Exception, Verdict]:
        """What a failed attempt's exception means, and what the retry policy makes of it."""
        from awscrt.exceptions import AwsCrtError
        from awscrt.s3 import S3ResponseError

        if isinstance(error, _Stalled):
            return TransferError(f"{what}: no answer within {self.read_timeout:g} s (--timeout)",
                                 "ReadTimeoutError"), "back-off"
        if isinstance(error, S3ResponseError):
            code, message = _error_code(error.status_code, error.body)
            return answer_error(what, code, message), self.retry.answer_verdict(error.status_code, code)
        if isinstance(error, AwsCrtError) and error.name in _ANSWER_NAMES:
            code, status = _ANSWER_NAMES[error.name]
            return answer_error(what, code, error.message), self.retry.answer_verdict(status, code)
        if isinstance(error, AwsCrtError):
            if error.name == "AWS_AUTH_CREDENTIALS_PROVIDER_DELEGATE_FAILURE" and self._credential_error:
                kept, self._credential_error = self._credential_error, None
                if isinstance(kept, Exception):
                    return kept, "fail"
            if error.name in _UNREACHABLE and last:
                return DestinationError(f"{what}: cannot reach the endpoint ({error.name}: {error.message}); "
                                        "check --endpoint-url and the network"), "fail"
            # A connection that broke, was refused or timed out: as botocore's connection errors.
            return TransferError(f"{what}: {error.name}: {error.message}", error.name), "back-off"
        return error, "fail"


def _error_code(status: int, body: bytes | None) -> tuple[str, str]:
    """An S3 error answer's Code and Message (its XML body), or the status for a bare answer."""
    if body:
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError:
            root = None
        if root is not None:
            code = root.findtext("Code") or ""
            if code:
                return code, root.findtext("Message") or code
    return str(status), ""


class CrtBody:
    """A GET's answer held whole (an ObjectReader): its ETag, user metadata and bytes."""

    def __init__(self, body: bytearray, headers: dict[str, str]) -> None:
        self.etag = headers.get("etag", "")
        self.metadata = {name[len("x-amz-meta-"):]: value for name, value in headers.items()
                         if name.startswith("x-amz-meta-")}
        self.size = len(body)
        self._view = memoryview(body)
        self._at = 0

    def readinto(self, buffer: memoryview | bytearray) -> int:
        count = min(len(buffer), self.size - self._at)
        buffer[:count] = self._view[self._at:self._at + count]
        self._at += count
        return count

    def chunks(self, size: int) -> Iterator[bytes]:
        while self._at < self.size:
            chunk = bytes(self._view[self._at:self._at + size])
            self._at += len(chunk)
            yield chunk

    def close(self) -> None:
        self._view.release()


# A GET whose length the caller bounds at this or less goes through the CRT, held whole:
# small files, where botocore's per-request CPU is most of the cost. Larger reads (restore's
# ranges of a large object) stream through botocore into the caller's buffer: held whole,
# an 8 MiB range per worker cost the CRT's buffer and this one's (peak RSS 191 MiB against
# 72 at N = 8, docs/benchmarks.md).
CRT_GET_MAX = 1024 * 1024


class CrtPutStore(StoreWrapper):
    """``--transport crt``: a source file's PutObject (and every other put_object) through the
    CRT's S3 client; every other request goes to the S3 store inside. The CRT client is made
    at the first PutObject, from the endpoint and credentials botocore has."""

    def __init__(self, inner: S3Store) -> None:
        super().__init__(inner)
        self.s3 = inner
        self._crt: CrtPut | None = None
        self._lock = threading.Lock()
        self._before_put: list[Callable[[str], None]] = []

    def before_send(self, operation: str, hook: Callable[[str], None]) -> None:
        """Call ``hook(url)`` when a request of ``operation`` is about to be sent, by the CRT
        or by botocore (see archup.store.wrappers.CrashPointStore)."""
        self.s3.before_send(operation, hook)
        if operation == "PutObject":
            with self._lock:
                self._before_put.append(hook)
                if self._crt is not None:
                    self._crt.before_send.append(hook)

    def _client(self) -> CrtPut:
        with self._lock:
            if self._crt is None:
                from .s3 import ENDPOINT_PROBE

                config = self.s3.config
                self._crt = CrtPut(
                    Endpoint.from_request(*self.s3.signed_put_url(), ENDPOINT_PROBE),
                    self.s3.fixed_credentials() or self.s3.frozen_credentials,
                    retry=self.s3.retry, connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
                    max_connections=config.max_pool_connections,
                    sign_payload=config.checksum is ChecksumMode.NONE)
                self._crt.before_send.extend(self._before_put)
            return self._crt

    def open_object(self, key: str, *, start: int = 0, length: int | None = None,
                    if_match: str | None = None) -> ObjectReader | None:
        """A bounded GET (``length`` at most CRT_GET_MAX) through the CRT; any other through
        botocore, which streams it."""
        if length is None or length > CRT_GET_MAX:
            return super().open_object(key, start=start, length=length, if_match=if_match)
        if length <= 0:
            raise ValueError(f"GetObject {key}: a range of {length} bytes")
        what = f"GetObject {key} bytes {start}-{start + length - 1}"
        try:
            return self._client().get(key, start=start, length=length, if_match=if_match, what=what)
        except TransferError as error:
            if error.code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def put_object(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                   metadata: dict[str, str] | None = None, content_type: str | None = None,
                   archive: bool = False) -> str:
        headers = put_args(self.s3.config, body, sha256_digest=sha256_digest, metadata=metadata,
                           content_type=content_type, archive=archive).headers()
        return self._client().put(key, body, headers, what=f"PutObject {key}", body_sha256=sha256_digest)

    def async_puts(self) -> CrtPutStore:
        """PutObject without a waiting thread: :meth:`put_object_async`."""
        return self

    def put_object_async(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                         metadata: dict[str, str] | None = None, content_type: str | None = None,
                         archive: bool = False, send_filepath: str | None = None, done: PutDone) -> None:
        """put_object() without waiting for it: ``done(etag, None)`` or ``done(None, error)``
        once it ended (see :meth:`CrtPut.put_async`). With ``send_filepath`` the CRT reads
        the body from that file itself, no call into Python for it; the headers (its
        length, its checksum: the server refuses other bytes) are ``body``'s."""
        headers = put_args(self.s3.config, body, sha256_digest=sha256_digest, metadata=metadata,
                           content_type=content_type, archive=archive).headers()
        self._client().put_async(key, body, headers, what=f"PutObject {key}", done=done, send_filepath=send_filepath,
                                 body_sha256=sha256_digest)

