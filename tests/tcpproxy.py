"""A TCP proxy on 127.0.0.1 for network-partition tests: clients connect to ``proxy.port`` and
their bytes go to the target (a test PostgreSQL server) and back, until the test says otherwise.

- ``cut()``: a partition. From the moment it returns no byte crosses in either direction, and
  every socket stays open and silent: neither peer sees a FIN or an RST, their bytes just stop.
  New connections are still accepted (by the kernel, as a listening socket does) and then hang
  the same way: they reach the target only after ``heal()``.
- ``heal()``: bytes flow again, on new connections and on the existing ones. Nothing is dropped:
  bytes sent during the cut wait (in the kernel's buffers and the proxy's) and are delivered in
  order after the heal, as TCP's retransmissions deliver them when a real partition ends, if
  neither peer gave up meanwhile.
- ``reset_all()``: every connection is closed with an RST on both sides (``SO_LINGER`` 0), as a
  firewall or a dying middlebox does.
- ``close()``: stops accepting and resets every connection; threads end within a poll interval.
- ``bytes_to_client`` and ``bytes_to_target``: what crossed, counted as the proxy hands it on
  (read them after ``close()``, when no thread moves a byte any more). With ``record=True``
  the proxy also keeps what each connection sent to the target, and ``requests()`` reads the
  HTTP/1.1 requests out of it (for a test that counts a client's GETs and their ranges).

What a user-space proxy cannot do: the proxy's kernel keeps acknowledging what the peers send,
and answers their TCP keepalives, while cut. So a peer's TCP-level detection
(``keepalives_*``, ``tcp_user_timeout``) does not fire during a ``cut()`` as it would in a real
partition; only application-level timeouts (``connect_timeout``, a watchdog, a deadline around a
query) notice it. A cut that the kernel could see needs packet filtering, which tests do not have.

One daemon thread accepts; one daemon thread per connection moves bytes both ways with
non-blocking sockets and ``poll()`` (so a peer that does not read cannot stall the other
direction), at most ``_BUFFER_CAP`` bytes held per direction.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from typing import Final

_POLL_SECONDS: Final = 0.05  # how soon a thread notices close(), reset_all() or heal()
_CHUNK: Final = 64 * 1024
_BUFFER_CAP: Final = 1024 * 1024
_CONNECT_SECONDS: Final = 10.0
_JOIN_SECONDS: Final = 5.0


class TcpProxy:
    """Forwards 127.0.0.1:``port`` (an ephemeral port) to ``target_host``:``target_port``."""

    def __init__(self, target_host: str, target_port: int, *, record: bool = False) -> None:
        self.target = (target_host, target_port)
        self.record = record
        self.bytes_to_client = 0
        self.bytes_to_target = 0
        self._sent_to_target: list[bytearray] = []  # one per connection, with record=True
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._closing = threading.Event()
        # Held while a byte is moved, and to flip _flowing: once cut() returns, nothing crosses.
        self._gate = threading.Lock()
        self._flowing = True
        self._healed = threading.Event()  # set whenever _flowing is: what a held new connection waits for
        self._healed.set()
        self._links: set[_Link] = set()
        self._links_lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the proxy is not started")
        return int(self._listener.getsockname()[1])

    @property
    def connection_count(self) -> int:
        """Connections accepted and not yet closed."""
        with self._links_lock:
            return len(self._links)

    def start(self) -> TcpProxy:
        if self._listener is not None:
            raise RuntimeError("the proxy is already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(_POLL_SECONDS)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"tcpproxy-{self.port}", daemon=True)
        self._accept_thread.start()
        return self

    def cut(self) -> None:
        """Stop forwarding in both directions; connections stay open and silent."""
        with self._gate:
            self._flowing = False
            self._healed.clear()

    def heal(self) -> None:
        """Forward again; bytes held during the cut are delivered, in order."""
        with self._gate:
            self._flowing = True
            self._healed.set()

    def reset_all(self) -> None:
        """Close every current connection with an RST to both peers; returns when they are closed."""
        with self._links_lock:
            links = list(self._links)
        for link in links:
            link.reset_requested.set()
        for link in links:
            link.thread.join(_JOIN_SECONDS)

    def close(self) -> None:
        """Stop accepting, reset every connection, and wait (bounded) for the threads to end."""
        self._closing.set()
        self._healed.set()  # wakes connections held by a cut, so they see _closing
        if self._accept_thread is not None:
            self._accept_thread.join(_JOIN_SECONDS)
        if self._listener is not None:
            self._listener.close()
        self.reset_all()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """(method, target, headers with lower-case names) of each HTTP/1.1 request sent through
        the proxy, with ``record=True``; bodies are skipped by their Content-Length."""
        found = []
        for stream in self._sent_to_target:
            data = bytes(stream)
            while data:
                head, sep, rest = data.partition(b"\r\n\r\n")
                if not sep:
                    break
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                found.append((method, target, headers))
                data = rest[int(headers.get("content-length", "0")):]
        return found

    # -- threads ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return  # the listener was closed
            link = _Link(self, client, name=f"tcpproxy-{self.port}-link-{client.fileno()}")
            with self._links_lock:
                self._links.add(link)
            link.thread.start()

    def _forget(self, link: _Link) -> None:
        with self._links_lock:
            self._links.discard(link)


class _Link:
    """One client connection and its upstream connection, moved by one thread."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, name: str) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.reset_requested = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.sent_to_target: bytearray | None = None
        if proxy.record:
            self.sent_to_target = bytearray()
            with proxy._links_lock:
                proxy._sent_to_target.append(self.sent_to_target)

    def _stopping(self) -> bool:
        return self.reset_requested.is_set() or self.proxy._closing.is_set()

    def _run(self) -> None:
        try:
            upstream = self._connect_upstream()
            if upstream is None:
                _reset(self.client)
                return
            self.upstream = upstream
            self._pump(self.client, upstream)
        finally:
            self.proxy._forget(self)

    def _connect_upstream(self) -> socket.socket | None:
        # A connection accepted during a cut reaches the target only after heal(): until then the
        # client has sent its first bytes into silence, as a SYN into a partition would be.
        while not self.proxy._healed.wait(_POLL_SECONDS):
            if self._stopping():
                return None
        if self._stopping():
            return None
        try:
            return socket.create_connection(self.proxy.target, timeout=_CONNECT_SECONDS)
        except OSError:
            return None  # target down: the client sees an RST, as it would connecting directly

    def _forward(self, to_client: bool, outbox: bytearray) -> None:
        """Send what outbox holds to its socket, counting (and with record=True keeping) what went."""
        sock = self.client if to_client else self.upstream
        assert sock is not None
        pending = bytes(outbox) if not to_client and self.sent_to_target is not None else b""
        sent = _send(sock, outbox)
        if to_client:
            self.proxy.bytes_to_client += sent
        else:
            self.proxy.bytes_to_target += sent
            if self.sent_to_target is not None:
                self.sent_to_target += pending[:sent]

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        client.setblocking(False)
        upstream.setblocking(False)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # to_upstream holds bytes read from the client, not yet written upstream; and the reverse.
        to_upstream, to_client = bytearray(), bytearray()
        client_eof = upstream_eof = False  # that side sent FIN
        upstream_shut = client_shut = False  # we passed the FIN on
        proxy = self.proxy
        poller = select.poll()
        registered: dict[int, int] = {}
        try:
            while not (upstream_shut and client_shut):
                if self._stopping():
                    _reset(client, upstream)
                    return
                if not proxy._flowing:
                    # Cut: touch no socket (not even poll it, whose hang-up and error events
                    # cannot be masked and would spin); bytes wait in the kernel.
                    proxy._healed.wait(_POLL_SECONDS)
                    continue
                for sock, mask in ((client, _events(client_eof, len(to_upstream), to_client)),
                                   (upstream, _events(upstream_eof, len(to_client), to_upstream))):
                    _watch(poller, registered, sock, mask)
                ready = poller.poll(_POLL_SECONDS * 1000)
                with proxy._gate:
                    if not proxy._flowing:
                        continue  # cut while we polled: move nothing
                    for fd, event in ready:
                        sock = client if fd == client.fileno() else upstream
                        if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                            if _receive(sock, to_upstream if sock is client else to_client) == 0:
                                if sock is client:
                                    client_eof = True
                                else:
                                    upstream_eof = True
                        if event & select.POLLOUT:
                            self._forward(sock is client, to_client if sock is client else to_upstream)
                    # A FIN is passed on only after the bytes before it, like any byte.
                    if client_eof and not to_upstream and not upstream_shut:
                        _shutdown_write(upstream)
                        upstream_shut = True
                    if upstream_eof and not to_client and not client_shut:
                        _shutdown_write(client)
                        client_shut = True
            client.close()
            upstream.close()
        except OSError:
            # One peer reset (or broke) its side: pass that on to the other as an RST too.
            _reset(client, upstream)


