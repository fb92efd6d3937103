"""A fault-injecting HTTP reverse proxy for the tests: it sits on 127.0.0.1 in front of the
moto server and, for a seeded share of the requests, misbehaves the way S3 and networks do.

Fault kinds:

- ``"500"``: answers ``500 InternalError`` (an S3 XML error body); the request never reaches the server.
- ``"503"``: answers ``503 SlowDown``; the request never reaches the server.
- ``"reset"``: reads part of the request body, then resets the connection (``SO_LINGER`` 0, so
  the kernel sends RST); the server never sees the request.
- ``"stall"``: reads the whole request and answers nothing until the client gives up (its read
  timeout) or ``stall_seconds`` pass; the server never sees the request.
- ``"lost-response"`` (not in the default mix): forwards the request, so the server does the
  work, then resets the connection instead of passing the answer on.
- ``"429"`` (not in the default mix): answers ``429 TooManyRequests``, as some S3-compatible
  servers and gateways throttle; the request never reaches the server.

Everything else is forwarded faithfully: the request line, the headers (``Expect:
100-continue`` is answered by the proxy itself, ``Connection`` is set to ``close``) and the body
byte for byte (by ``Content-Length`` or chunked), and the server's answer likewise. The proxy
closes every connection after one exchange (``Connection: close`` both ways), so a client never
reuses a connection the proxy is about to close.

Two modes for the bodies of requests (neither local server checks a body against the
checksum its request claims; S3 does):

- ``validate=True`` (what S3 does): the proxy reads a request's whole body, computes the
  checksum the request claims (``x-amz-checksum-crc32``, ``-crc32c``, ``-crc64nvme``,
  ``-sha1``, ``-sha256``, ``Content-MD5``) over the bytes it received, and answers
  ``400 BadDigest`` on a mismatch; the request never reaches the server.
- ``corrupt=RATE`` (what a network does): for a seeded share of the requests with a body,
  one byte of the body is changed (at a seeded place) before that check and before
  forwarding. ``Stats.corrupted_forwarded`` counts corrupted bodies that reached the
  server: with ``validate`` on, only bodies that claimed no checksum can.

Which requests are faulted is decided in arrival order by a ``random.Random(seed)``: each
request is faulted with probability ``rate``; the kinds take turns (a seeded shuffle of them,
round after round; ``"reset"`` is given only to a request with a body) so that a run with a
handful of faults has every kind. ``rules`` force a fault or a canned answer on the requests
they match, before the random draw. Counters say what really happened.
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
import select
import socket
import socketserver
import struct
import threading
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast, final

DEFAULT_KINDS: tuple[str, ...] = ("500", "503", "reset", "stall")
ALL_KINDS: tuple[str, ...] = (*DEFAULT_KINDS, "lost-response", "429")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"}
_COPY_CHUNK = 256 * 1024
_MAX_HEAD = 64 * 1024


def s3_error_body(code: str, message: str, request_id: str = "FAULTPROXY") -> bytes:
    """An S3 error document, as S3 writes it."""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{request_id}</RequestId><HostId>faultproxy</HostId></Error>").encode()


@dataclass(frozen=True)
class Canned:
    """An answer the proxy gives instead of forwarding (the request never reaches the server)."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()  # e.g. a Date, as S3 sends one with every answer

    def body(self, request_id: str) -> bytes:
        return s3_error_body(self.code, self.message, request_id)


INTERNAL_ERROR = Canned(500, "InternalError", "We encountered an internal error. Please try again.")
SLOW_DOWN = Canned(503, "SlowDown", "Please reduce your request rate.")
# Not one of botocore's throttling error codes: only the 429 status says "throttled".
TOO_MANY_REQUESTS = Canned(429, "TooManyRequests", "Too many requests, please slow down.")
_CANNED_KINDS = {"500": INTERNAL_ERROR, "503": SLOW_DOWN, "429": TOO_MANY_REQUESTS}
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
            412: "Precondition Failed", 429: "Too Many Requests", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable"}


