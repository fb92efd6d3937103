"""A small file's PutObject without a waiting thread (``--transport crt``).

The dispatching thread reads and hashes a small file, hands its PUT to the CRT, and the
CRT's completion callback ends it: no pool worker per small file. What this module proves,
beyond the behaviour tests that already run every upload through it on the CRT transport
(test_faults, test_throttle, test_crash, test_signals: retries, 429 and SlowDown,
--bwlimit, timeouts, crash points):

- an asynchronous PUT stores what put_object() stores;
- its attempts follow the one retry policy: back off and send again, end at once on an
  answer no attempt can cure, end with the last error once the attempts are spent;
- an attempt whose answer never comes is cancelled after the read timeout and sent again;
- the upload really sends small files this way (the pool's path is never taken), and
  only where every layer of the store offers it;
- the dispatcher's exit waits for every PUT still out.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli
from faultproxy import Canned, FaultProxy, Rule, operation_is
from test_crash import write_tree

from archup.dispatch import Dispatcher
from archup.errors import DestinationError, TransferError
from archup.store import Credentials, StoreConfig, TransportKind, async_puts, open_store
from archup.store.crt import CrtPut, CrtPutStore, Endpoint
from archup.store.memory import MemoryStore
from archup.store.retry import RetryPolicy
from archup.store.wrappers import CrashPointStore, RateLimitedStore, StoreWrapper
from archup.uploader import Uploader

ACCESS_DENIED = Canned(403, "AccessDenied", "Access Denied")


class Ended:
    """The ``done`` of one asynchronous PUT, as a future of (etag, error)."""

    def __init__(self) -> None:
        self.future: Future[tuple[str | None, Exception | None]] = Future()
        self.threads: list[str] = []

    def __call__(self, etag: str | None, error: Exception | None) -> None:
        self.threads.append(threading.current_thread().name)
        self.future.set_result((etag, error))

    def result(self) -> tuple[str | None, Exception | None]:
        return self.future.result(timeout=60)


def _crt_put(endpoint_url: str, bucket: str, *, attempts: int = 3, read_timeout: float = 10.0) -> CrtPut:
    host = endpoint_url.split("://", 1)[1].rstrip("/")
    # No jitter: every back-off is 0 s, so the test waits for nothing but the answers.
    return CrtPut(Endpoint("http", host, f"/{bucket}/", "us-east-1"), Credentials("testing", "testing", None),
                  retry=RetryPolicy(attempts=attempts, jitter=lambda: 0.0), connect_timeout=2,
                  read_timeout=read_timeout, max_connections=4, sign_payload=False)


def _puts(proxy: FaultProxy) -> Callable[[str], int]:
    return lambda outcome: proxy.snapshot().by_operation[("PutObject", outcome)]


def test_an_asynchronous_put_stores_what_put_object_stores(moto_endpoint: str, bucket: str, s3: Any) -> None:
    store = open_store(StoreConfig(bucket=bucket, endpoint_url=moto_endpoint, transport=TransportKind.CRT))
    puts = async_puts(store)
    assert isinstance(store, CrtPutStore) and puts is store
    body = b"the same bytes\n" * 100
    digest = hashlib.sha256(body).digest()
    arguments: dict[str, Any] = dict(sha256_digest=digest, metadata={"archup-sha256": digest.hex()},
                                     content_type="text/plain", archive=True)
    waited = store.put_object("sync/a.txt", body, **arguments)
    ended = Ended()
    puts.put_object_async("async/a.txt", body, done=ended, **arguments)
    etag, error = ended.result()
    assert error is None and etag == waited
    assert not any(name.startswith("archup-upload") for name in ended.threads)

    def stored(key: str) -> dict[str, Any]:
        head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        return {name: head.get(name) for name in ("ETag", "ContentType", "Metadata", "ContentLength",
                                                  "ChecksumSHA256", "ChecksumCRC64NVME", "StorageClass")}

    assert stored("async/a.txt") == stored("sync/a.txt")
    assert s3.get_object(Bucket=bucket, Key="async/a.txt")["Body"].read() == body


def test_an_asynchronous_put_backs_off_and_sends_again(moto_endpoint: str, bucket: str, s3: Any) -> None:
    with FaultProxy(moto_endpoint, rules=[Rule(operation_is("PutObject"), "503", times=2)]) as proxy:
        ended = Ended()
        _crt_put(proxy.url, bucket).put_async("k/retried.txt", b"again\n", [], what="PutObject k", done=ended)
        etag, error = ended.result()
        assert error is None and etag
        assert (_puts(proxy)("503"), _puts(proxy)("forwarded")) == (2, 1)
    assert s3.get_object(Bucket=bucket, Key="k/retried.txt")["Body"].read() == b"again\n"


def test_an_answer_no_attempt_can_cure_ends_it_at_once(moto_endpoint: str, bucket: str) -> None:
    with FaultProxy(moto_endpoint, rules=[Rule(operation_is("PutObject"), ACCESS_DENIED)]) as proxy:
        ended = Ended()
        _crt_put(proxy.url, bucket).put_async("k/denied.txt", b"x", [], what="PutObject k", done=ended)
        etag, error = ended.result()
        assert etag is None and isinstance(error, DestinationError) and "AccessDenied" in str(error)
        assert proxy.snapshot().requests == 1


def test_attempts_spent_end_with_the_last_error(moto_endpoint: str, bucket: str) -> None:
    with FaultProxy(moto_endpoint, rules=[Rule(operation_is("PutObject"), "500")]) as proxy:
        ended = Ended()
        _crt_put(proxy.url, bucket, attempts=3).put_async("k/lost.txt", b"x", [], what="PutObject k", done=ended)
        etag, error = ended.result()
        assert etag is None and isinstance(error, TransferError) and "InternalError" in str(error)
        assert _puts(proxy)("500") == 3 and _puts(proxy)("forwarded") == 0


def test_an_answer_that_never_comes_is_cancelled_and_sent_again(moto_endpoint: str, bucket: str,
                                                                 s3: Any) -> None:
    rules = [Rule(operation_is("PutObject"), "stall", times=1)]
    with FaultProxy(moto_endpoint, rules=rules, stall_seconds=300) as proxy:  # past the wait below
        ended = Ended()
        _crt_put(proxy.url, bucket, read_timeout=1.0).put_async("k/stalled.txt", b"late\n", [],
                                                               what="PutObject k", done=ended)
        etag, error = ended.result()
        assert error is None and etag
        assert (_puts(proxy)("stall"), _puts(proxy)("forwarded")) == (1, 1)
    assert s3.get_object(Bucket=bucket, Key="k/stalled.txt")["Body"].read() == b"late\n"


@pytest.mark.parametrize("transport", ["crt", "botocore"])
def test_small_files_are_sent_by_no_pool_worker_on_the_crt(transport: str, cli: Cli, s3: Any, bucket: str,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's single-PUT path refuses to run here: the CRT's upload never takes it,
    botocore's (which has no asynchronous PUT) fails every file through it."""
    def refused(self: Uploader, record: Any, path: str) -> None:
        self.outcomes.failed(record, "sent by a pool worker")

    monkeypatch.setattr(Uploader, "_send_single", refused)
    files = {f"d{index % 4}/f{index}.txt": f"file {index}\n".encode() * (index + 1) for index in range(40)}
    source = write_tree(tmp_path / "src", files)
    result = cli("upload", "--json", "--transport", transport, "--parallel", "4", str(source))
    if transport == "botocore":
        assert result.exit_code != 0 and "sent by a pool worker" in result.stdout + result.stderr
        return
    assert result.exit_code == 0, result.stderr
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    stored = {item["Key"].split("/files/", 1)[1] for item in listed if "/files/" in item["Key"]}
    assert stored == set(files)


