"""Throttling, retry modes, --bwlimit and the preflight, through the fault-injecting proxy.

archup talks to ``faultproxy.FaultProxy`` (in front of the moto server) over real HTTP through
the real boto3 stack, retries included; every check of the bucket goes to moto directly. See
tests/test_faults.py for the proxy's other faults (and for --retries, checked there exactly:
``test_retries_option_is_the_number_of_retries``) and tests/test_cli_errors.py for a bucket
that does not exist (HeadBucket 404, exit 5).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli, both_transports
from faultproxy import Canned, FaultProxy, RequestHead, Rule, operation_is
from test_crash import write_tree
from test_faults import assert_sealed_with_exactly, list_keys, on_path, one_json_object, only_batch, small_files
from testdata import pattern_bytes

from archup.errors import ExitCode

MiB = 1024 * 1024
PART_SIZE = 5 * MiB
SEED = 20261129


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_endpoint, seed=SEED) as started:
        yield started


@pytest.fixture
def proxied(proxy: FaultProxy, bucket: str, journal_path: Path) -> Cli:
    """archup's CLI (in-process) with its endpoint at the proxy."""
    return Cli(proxy.url, bucket, journal_path)


@pytest.fixture
def adaptive_limiters(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """(client, ClientRateLimiter) of every client botocore builds in adaptive retry mode from
    now on: botocore's client factory registers the limiter through this module function."""
    import botocore.retries.adaptive as adaptive

    registered: list[tuple[Any, Any]] = []
    real = adaptive.register_retry_handler

    def spy(client: Any) -> Any:
        limiter = real(client)
        registered.append((client, limiter))
        return limiter

    monkeypatch.setattr(adaptive, "register_retry_handler", spy)
    return registered


def file_put(head: RequestHead) -> bool:
    return head.operation == "PutObject" and "/files/" in head.path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("archup: error:")]


# -- 429 and SlowDown ----------------------------------------------------------------------------


TOO_MANY_AS_SLOW_DOWN = Canned(429, "SlowDown", "Please reduce your request rate.")


@both_transports
def test_429_answers_are_retried_and_the_batch_completes_byte_identical(
        moto_endpoint: str, s3: Any, bucket: str, tmp_path: Path, journal_path: Path,
        adaptive_limiters: list[tuple[Any, Any]]) -> None:
    """A server answering 429 Too Many Requests (code TooManyRequests, which is not among
    botocore's throttling codes: only the status says so; or code SlowDown) to a fifth of the
    requests, the preflight's HeadBucket and a multipart part included: in the default
    (standard) retry mode every 429 is retried, the batch completes (exit 0) byte-identical,
    and no client-side rate limiter is involved (that is adaptive mode's)."""
    files = small_files(16, seed=SEED)
    files["large/big.bin"] = pattern_bytes(PART_SIZE + 4321, seed=11)
    source = write_tree(tmp_path / "src", files)
    first_file = sorted(files)[0]
    forced = [
        Rule(operation_is("HeadBucket"), "429", times=1),  # a HEAD: the bare status, no body
        Rule(on_path("PutObject", "/files/" + first_file), TOO_MANY_AS_SLOW_DOWN, times=2),
        Rule(operation_is("UploadPart"), "429", times=1),
    ]

    with FaultProxy(moto_endpoint, rate=0.2, seed=SEED, kinds=("429",), rules=forced) as proxy:
        result = Cli(proxy.url, bucket, journal_path)(
            "upload", "--json", "--part-size", "5MiB", "--retries", "10", str(source))
        stats = proxy.snapshot()

    assert result.exit_code == 0, (result.stdout, result.stderr, stats)
    assert [rule.hits for rule in forced] == [1, 2, 1]  # each forced 429 was answered, then retried
    assert_sealed_with_exactly(s3, bucket, one_json_object(result.stdout)["batch_id"], files)
    # The seeded draw added some of its own (the forced "429"s count as faults of that kind too).
    assert stats.canned["TooManyRequests"] == stats.faults["429"] >= 4, stats
    assert stats.canned["SlowDown"] == 2
    # The run went on past every 429 (the proxy never forwards a faulted request): more
    # requests arrived than were forwarded, by exactly the 429s.
    assert stats.requests == stats.forwarded + stats.canned["TooManyRequests"] + stats.canned["SlowDown"]
    assert adaptive_limiters == []