@dataclass(frozen=True)
class RequestHead:
    """What the proxy knows of a request before its body: enough to pick a fault."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def path(self) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(self.target).path)

    @property
    def query(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.target).query, keep_blank_values=True))

    @property
    def has_body(self) -> bool:
        length = self.header("Content-Length")
        return bool(length and int(length) > 0) or "chunked" in (self.header("Transfer-Encoding") or "").lower()

    @property
    def operation(self) -> str:
        """The S3 operation, as far as the request line tells it (path-style addressing)."""
        query, method = self.query, self.method
        key = self.path.lstrip("/").partition("/")[2]
        if method == "POST" and "uploads" in query:
            return "CreateMultipartUpload"
        if method == "POST" and "uploadId" in query:
            return "CompleteMultipartUpload"
        if method == "POST" and "delete" in query:
            return "DeleteObjects"
        if method == "PUT" and "partNumber" in query:
            return "UploadPart"
        if method == "PUT" and key:
            return "PutObject"
        if method == "DELETE" and "uploadId" in query:
            return "AbortMultipartUpload"
        if method == "GET" and "uploadId" in query:
            return "ListParts"
        if method == "GET" and "uploads" in query:
            return "ListMultipartUploads"
        if method == "HEAD":
            return "HeadObject" if key else "HeadBucket"
        if method == "GET":
            return "GetObject" if key else "ListObjects"
        return f"{method} {'object' if key else 'bucket'}"


@dataclass
class Rule:
    """Force ``action`` (a fault kind or a Canned answer) on requests that ``match``;
    ``times`` of them (None: every one)."""

    match: Callable[[RequestHead], bool]
    action: str | Canned
    times: int | None = None
    hits: int = 0

    def take(self, head: RequestHead) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if not self.match(head):
            return False
        self.hits += 1
        return True


def operation_is(*operations: str) -> Callable[[RequestHead], bool]:
    return lambda head: head.operation in operations


@dataclass
class Stats:
    """What the proxy did, by kind and by operation (read under the proxy's lock via snapshot())."""

    requests: int = 0
    forwarded: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    canned: Counter[str] = field(default_factory=Counter)  # code of each canned answer given
    by_operation: Counter[tuple[str, str]] = field(default_factory=Counter)  # (operation, outcome)
    stalls_abandoned_by_client: int = 0  # the client closed the stalled connection (its read timeout)
    upstream_errors: int = 0  # the proxy could not reach the server (never expected)
    validated: Counter[str] = field(default_factory=Counter)  # header name -> bodies checked against it
    bad_digests: int = 0  # bodies refused with 400 BadDigest
    corrupted: int = 0  # bodies the proxy changed a byte of
    corrupted_forwarded: int = 0  # changed bodies that reached the server anyway
    bytes_forwarded: Counter[str] = field(default_factory=Counter)  # operation -> request body bytes answered


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


@final
class FaultProxy:
    """Start with ``with FaultProxy(upstream, rate=0.1, seed=7) as proxy: ... proxy.url ...``."""

    def __init__(self, upstream: str, *, rate: float = 0.0, seed: int = 0,
                 kinds: Iterable[str] = DEFAULT_KINDS, rules: Iterable[Rule] = (),
                 stall_seconds: float = 30.0, validate: bool = False, corrupt: float = 0.0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        assert parsed.scheme == "http" and parsed.hostname and parsed.port, upstream
        self.upstream = (parsed.hostname, parsed.port)
        self.rate = rate
        self.kinds = tuple(kinds)
        assert self.kinds and set(self.kinds) <= set(ALL_KINDS), self.kinds
        self.rules = list(rules)
        self.stall_seconds = stall_seconds
        self._rng = random.Random(seed)
        self.validate = validate
        self.corrupt = corrupt
        self._corrupt_rng = random.Random(seed + 1)  # its own draws: the faults' sequence is unchanged
        self._turns: list[str] = []
        self._lock = threading.Lock()
        self._stats = Stats()
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    # -- lifecycle -------------------------------------------------------------

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            held = list(self._open)
        for sock in held:  # wakes stalled handlers
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()  # joins the handler threads (block_on_close)
        self._thread.join()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def snapshot(self) -> Stats:
        with self._lock:
            return Stats(self._stats.requests, self._stats.forwarded, Counter(self._stats.faults),
                         Counter(self._stats.canned), Counter(self._stats.by_operation),
                         self._stats.stalls_abandoned_by_client, self._stats.upstream_errors,
                         Counter(self._stats.validated), self._stats.bad_digests, self._stats.corrupted,
                         self._stats.corrupted_forwarded, Counter(self._stats.bytes_forwarded))

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = rate

    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self.rules.clear()

    # -- deciding ------------------------------------------------------------

    def _decide(self, head: RequestHead) -> tuple[int, str | Canned | None]:
        with self._lock:
            self._stats.requests += 1
            return self._stats.requests, self._pick(head)

    def _corrupt_at(self, head: RequestHead) -> float | None:
        """Where (a fraction of the body) to change a byte of this request's body; None: nowhere."""
        with self._lock:
            if self.corrupt <= 0 or not head.has_body or self._corrupt_rng.random() >= self.corrupt:
                return None
            return self._corrupt_rng.random()

    def _pick(self, head: RequestHead) -> str | Canned | None:
        """Called under the lock, in arrival order."""
        for rule in self.rules:
            if rule.take(head):
                return rule.action
        if self.rate <= 0 or self._rng.random() >= self.rate:
            return None
        # The kinds take turns, so a few faults already cover every kind.
        for _ in range(2 * len(self.kinds) + 1):
            if not self._turns:
                self._turns = list(self.kinds)
                self._rng.shuffle(self._turns)
            kind = self._turns.pop(0)
            if kind != "reset" or head.has_body:
                return kind
            self._turns.append(kind)  # its turn comes with the next request that has a body
        return None

    def _count(self, head: RequestHead, outcome: str, *, fault: bool = False, canned: str | None = None) -> None:
        with self._lock:
            self._stats.by_operation[(head.operation, outcome)] += 1
            if fault:
                self._stats.faults[outcome] += 1
            if canned is not None:
                self._stats.canned[canned] += 1
            if outcome == "forwarded":
                self._stats.forwarded += 1
                self._stats.bytes_forwarded[head.operation] += int(head.header("Content-Length") or 0)

    # -- one connection ------------------------------------------------------

    def _handler_class(self) -> type[socketserver.BaseRequestHandler]:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                with proxy._lock:
                    proxy._open.add(sock)
                try:
                    proxy._serve(sock)
                except OSError:
                    pass  # the client went away (its timeout, a retry): nothing to answer
                finally:
                    with proxy._lock:
                        proxy._open.discard(sock)

        return Handler

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(60)
        reader = cast(io.BufferedReader, sock.makefile("rb", buffering=_COPY_CHUNK))
        head = _read_request_head(reader)
        if head is None:
            return
        number, action = self._decide(head)
        expects_continue = (head.header("Expect") or "").lower() == "100-continue"
        request_id = f"FAULT{number:06d}"

        if isinstance(action, Canned) or action in _CANNED_KINDS:
            canned = action if isinstance(action, Canned) else _CANNED_KINDS[action]
            if not expects_continue:
                _drain_body(reader, head)  # so closing never resets an answer the client should read
            # Counted before the client can see the answer: a test reading the counters after
            # its request returned never misses it.
            self._count(head, action if isinstance(action, str) else f"canned {canned.code}",
                        fault=isinstance(action, str), canned=canned.code)
            _send_answer(sock, head, canned.status, canned.body(request_id), canned.headers)
            _close(sock, reader)
            return
        if expects_continue:
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if action == "reset":
            _read_part_of_body(reader, head)
            self._count(head, "reset", fault=True)
            _reset(sock, reader)
            return
        if action == "stall":
            _drain_body(reader, head)
            self._count(head, "stall", fault=True)
            if _wait_for_close(sock, self.stall_seconds, self._stopping):
                with self._lock:
                    self._stats.stalls_abandoned_by_client += 1
            _close(sock, reader)
            return
        body: bytes | None = None
        corrupted = False
        if (self.validate or self.corrupt > 0) and head.has_body and head.header("Content-Length"):
            body = b"".join(_body_chunks(reader, head))
            where = self._corrupt_at(head)
            if where is not None and body:
                index = min(len(body) - 1, int(where * len(body)))
                body = body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1:]
                corrupted = True
                with self._lock:
                    self._stats.corrupted += 1
            if self.validate:
                refused = self._check_digest(head, body)
                if refused is not None:
                    self._count(head, "bad-digest", canned="BadDigest")
                    with self._lock:
                        self._stats.bad_digests += 1
                    _send_answer(sock, head, 400, s3_error_body("BadDigest", refused, request_id))
                    _close(sock, reader)
                    return
            if corrupted:
                with self._lock:
                    self._stats.corrupted_forwarded += 1
        try:
            upstream = socket.create_connection(self.upstream, timeout=60)
        except OSError:
            with self._lock:
                self._stats.upstream_errors += 1
            _reset(sock, reader)
            return
        with upstream:
            _forward_request(reader, upstream, head, body)
            if action == "lost-response":
                _read_until_eof(upstream)  # the server finished the work; its answer is dropped
                self._count(head, "lost-response", fault=True)
                _reset(sock, reader)
                return
            _forward_response(upstream, sock, lambda: self._count(head, "forwarded"))
        _close(sock, reader)


    def _check_digest(self, head: RequestHead, body: bytes) -> str | None:
        """S3's check of a body against the checksums its request claims: the message of a
        BadDigest answer, or None if every claimed checksum matches. (On CompleteMultipartUpload
        an x-amz-checksum-* header is the whole object's checksum, checked against the parts,
        not the part list's: only its Content-MD5 is about the body.)"""
        for name, compute in _DIGESTS.items():
            claimed = head.header(name)
            if claimed is None or (head.operation == "CompleteMultipartUpload" and name != "Content-MD5"):
                continue
            with self._lock:
                self._stats.validated[name.lower()] += 1
            if claimed.strip() != compute(body):
                what = "Content-MD5" if name == "Content-MD5" else name.rpartition("-")[2].upper()
                return f"The {what} you specified did not match the calculated checksum."
        return None


def _crc_b64(value: int, width: int) -> str:
    return base64.b64encode(value.to_bytes(width, "big")).decode()


def _crt(name: str, body: bytes) -> int:
    from awscrt import checksums
    return int(getattr(checksums, name)(body))


_DIGESTS: dict[str, Callable[[bytes], str]] = {
    "x-amz-checksum-crc32": lambda body: _crc_b64(zlib.crc32(body), 4),
    "x-amz-checksum-crc32c": lambda body: _crc_b64(_crt("crc32c", body), 4),
    "x-amz-checksum-crc64nvme": lambda body: _crc_b64(_crt("crc64nvme", body), 8),
    "x-amz-checksum-sha1": lambda body: base64.b64encode(hashlib.sha1(body).digest()).decode(),
    "x-amz-checksum-sha256": lambda body: base64.b64encode(hashlib.sha256(body).digest()).decode(),
    "Content-MD5": lambda body: base64.b64encode(hashlib.md5(body).digest()).decode(),
}


# -- HTTP plumbing ---------------------------------------------------------------------------


def _read_line(reader: io.BufferedReader) -> bytes:
    return reader.readline(_MAX_HEAD)


def _read_request_head(reader: io.BufferedReader) -> RequestHead | None:
    request_line = _read_line(reader)
    if not request_line:
        return None
    method, target, _version = request_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    return RequestHead(method, target, tuple(_read_headers(reader)))


def _read_headers(reader: io.BufferedReader) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    while True:
        line = _read_line(reader)
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))