def _watch(poller: select.poll, registered: dict[int, int], sock: socket.socket, mask: int) -> None:
    """Poll sock for mask; not at all when mask is empty, as hang-up events come regardless."""
    fd = sock.fileno()
    if registered.get(fd) == mask:
        return
    if mask:
        if fd in registered:
            poller.modify(fd, mask)
        else:
            poller.register(fd, mask)
        registered[fd] = mask
    elif fd in registered:
        poller.unregister(fd)
        del registered[fd]


def _events(eof: bool, held_in: int, outbox: bytearray) -> int:
    """What to poll a socket for: readable while its peer has not sent FIN and the bytes held from
    it are under the cap (so a peer that does not read slows the other down, as TCP would);
    writable while there is something to write to it."""
    events = 0
    if not eof and held_in < _BUFFER_CAP:
        events |= select.POLLIN
    if outbox:
        events |= select.POLLOUT
    return events


def _receive(sock: socket.socket, inbox: bytearray) -> int | None:
    """Read what is there into inbox: the byte count, 0 at EOF, None if nothing was ready."""
    try:
        chunk = sock.recv(_CHUNK)
    except BlockingIOError:
        return None
    inbox += chunk
    return len(chunk)


def _send(sock: socket.socket, outbox: bytearray) -> int:
    """Send what the socket takes of outbox now; how many bytes that was."""
    try:
        sent = sock.send(outbox)
    except BlockingIOError:
        return 0
    del outbox[:sent]
    return sent


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is already gone; its side will show up as EOF or a reset


def _reset(*socks: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends an RST instead of a FIN."""
    for sock in socks:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()
