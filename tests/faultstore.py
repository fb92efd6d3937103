"""A fault-injecting ObjectStore for the engine's failure tests: a wrapper (as
archup.store.wrappers) over any store, usually the in-memory one, that follows a script.

A test says what goes wrong, in the store's own terms (an operation, a key, the nth call),
instead of patching archup's internals::

    faults = Faults()
    faults.fail("upload_part", "*/big.bin", TransferError("UploadPart: 500", "InternalError"), nth=2)
    faults.corrupt("put_object", "*/a.txt")            # the body changes on its way
    held = faults.hold("put_object", "*/slow.bin")     # the call waits until held.release.set()
    faults.after("check_bucket", do=lambda call: ...)  # something happens once the call returned
    store = faults.wrap(MemoryStore("b"))

A rule applies to the calls of its operation whose key matches its pattern (fnmatch; the
first argument of the call: a key, a prefix for the listings, "" for check_bucket), from the
nth such call, ``times`` times (None: every one from then on). Every call is recorded in
``faults.calls``. One Faults may wrap several stores (a command opens one per batch): the
rules and counts are shared.

The ``store_faults`` fixture (conftest.py) puts every store the CLI's commands open behind
one Faults, so a test of the whole command scripts its faults the same way.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from archup.store import MultipartChecksum, ObjectInfo, ObjectReader, ObjectStore, OpenUpload, UploadedPart
from archup.store.wrappers import StoreWrapper

# How long a held call waits for its release before it fails the test (never a silent hang).
HOLD_TIMEOUT = 60.0


@dataclass
class Call:
    """One call that reached the store."""

    operation: str
    key: str
    part_number: int | None = None
    body: bytes | None = None  # as it went on (corrupted, if a rule said so)


@dataclass
class Rule:
    operation: str
    pattern: str
    nth: int = 1
    times: int | None = 1
    part_number: int | None = None
    error: BaseException | Callable[[Call], BaseException] | None = None
    before: Callable[[Call], None] | None = None
    after: Callable[[Call], None] | None = None
    corrupt: bool = False
    release: threading.Event | None = None
    matched: int = 0                                               # matching calls seen so far
    fired: threading.Event = field(default_factory=threading.Event)  # set when the rule first applied
    applied: int = 0

    def matches(self, call: Call) -> bool:
        return (self.operation in (call.operation, "*") and fnmatch.fnmatchcase(call.key, self.pattern)
                and (self.part_number is None or self.part_number == call.part_number))

    def due(self) -> bool:
        """Counts a matching call; whether the rule applies to it."""
        self.matched += 1
        if self.matched < self.nth:
            return False
        return self.times is None or self.applied < self.times


def flip_a_byte(body: bytes | bytearray) -> bytes:
    """The body with one byte altered (its middle one): same size, other bytes."""
    if not body:
        return b"\x00"
    middle = len(body) // 2
    return bytes(body[:middle]) + bytes([body[middle] ^ 0xFF]) + bytes(body[middle + 1:])


class Faults:
    """The script: rules, and the calls seen by every store it wraps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rules: list[Rule] = []
        self.calls: list[Call] = []
        self.stores: list[FaultStore] = []

    def wrap(self, inner: ObjectStore) -> FaultStore:
        store = FaultStore(inner, self)
        with self._lock:
            self.stores.append(store)
        return store

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail(self, operation: str, pattern: str = "*", error: BaseException | Callable[[Call], BaseException]
             | None = None, *, nth: int = 1, times: int | None = 1, part_number: int | None = None) -> Rule:
        """The call raises ``error`` (an instance, or made from the call) instead of reaching the store."""
        assert error is not None, "fail() needs the error to raise"
        return self.add(Rule(operation, pattern, nth, times, part_number, error=error))

    def corrupt(self, operation: str, pattern: str = "*", *, nth: int = 1, times: int | None = 1,
                part_number: int | None = None) -> Rule:
        """The body reaches the store with one byte altered (bytes damaged in flight)."""
        assert operation in ("put_object", "put_if_absent", "upload_part"), f"{operation} sends no body"
        return self.add(Rule(operation, pattern, nth, times, part_number, corrupt=True))

    def hold(self, operation: str, pattern: str = "*", *, nth: int = 1, times: int | None = 1,
             part_number: int | None = None) -> Rule:
        """The call waits before it reaches the store until ``rule.release`` is set;
        ``rule.fired`` says that a call is waiting."""
        return self.add(Rule(operation, pattern, nth, times, part_number, release=threading.Event()))

    def before(self, operation: str, pattern: str = "*", *, do: Callable[[Call], None], nth: int = 1,
               times: int | None = 1, part_number: int | None = None) -> Rule:
        """``do(call)`` runs as the call arrives, before the store has it."""
        return self.add(Rule(operation, pattern, nth, times, part_number, before=do))

    def after(self, operation: str, pattern: str = "*", *, do: Callable[[Call], None], nth: int = 1,
              times: int | None = 1, part_number: int | None = None) -> Rule:
        """``do(call)`` runs once the store answered the call, before the answer goes back."""
        return self.add(Rule(operation, pattern, nth, times, part_number, after=do))

    def count(self, operation: str, pattern: str = "*") -> int:
        """How many calls of ``operation`` on keys matching ``pattern`` reached the store (or failed at it)."""
        with self._lock:
            return sum(1 for call in self.calls if call.operation == operation
                       and fnmatch.fnmatchcase(call.key, pattern))

    def _due(self, call: Call) -> list[Rule]:
        with self._lock:
            self.calls.append(call)
            due = [rule for rule in self.rules if rule.matches(call) and rule.due()]
            for rule in due:
                rule.applied += 1
        return due

    def through(self, operation: str, key: str, send: Callable[[bytes | None], Any], *,
                body: bytes | bytearray | None = None, part_number: int | None = None) -> Any:
        """Apply the rules due for this call around ``send(body)``, which calls the store inside."""
        call = Call(operation, key, part_number, None if body is None else bytes(body))
        due = self._due(call)
        for rule in due:
            if rule.corrupt and call.body is not None:
                call.body = flip_a_byte(call.body)
        for rule in due:
            rule.fired.set()
            if rule.before is not None:
                rule.before(call)
            if rule.release is not None and not rule.release.wait(HOLD_TIMEOUT):
                raise AssertionError(f"{operation} {key}: held {HOLD_TIMEOUT} s and never released")
            if rule.error is not None:
                raise rule.error if isinstance(rule.error, BaseException) else rule.error(call)
        answer = send(call.body)
        for rule in due:
            if rule.after is not None:
                rule.after(call)
        return answer