def _body_chunks(reader: io.BufferedReader, head: RequestHead) -> Iterable[bytes]:
    """The request body exactly as sent (chunked framing included), piece by piece."""
    if "chunked" in (head.header("Transfer-Encoding") or "").lower():
        while True:
            size_line = _read_line(reader)
            if not size_line:
                raise ConnectionError("client closed inside a chunked body")
            yield size_line
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = _read_line(reader)
                    yield trailer
                    if trailer in (b"\r\n", b"\n", b""):
                        return
            remaining = size + 2  # the data and its CRLF
            while remaining:
                piece = reader.read(min(remaining, _COPY_CHUNK))
                if not piece:
                    raise ConnectionError("client closed inside a chunk")
                remaining -= len(piece)
                yield piece
        return
    remaining = int(head.header("Content-Length") or 0)
    while remaining:
        piece = reader.read(min(remaining, _COPY_CHUNK))
        if not piece:
            raise ConnectionError("client closed inside the body")
        remaining -= len(piece)
        yield piece


def _drain_body(reader: io.BufferedReader, head: RequestHead) -> None:
    for _ in _body_chunks(reader, head):
        pass


def _read_part_of_body(reader: io.BufferedReader, head: RequestHead) -> int:
    """Read about half the body (at least one byte): the reset then lands in its middle."""
    length = head.header("Content-Length")
    want = max(1, int(length) // 2) if length and length.isdigit() else 1
    got = 0
    for piece in _body_chunks(reader, head):
        got += len(piece)
        if got >= want:
            break
    return got


def _send_answer(sock: socket.socket, head: RequestHead, status: int, body: bytes,
                 extra: tuple[tuple[str, str], ...] = ()) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: application/xml",
             f"Content-Length: {len(body)}", "x-amz-request-id: FAULTPROXY",
             *(f"{name}: {value}" for name, value in extra), "Connection: close"]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head.method == "HEAD" else body))