class _Offer:
    """An asynchronous PUT that ends at once (for the layers' rule, not a store)."""

    bucket = "offer"

    def __init__(self) -> None:
        self.sent: list[str] = []

    def async_puts(self) -> _Offer:
        return self

    def put_object_async(self, key: str, body: bytes, *, done: Callable[[str | None, Exception | None], None],
                         **_: Any) -> None:
        self.sent.append(key)
        done("etag", None)


class _Overriding(StoreWrapper):
    def put_object(self, key: str, body: bytes, **kwargs: Any) -> str:
        return super().put_object(key, body, **kwargs)


def test_a_layer_that_changes_put_object_turns_asynchronous_puts_off() -> None:
    offer = _Offer()
    assert async_puts(StoreWrapper(offer)) is offer  # type: ignore[arg-type]
    assert async_puts(_Overriding(offer)) is None  # type: ignore[arg-type]
    assert async_puts(MemoryStore("b")) is None
    assert async_puts(StoreWrapper(MemoryStore("b"))) is None


def test_the_crash_point_layer_keeps_them_only_where_the_request_has_its_hook() -> None:
    offer = _Offer()
    assert async_puts(CrashPointStore(offer)) is None  # type: ignore[arg-type]

    class Hooked(_Offer):
        def before_send(self, operation: str, hook: Callable[[str], None]) -> None:
            pass

    hooked = Hooked()
    assert async_puts(CrashPointStore(hooked)) is hooked  # type: ignore[arg-type]