def test_adaptive_retry_mode_engages_the_client_side_rate_limiter_on_slow_down(
        proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str, tmp_path: Path,
        adaptive_limiters: list[tuple[Any, Any]]) -> None:
    """--retry-mode adaptive through 503 SlowDown answers: the batch completes byte-identical,
    archup's one client was built in adaptive mode with the asked attempts, and its
    ClientRateLimiter (botocore's token bucket, idle until a throttling answer) is enabled:
    the SlowDowns reached it. Without a throttling answer it stays disabled (checked first,
    on a clean run, so the check can tell the difference)."""
    files = small_files(12, seed=SEED + 1)
    source = write_tree(tmp_path / "src", files)

    clean = proxied("upload", "--json", "--retry-mode", "adaptive", str(source))

    assert clean.exit_code == 0, (clean.stdout, clean.stderr)
    ((client, limiter),) = adaptive_limiters
    assert client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 5}
    assert limiter._enabled is False  # every answer was a success: no throttling seen

    adaptive_limiters.clear()
    rule = proxy.add_rule(Rule(file_put, "503", times=3))
    throttled = proxied("upload", "--json", "--new-batch", "--retry-mode", "adaptive", "--retries", "6",
                        str(source))

    assert throttled.exit_code == 0, (throttled.stdout, throttled.stderr)
    assert rule.hits == 3 and proxy.snapshot().faults["503"] == 3
    assert_sealed_with_exactly(s3, bucket, one_json_object(throttled.stdout)["batch_id"], files)
    ((client, limiter),) = adaptive_limiters
    assert client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 7}
    assert limiter._enabled is True  # botocore's token bucket now paces every request
    assert limiter._token_bucket.max_rate > 0


# -- --bwlimit -----------------------------------------------------------------------------------


@both_transports
def test_bwlimit_is_one_budget_shared_by_all_workers(proxied: Cli, s3: Any, bucket: str, tmp_path: Path) -> None:
    """3 MiB in 12 files of 256 KiB through 5 workers at --bwlimit 1MiB take at least
    0.6 x 3 s. The limit is one average for the whole run: a body goes at once and the next
    request waits until its bytes are paid for, so small bodies keep the bursts small, and a
    budget per worker (about 0.6 s here) fails. Without --bwlimit the same tree goes too (no
    time asserted)."""
    limit, body = MiB, 256 * 1024
    files = {f"f{index:02d}.bin": pattern_bytes(body, seed=index) for index in range(12)}
    total = sum(len(data) for data in files.values())
    source = write_tree(tmp_path / "src", files)

    started = time.monotonic()
    limited = proxied("upload", "--json", "--parallel", "5", "--bwlimit", "1MiB", str(source))
    elapsed = time.monotonic() - started

    assert limited.exit_code == 0, (limited.stdout, limited.stderr)
    assert_sealed_with_exactly(s3, bucket, one_json_object(limited.stdout)["batch_id"], files)
    assert elapsed >= 0.6 * total / limit, f"{total} bytes at {limit} B/s took only {elapsed:.2f} s"

    free = proxied("upload", "--json", "--parallel", "5", "--new-batch", str(source))
    assert free.exit_code == 0, (free.stdout, free.stderr)
    assert_sealed_with_exactly(s3, bucket, one_json_object(free.stdout)["batch_id"], files)


# -- the preflight: exit 5 before any file is read ----------------------------------------------


def marker_put(head: RequestHead) -> bool:
    return head.operation == "PutObject" and head.path.endswith("/batch.json")


def carries_checksum(head: RequestHead) -> bool:
    return head.method == "PUT" and any(name.lower().startswith("x-amz-checksum-") for name, _ in head.headers)


