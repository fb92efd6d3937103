#!/usr/bin/env python3
"""Client CPU per small PutObject: botocore's put_object against the AWS Common Runtime's S3 client.

The question before a CRT transport is built: how much of a small file's client CPU
would the CRT's S3 client (signing, connection pool, HTTP in C) save against
botocore? Both send the same objects to the same local server (started here, on
127.0.0.1), with the same concurrency:

  botocore  a thread pool of N calling ``client.put_object`` (botocore's own signer,
            BOTO_DISABLE_CRT=true, unsigned payload with a CRC32 header, as archup sends)
  crt       ``awscrt.s3.S3Client.make_request(type=PUT_OBJECT)`` with N requests in flight
            (static credentials, SigV4, plain http, CRC32 header computed by the CRT)

With ``--modes crtput-delegate,crtput-static`` it measures archup's own CRT path instead
(``archup.store.crt.CrtPut``: N worker threads, each blocking on its request, as the
uploader's pool does), with its credentials asked from Python at every signature (a
delegate provider, what refreshable credentials get) or given once (a static provider,
what keys that cannot change get). ``crtput-async`` is the upload's path for small files
on the CRT transport: one thread starts ``CrtPut.put_async`` with at most 2 x N PUTs out
(static credentials) and the CRT's callback ends each; no thread waits on a request.

Each mode runs in its own child process; its CPU is the process's CPU time from the
client's creation to the last answer (every thread, the CRT's event-loop threads
included; interpreter start and imports left out), so the figure is the client's
whole cost per request. Rounds alternate the modes; the table gives
medians and the median of the same-round ratios.

    .venv/bin/python scripts/bench_crt.py --server s3rver --size 4096 --count 2000 --parallel 16 --rounds 3
    .venv/bin/python scripts/bench_crt.py --server s3rver --modes crtput-delegate,crtput-static --parallel 8 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ACCESS_KEY, REGION, SECRET_KEY, Server, admin_client, clean_env, count_and_empty  # noqa: E402

MODES = ("botocore", "crt", "crtput-delegate", "crtput-static", "crtput-async", "crtput-async-file")


def run_botocore(endpoint: str, bucket: str, body: bytes, count: int, parallel: int) -> None:
    os.environ["BOTO_DISABLE_CRT"] = "true"
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    import botocore.config

    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, config=botocore.config.Config(
                              max_pool_connections=parallel + 2, s3={"addressing_style": "path",
                                                                     "payload_signing_enabled": False},
                              request_checksum_calculation="when_supported"))

    def put(index: int) -> str:
        answer = client.put_object(Bucket=bucket, Key=f"b/{index:06d}", Body=body, ChecksumAlgorithm="CRC32")
        return str(answer["ETag"])

    with ThreadPoolExecutor(parallel) as pool:
        etags = list(pool.map(put, range(count)))
    assert len(etags) == count and all(etags)


def run_crt(endpoint: str, bucket: str, body: bytes, count: int, parallel: int) -> None:
    from awscrt.auth import AwsCredentialsProvider
    from awscrt.http import HttpHeaders, HttpRequest
    from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
    from awscrt.s3 import (
        S3ChecksumAlgorithm,
        S3ChecksumConfig,
        S3ChecksumLocation,
        S3Client,
        S3RequestTlsMode,
        S3RequestType,
        create_default_s3_signing_config,
    )

    host = endpoint.split("://", 1)[1]
    group = EventLoopGroup(2)
    bootstrap = ClientBootstrap(group, DefaultHostResolver(group))
    credentials = AwsCredentialsProvider.new_static(ACCESS_KEY, SECRET_KEY)
    client = S3Client(bootstrap=bootstrap, region=REGION, tls_mode=S3RequestTlsMode.DISABLED,
                      signing_config=create_default_s3_signing_config(region=REGION, credential_provider=credentials),
                      throughput_target_gbps=1.0)
    checksum = S3ChecksumConfig(algorithm=S3ChecksumAlgorithm.CRC32, location=S3ChecksumLocation.HEADER)
    slots = threading.Semaphore(parallel)
    etags: list[str] = []
    errors: list[str] = []
    done = threading.Event()
    lock = threading.Lock()
    finished = [0]

    def send(index: int) -> None:
        headers = HttpHeaders([("Host", host), ("Content-Length", str(len(body))),
                               ("Content-Type", "application/octet-stream")])
        request = HttpRequest("PUT", f"/{bucket}/c/{index:06d}", headers, io.BytesIO(body))
        seen: dict[str, str] = {}

        def on_headers(status_code: int, headers: list[tuple[str, str]], **_: object) -> None:
            seen.update((name.lower(), value) for name, value in headers)

        def on_done(error: BaseException | None = None, status_code: int | None = None, **_: object) -> None:
            with lock:
                if error is not None:
                    errors.append(f"{index}: {status_code} {error}")
                else:
                    etags.append(seen.get("etag", ""))
                finished[0] += 1
                if finished[0] == count:
                    done.set()
            slots.release()

        client.make_request(type=S3RequestType.PUT_OBJECT, request=request, checksum_config=checksum,
                            on_headers=on_headers, on_done=on_done)

    for index in range(count):
        slots.acquire()
        send(index)
    done.wait(600)
    assert not errors, errors[:3]
    assert len(etags) == count and all(etags)


def run_crtput(endpoint: str, bucket: str, body: bytes, count: int, parallel: int, *, static: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from archup.store import Credentials
    from archup.store.crt import CrtPut, Endpoint
    from archup.store.retry import RetryPolicy

    keys = Credentials(ACCESS_KEY, SECRET_KEY, None)
    put = CrtPut(Endpoint("http", endpoint.split("://", 1)[1], f"/{bucket}/", REGION), keys if static else lambda: keys,
                 retry=RetryPolicy(attempts=1), connect_timeout=10, read_timeout=60, max_connections=parallel,
                 sign_payload=False)
    headers = [("Content-Type", "application/octet-stream")]
    with ThreadPoolExecutor(parallel) as pool:
        etags = list(pool.map(lambda index: put.put(f"p/{index:06d}", body, headers, what="PutObject"),
                              range(count)))
    assert len(etags) == count and all(etags)


def run_crtput_async(endpoint: str, bucket: str, body: bytes, count: int, parallel: int, *,
                     from_file: bool = False) -> None:
    from archup.store import Credentials
    from archup.store.crt import CrtPut, Endpoint
    from archup.store.retry import RetryPolicy

    keys = Credentials(ACCESS_KEY, SECRET_KEY, None)
    put = CrtPut(Endpoint("http", endpoint.split("://", 1)[1], f"/{bucket}/", REGION), keys,
                 retry=RetryPolicy(attempts=1), connect_timeout=10, read_timeout=60, max_connections=parallel,
                 sign_payload=False)
    headers = [("Content-Type", "application/octet-stream")]
    slots = threading.BoundedSemaphore(parallel * 2)  # as the uploader's Dispatcher.hold
    etags: list[str | None] = []
    errors: list[Exception] = []
    finished = threading.Event()

    def done(etag: str | None, error: Exception | None) -> None:
        etags.append(etag)
        if error is not None:
            errors.append(error)
        slots.release()
        if len(etags) == count:
            finished.set()

    if from_file:  # the CRT reads the body itself (send_filepath), from one file of the body's bytes
        source = tempfile.NamedTemporaryFile(prefix="bench-crt-")
        source.write(body)
        source.flush()
    for index in range(count):
        slots.acquire()
        put.put_async(f"p/{index:06d}", body, headers, what="PutObject", done=done,
                      send_filepath=source.name if from_file else None)
    finished.wait()
    assert not errors, errors[:3]
    assert len(etags) == count and all(etags)


def child(mode: str, endpoint: str, bucket: str, size: int, count: int, parallel: int) -> int:
    body = os.urandom(size)
    start, cpu = time.perf_counter(), time.process_time()  # every thread of the process, the CRT's too
    if mode.startswith("crtput-async"):
        run_crtput_async(endpoint, bucket, body, count, parallel, from_file=mode == "crtput-async-file")
    elif mode.startswith("crtput-"):
        run_crtput(endpoint, bucket, body, count, parallel, static=mode == "crtput-static")
    else:
        (run_crt if mode == "crt" else run_botocore)(endpoint, bucket, body, count, parallel)
    print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}))
    return 0


def measure(mode: str, server: Server, size: int, count: int, parallel: int) -> dict[str, float]:
    client = admin_client(server.endpoint)
    bucket = f"crt-{mode}-{int(time.time() * 1000) % 10_000_000}"
    client.create_bucket(Bucket=bucket)
    proc = subprocess.Popen([sys.executable, __file__, "_child", mode, server.endpoint, bucket, str(size), str(count),
                             str(parallel)], stdout=subprocess.PIPE, env=clean_env())
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"{mode} failed"
    stored = count_and_empty(client, bucket)
    assert stored == count, f"{mode}: {stored} of {count} objects stored"
    report = json.loads(out)
    return {"wall": report["seconds"], "cpu": report["cpu"], "cpu_with_start": usage.ru_utime + usage.ru_stime}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        mode, endpoint, bucket, size, count, parallel = sys.argv[2:8]
        return child(mode, endpoint, bucket, int(size), int(count), int(parallel))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="s3rver")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="botocore,crt", help=f"two or more of {', '.join(MODES)}; ratios are "
                        "to the first")
    args = parser.parse_args()
    modes = tuple(mode for mode in args.modes.split(",") if mode)
    assert len(modes) >= 2 and set(modes) <= set(MODES), modes
    work = Path(tempfile.mkdtemp(prefix="archup-crt-"))
    server = Server(args.server, work)
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    try:
        server.start()
        for round_no in range(args.rounds):
            order = modes if round_no % 2 == 0 else modes[::-1]
            for mode in order:
                result = measure(mode, server, args.size, args.count, args.parallel)
                results[mode].append(result)
                print(f"round {round_no} {mode:9} wall {result['wall']:6.2f} s  cpu {result['cpu']:6.2f} s  "
                      f"{result['cpu'] / args.count * 1e3:.3f} ms/file", file=sys.stderr, flush=True)
    finally:
        server.stop()
    print(f"{args.server}, {args.count} x {args.size} B, N = {args.parallel}, {args.rounds} rounds\n")
    print("| mode | wall s | files/s | CPU s | CPU ms/file | CPU s with start and imports |\n|---|---|---|---|---|---|")
    for mode in modes:
        wall = statistics.median(r["wall"] for r in results[mode])
        cpu = statistics.median(r["cpu"] for r in results[mode])
        whole = statistics.median(r["cpu_with_start"] for r in results[mode])
        print(f"| {mode} | {wall:.2f} | {args.count / wall:,.0f} | {cpu:.2f} | {cpu / args.count * 1e3:.3f} | "
              f"{whole:.2f} |")
    first = modes[0]
    for mode in modes[1:]:
        pairs = list(zip(results[mode], results[first]))
        cpu_ratios = sorted(c["cpu"] / b["cpu"] for c, b in pairs)
        ratio_wall = statistics.median(c["wall"] / b["wall"] for c, b in pairs)
        print(f"\n{mode} / {first}, same-round medians: CPU {statistics.median(cpu_ratios):.2f} "
              f"({cpu_ratios[0]:.2f}-{cpu_ratios[-1]:.2f}), wall {ratio_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