def _forward_request(reader: io.BufferedReader, upstream: socket.socket, head: RequestHead,
                     body: bytes | None = None) -> None:
    """The request as received; ``body``: already read (and maybe changed) by the proxy."""
    headers = [(name, value) for name, value in head.headers if name.lower() not in _HOP_BY_HOP]
    text = f"{head.method} {head.target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    upstream.sendall((text + "Connection: close\r\n\r\n").encode("latin-1"))
    if body is not None:
        upstream.sendall(body)
        return
    for piece in _body_chunks(reader, head):
        upstream.sendall(piece)


def _forward_response(upstream: socket.socket, sock: socket.socket, on_answer: Callable[[], None]) -> None:
    with cast(io.BufferedReader, upstream.makefile("rb", buffering=_COPY_CHUNK)) as reader:
        _relay_response(reader, sock, on_answer)


def _relay_response(reader: io.BufferedReader, sock: socket.socket, on_answer: Callable[[], None]) -> None:
    while True:
        status_line = _read_line(reader)
        if not status_line:
            raise ConnectionError("the server closed without answering")
        headers = _read_headers(reader)
        if not status_line.split(b" ", 2)[1].startswith(b"1"):
            break  # an interim 1xx answer is the proxy's own business, never forwarded
    on_answer()
    kept = [(name, value) for name, value in headers if name.lower() not in _HOP_BY_HOP]
    text = status_line.decode("latin-1") + "".join(f"{n}: {v}\r\n" for n, v in kept) + "Connection: close\r\n\r\n"
    sock.sendall(text.encode("latin-1"))
    # The server was asked to close after this answer: everything up to EOF is the body.
    while piece := reader.read1(_COPY_CHUNK):
        sock.sendall(piece)


def _read_until_eof(upstream: socket.socket) -> None:
    while upstream.recv(_COPY_CHUNK):
        pass


def _wait_for_close(sock: socket.socket, seconds: float, stopping: threading.Event) -> bool:
    """Hold the connection silently; True if the client closed it first (it timed out)."""
    readable, _, _ = select.select([sock], [], [], seconds)
    if not readable or stopping.is_set():
        return False
    try:
        return sock.recv(1) == b""
    except OSError:
        return not stopping.is_set()


def _reset(sock: socket.socket, reader: io.BufferedReader) -> None:
    """Close with SO_LINGER 0: the kernel answers with RST, not FIN. (The socket's file must be
    closed first: a socket with a file open on it is not really closed.)"""
    reader.close()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _close(sock: socket.socket, reader: io.BufferedReader) -> None:
    reader.close()
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()