def test_bwlimit_paces_asynchronous_puts_from_the_sending_thread() -> None:
    now = [100.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    offer = _Offer()
    limited = RateLimitedStore(offer, 1000, clock=lambda: now[0], sleep=sleep)  # type: ignore[arg-type]
    puts = async_puts(limited)
    assert puts is not None and puts is not offer
    ends: list[str | None] = []
    for index in range(3):
        puts.put_object_async(f"k{index}", b"x" * 500, done=lambda etag, error: ends.append(etag))
    assert offer.sent == ["k0", "k1", "k2"] and ends == ["etag"] * 3
    assert waits == [0.5, 0.5]  # 500 bytes at 1,000 bytes/s: the second and third wait their turn


def test_leaving_the_dispatcher_waits_for_every_hold_given_back() -> None:
    dispatcher = Dispatcher(2, 1000, lambda error: None)
    leaving, left = threading.Event(), threading.Event()
    seen: list[bool] = []

    def callback(release: Callable[[], None]) -> None:
        leaving.wait(timeout=30)
        seen.append(left.wait(timeout=0.5))  # True only if the exit did not wait for this release
        release()
        release()  # a second call gives nothing back twice

    with dispatcher.running():
        release = dispatcher.hold(600)
        assert dispatcher.budget.available == 400
        worker = threading.Thread(target=callback, args=(release,))
        worker.start()
        leaving.set()
    left.set()
    worker.join(timeout=30)
    assert seen == [False]
    assert dispatcher.budget.available == 1000
    # every stream is back: as many holds as streams succeed without blocking
    releases = [dispatcher.hold(1) for _ in range(2)]
    for give_back in releases:
        give_back()
    assert dispatcher.budget.available == 1000


def test_holds_and_pool_requests_share_the_parallel_streams() -> None:
    """--parallel 1: while a PUT sent without a thread is out, no pool request starts."""
    dispatcher = Dispatcher(1, 1000, lambda error: None)
    started = threading.Event()
    with dispatcher.running():
        release = dispatcher.hold(10)
        dispatcher.submit(started.set)
        assert not started.wait(timeout=0.3)  # the only stream is held
        release()
        assert started.wait(timeout=30)


ORIGINAL = b"the bytes archup read and hashed\n" * 8


@pytest.mark.parametrize("change", ["rewrite", "truncate"])
def test_a_file_changed_after_its_read_is_stored_as_it_was_read(change: str, cli: Cli, s3: Any, bucket: str,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The CRT reads a small file again itself as its PUT leaves; the file is rewritten just
    then (after archup's read and hash). The object must still be the bytes archup hashed
    and recorded: the PUT is sent again from memory."""
    import archup.run

    source = write_tree(tmp_path / "src", {"a.txt": ORIGINAL, "b.txt": b"unchanged\n"})
    changed: list[str] = []

    def rewrite(url: str) -> None:
        if url.endswith("/files/a.txt") and not changed:
            changed.append(url)
            with open(source / "a.txt", "r+b") as handle:  # the same inode: the held descriptor sees it
                if change == "rewrite":
                    handle.write(ORIGINAL.upper())
                else:
                    handle.truncate(5)

    real_open_store = archup.run.open_store

    def opening(config: Any) -> Any:
        store = real_open_store(config)
        store.before_send("PutObject", rewrite)
        return store

    monkeypatch.setattr(archup.run, "open_store", opening)
    result = cli("upload", "--json", "--transport", "crt", str(source))
    assert result.exit_code == 0, result.stderr
    assert changed
    prefix = f"staging/{json.loads(result.stdout)['batch_id']}/"
    stored = s3.get_object(Bucket=bucket, Key=prefix + "files/a.txt")
    assert stored["Body"].read() == ORIGINAL
    assert stored["Metadata"]["archup-sha256"] == hashlib.sha256(ORIGINAL).hexdigest()


def test_a_hold_waiting_for_bytes_keeps_no_stream_from_the_parts_that_free_them() -> None:
    """A large file's reader holds the budget in a part's buffer; a small file's hold waits
    for bytes. The part must still get a stream to be sent (and free the bytes): the hold
    takes its bytes before its stream, as a part does."""
    dispatcher = Dispatcher(1, 100, lambda error: None)
    held: list[Callable[[], None]] = []
    sent = threading.Event()
    with dispatcher.running():
        part = dispatcher.buffer(100)  # the whole budget
        holder = threading.Thread(target=lambda: held.append(dispatcher.hold(10)))
        holder.start()
        assert dispatcher.budget.waiting_count(1, timeout=30)

        def send_part() -> None:
            sent.set()
            part.release()

        dispatcher.submit(send_part)
        try:
            assert sent.wait(timeout=30)
        finally:  # whatever happened, let everything end (a deadlock here would hang the suite)
            if not sent.is_set():
                part.release()
            holder.join(timeout=30)
            for release in held:
                release()
        assert len(held) == 1


def test_a_stop_while_waiting_for_a_stream_starts_no_further_file(cli: Cli, s3: Any, bucket: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--parallel 1: the dispatching thread waits in hold() for b.txt's stream while a.txt's PUT
    is out, and the stop comes then (set as that wait begins). b.txt must stay pending for the
    resumer, as a pool task queued before the stop does, not be read and sent once a.txt ends."""
    source = write_tree(tmp_path / "src", {"a.txt": b"first\n", "b.txt": b"second\n"})
    uploaders: list[Uploader] = []
    real_init, real_hold = Uploader.__init__, Dispatcher.hold
    holds: list[int] = []

    def init(self: Uploader, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        uploaders.append(self)

    def hold(self: Dispatcher, size: int) -> Callable[[], None]:
        holds.append(size)
        if len(holds) == 2:  # b.txt's: a.txt's PUT holds the one stream
            uploaders[-1].stop.set()
        return real_hold(self, size)

    monkeypatch.setattr(Uploader, "__init__", init)
    monkeypatch.setattr(Dispatcher, "hold", hold)
    result = cli("upload", "--json", "--transport", "crt", "--parallel", "1", str(source))
    assert result.exit_code == 130, result.stderr
    assert len(holds) == 2
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert sorted(item["Key"].rsplit("/files/", 1)[1] for item in listed if "/files/" in item["Key"]) == ["a.txt"]