class FaultStore(StoreWrapper):
    """Every call goes through its Faults' rules, then to the store inside."""

    def __init__(self, inner: ObjectStore, faults: Faults) -> None:
        super().__init__(inner)
        self.faults = faults

    def check_bucket(self) -> None:
        self.faults.through("check_bucket", "", lambda _: super(FaultStore, self).check_bucket())

    def put_object(self, key: str, body: bytes, *, sha256_digest: bytes | None = None,
                   metadata: dict[str, str] | None = None, content_type: str | None = None,
                   archive: bool = False) -> str:
        return self.faults.through("put_object", key, lambda sent: super(FaultStore, self).put_object(
            key, sent, sha256_digest=sha256_digest, metadata=metadata, content_type=content_type,
            archive=archive), body=body)

    def put_if_absent(self, key: str, body: bytes, *, content_type: str = "application/json",
                      metadata: dict[str, str] | None = None) -> str | None:
        return self.faults.through("put_if_absent", key, lambda sent: super(FaultStore, self).put_if_absent(
            key, sent, content_type=content_type, metadata=metadata), body=body)

    def head(self, key: str) -> ObjectInfo | None:
        return self.faults.through("head", key, lambda _: super(FaultStore, self).head(key))

    def get_bytes(self, key: str) -> bytes:
        return self.faults.through("get_bytes", key, lambda _: super(FaultStore, self).get_bytes(key))

    def open_object(self, key: str, *, start: int = 0, length: int | None = None,
                    if_match: str | None = None) -> ObjectReader | None:
        return self.faults.through("open_object", key, lambda _: super(FaultStore, self).open_object(
            key, start=start, length=length, if_match=if_match))

    def list_objects(self, prefix: str, start_after: str | None = None) -> Iterator[ObjectInfo]:
        return self.faults.through("list_objects", prefix, lambda _: super(FaultStore, self).list_objects(
            prefix, start_after))

    def delete_prefix(self, prefix: str) -> int:
        return self.faults.through("delete_prefix", prefix, lambda _: super(FaultStore, self).delete_prefix(prefix))

    def create_multipart(self, key: str, checksum: MultipartChecksum, *, metadata: dict[str, str] | None = None,
                         content_type: str | None = None) -> str:
        return self.faults.through("create_multipart", key, lambda _: super(FaultStore, self).create_multipart(
            key, checksum, metadata=metadata, content_type=content_type))

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes | bytearray,
                    checksum: MultipartChecksum, *, crc: int | None = None) -> UploadedPart:
        return self.faults.through("upload_part", key, lambda sent: super(FaultStore, self).upload_part(
            key, upload_id, part_number, sent, checksum, crc=crc), body=body, part_number=part_number)

    def complete_multipart(self, key: str, upload_id: str, parts: list[UploadedPart], checksum: MultipartChecksum,
                           *, full_crc: int | None = None, size: int | None = None) -> str:
        return self.faults.through("complete_multipart", key, lambda _: super(FaultStore, self).complete_multipart(
            key, upload_id, parts, checksum, full_crc=full_crc, size=size))

    def list_parts(self, key: str, upload_id: str) -> OpenUpload | None:
        return self.faults.through("list_parts", key, lambda _: super(FaultStore, self).list_parts(key, upload_id))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.faults.through("abort_multipart", key, lambda _: super(FaultStore, self).abort_multipart(key, upload_id))

    def list_multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str]]:
        return self.faults.through("list_multipart_uploads", prefix,
                                   lambda _: super(FaultStore, self).list_multipart_uploads(prefix))


def innermost(store: Any) -> Any:
    """The store at the bottom of a stack of wrappers (the S3 store, or the in-memory one)."""
    while hasattr(store, "inner"):
        store = store.inner
    return store