class SourceSpy:
    """Records every os.open of a path, and every os.scandir of a directory, under ``root``:
    archup reads a file only through os.open (uploader.open_source) and walks with os.scandir."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = str(root.resolve())
        self.opened: list[str] = []
        self.scanned: list[str] = []
        real_open, real_scandir = os.open, os.scandir

        def spy_open(path: Any, *args: Any, **kwargs: Any) -> int:
            self._note(self.opened, path)
            return real_open(path, *args, **kwargs)

        def spy_scandir(path: Any = ".") -> Any:
            self._note(self.scanned, path)
            return real_scandir(path)

        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(os, "scandir", spy_scandir)

    def _note(self, into: list[str], path: Any) -> None:
        if isinstance(path, str | bytes | os.PathLike):
            text = os.fsdecode(path)
            if text == self.root or text.startswith(self.root + os.sep):
                into.append(text)


@pytest.mark.parametrize(("answer", "match", "says", "then"), [
    (Canned(403, "AccessDenied", "Access Denied"), marker_put, ["AccessDenied", "may not write"], []),
    (Canned(400, "InvalidRequest", "x-amz-checksum-sha256 header is not supported"), carries_checksum,
     ["InvalidRequest", "--checksum md5"], ["--checksum", "md5"]),
    (Canned(501, "NotImplemented", "A header you provided implies functionality that is not implemented"),
     carries_checksum, ["NotImplemented", "--checksum md5"], ["--checksum", "md5"]),
], ids=["marker-access-denied", "checksum-400-invalid-request", "checksum-501-not-implemented"])
def test_preflight_refusal_exits_5_before_any_file_is_read(
        proxy: FaultProxy, proxied: Cli, s3: Any, bucket: str, tmp_path: Path, journal_path: Path,
        monkeypatch: pytest.MonkeyPatch, answer: Canned, match: Any, says: list[str], then: list[str]) -> None:
    """The bucket answers HeadBucket, but refuses the preflight's write of batch.json: for the
    credentials (403 AccessDenied), or for its x-amz-checksum-sha256 header (400 InvalidRequest,
    501 NotImplemented, as endpoints without the newer checksums answer). Exit 5, one error line
    naming the code and what to do (for a checksum refusal: the --checksum option); no object
    written; the source never opened nor even listed, the journal holds no file. Then the same
    command (with the advice taken: --checksum md5, which sends no x-amz-checksum-* header)
    resumes the batch, reads the files (so the spy does see reads) and seals it."""
    files = {"a.txt": b"alpha\n", "sub/b.txt": b"bravo\n"}
    source = write_tree(tmp_path / "src", files)
    rule = proxy.add_rule(Rule(match, answer))
    spy = SourceSpy(source, monkeypatch)

    refused = proxied("upload", "--json", str(source))

    assert refused.exit_code == ExitCode.DESTINATION, (refused.stdout, refused.stderr)
    (line,) = error_lines(refused.stderr)
    assert all(text in line for text in says) and "batch.json" in line, line
    assert "Traceback" not in refused.stderr
    document = one_json_object(refused.stdout)
    assert document["exit_code"] == ExitCode.DESTINATION and "batch.json" in document["error"]
    assert rule.hits >= 1 and proxy.snapshot().canned[answer.code] == rule.hits
    assert list_keys(s3, bucket, "") == set()
    assert spy.opened == [] and spy.scanned == []
    batch_id = only_batch(journal_path)
    with sqlite3.connect(journal_path) as connection:
        assert connection.execute("SELECT count(*) FROM files").fetchone()[0] == 0

    if not then:
        proxy.clear_rules()  # the policy is fixed
    resumed = proxied("upload", "--json", *then, str(source))

    assert resumed.exit_code == 0, (resumed.stdout, resumed.stderr)
    summary = one_json_object(resumed.stdout)
    assert summary["batch_id"] == batch_id
    assert_sealed_with_exactly(s3, bucket, batch_id, files)
    assert {os.path.relpath(path, spy.root) for path in spy.opened} >= set(files)
    assert spy.scanned
