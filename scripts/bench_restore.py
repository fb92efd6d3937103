#!/usr/bin/env python3
"""Benchmark `archup restore` against its peers on a local S3 server (127.0.0.1 only).

Each dataset is uploaded once per server with `archup upload` (which seals the manifest
restore needs); then every round restores it once with each tool into a fresh directory
(deleted after the run; the page cache is left alone, the same for every tool):

  archup   archup restore BATCH DIR --bucket B --prefix bench/ --parallel N --json --quiet
           (from the bucket alone: no journal knows the batch)
  boto3    a raw boto3 download pool, run as its own process (`bench_restore.py _pool`) with
           the bench venv's python: one client, ListObjectsV2 of <batch>/files/, then a
           ThreadPoolExecutor(N): get_object(...)["Body"].read() written to a file below
           8 MiB, download_file (s3transfer, 8 MiB parts) at or above it; no verification
           (response_checksum_validation=when_required, BOTO_DISABLE_CRT=true as archup has it)
  aws      aws s3 cp --recursive s3://B/bench/<batch>/files/ DIR, max_concurrent_requests = N
           (a temporary AWS_CONFIG_FILE; multipart threshold and chunk size 8 MiB)

Cells (issue 25): a = 4 x 64 MiB + 1,000 x 4 KiB at N = 8; b = 2,000 x 4 KiB at N = 16.
Tools run in every round back to back, the first one rotated per round; the figures to trust
are the medians of same-round ratios. Per run: wall, the child's CPU (user + sys, children
included, from wait4) and peak RSS (GNU time's %M; see scripts/bench.py's run_child).

``bench_restore.py million [--count 1000000] [--parallel 8]``: peak RSS of archup restoring a
1,000,000-entry manifest of empty files (no GETs: an empty object is written without one, but
<batch>/files/ is listed once). The objects and the sealed manifest (archup's own writer:
archup.manifest.write_entries, summary, encode_summary) are put straight into a moto server's
backend inside its own process before it serves (`_moto_seeded`); moto's ListObjectsV2 sorts
every key of the bucket for every page, so the launcher also gives it a sorted index (a page
is a bisect and a slice; other listings are moto's own).

``bench_restore.py profile --server s3rver --cell a`` runs archup restore in-process under
cProfile with every thread profiled (per-thread CPU time, then wall), like bench.py profile.

Run scripts/bench-setup.sh first; run this with .bench-venv/bin/python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: servers, environment, run_child, profiling helpers)
from bench import (  # noqa: E402
    ARCHUP_PYTHON,
    BENCH_VENV,
    DATA_DIR,
    REGION,
    ROOT,
    KiB,
    MiB,
    Server,
    admin_client,
    clean_env,
    run_child,
)

PART_SIZE = 8 * MiB
PREFIX = "bench/"
ARCHUP = ROOT / ".venv" / "bin" / "archup"
POOL_PYTHON = BENCH_VENV / "bin" / "python"

CELLS = {
    # name: (dataset, N, description)
    "a": ("restore-a", 8, "4 x 64 MiB + 1,000 x 4 KiB"),
    "b": ("small", 16, "2,000 x 4 KiB"),
}


def dataset_files(name: str) -> list[tuple[str, int]]:
    if name == "restore-a":
        return [(f"big-{i}.bin", 64 * MiB) for i in range(4)] + \
               [(f"d{i // 200:02d}/s{(i // 20) % 10}/f{i:05d}.bin", 4 * KiB) for i in range(1000)]
    return bench.dataset_files(name)


def build_dataset(name: str) -> Path:
    if name != "restore-a":
        return bench.build_dataset(name)
    return bench.build_dataset(name, dataset_files(name), seed=11)


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


# -- upload once ----------------------------------------------------------------

def upload_once(server: Server, dataset: str, work: Path) -> tuple[str, str]:
    """(bucket, batch id) of the dataset uploaded and sealed by archup."""
    bucket = f"r-{dataset.replace('-', '')}-{int(time.time() * 1000) % 1000000}"
    admin_client(server.endpoint).create_bucket(Bucket=bucket)
    src = build_dataset(dataset)
    log = work / f"upload-{bucket}.log"
    cmd = [str(ARCHUP), "upload", str(src), "--bucket", bucket, "--endpoint-url", server.endpoint,
           "--region", REGION, "--parallel", "8", "--journal", str(work / f"upload-{bucket}.db"),
           "--prefix", PREFIX, "--json", "--quiet"]
    with open(log, "wb") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env()).returncode
    text = log.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"archup upload exited {code}: {text[-800:]}")
    report = json.loads(text.strip().splitlines()[-1])
    batch = report.get("batch_id") or report.get("batch")
    if not batch:
        raise RuntimeError(f"no batch id in {text[-400:]}")
    return bucket, str(batch)


# -- the tools ----------------------------------------------------------------

def tool_command(tool: str, *, server: Server, bucket: str, batch: str, dest: Path, parallel: int,
                 tmp: Path, part_size: int = PART_SIZE) -> tuple[list[str], dict[str, str]]:
    env = clean_env()
    files_prefix = f"{PREFIX}{batch}/files/"
    if tool == "archup":
        cmd = [str(ARCHUP), "restore", batch, str(dest), "--bucket", bucket, "--prefix", PREFIX,
               "--endpoint-url", server.endpoint, "--region", REGION, "--parallel", str(parallel),
               "--part-size", f"{part_size // MiB}MiB", "--journal", str(tmp / "no-journal.db"), "--json", "--quiet"]
        return cmd, env
    if tool == "aws":
        config = tmp / "aws-config"
        config.write_text(f"[default]\nregion = {REGION}\ns3 =\n  max_concurrent_requests = {parallel}\n"
                          f"  multipart_threshold = {part_size // MiB}MB\n"
                          f"  multipart_chunksize = {part_size // MiB}MB\n")
        env["AWS_CONFIG_FILE"] = str(config)
        cmd = [str(BENCH_VENV / "bin" / "aws"), "s3", "cp", "--recursive", "--only-show-errors",
               "--endpoint-url", server.endpoint, f"s3://{bucket}/{files_prefix}", str(dest)]
        return cmd, env
    if tool in ("boto3", "boto3-n"):
        env["BOTO_DISABLE_CRT"] = "true"
        cmd = [str(POOL_PYTHON), str(Path(__file__).resolve()), "_pool", "--endpoint", server.endpoint,
               "--bucket", bucket, "--prefix", files_prefix, "--dest", str(dest), "--parallel", str(parallel),
               "--part-size", str(part_size)]
        if tool == "boto3-n":
            cmd += ["--large-concurrency", "1"]  # at most N requests in flight, as archup
        return cmd, env
    raise KeyError(tool)


def pool_main(argv: list[str]) -> int:
    """The raw boto3 download pool (a child process of its own)."""
    parser = argparse.ArgumentParser(prog="bench_restore.py _pool")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--parallel", type=int, required=True)
    parser.add_argument("--part-size", type=int, default=PART_SIZE)
    parser.add_argument("--large-concurrency", type=int, help="s3transfer threads per large file "
                        "(default: N // min(N, large files))")
    args = parser.parse_args(argv)
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    import boto3.s3.transfer
    import botocore.config

    client = boto3.client("s3", endpoint_url=args.endpoint, region_name=REGION,
                          config=botocore.config.Config(max_pool_connections=max(10, args.parallel + 4),
                                                        retries={"mode": "standard", "max_attempts": 5},
                                                        response_checksum_validation="when_required"))
    objects = [(item["Key"], int(item["Size"]))
               for page in client.get_paginator("list_objects_v2").paginate(Bucket=args.bucket, Prefix=args.prefix)
               for item in page.get("Contents", [])]
    large = sum(1 for _, size in objects if size >= args.part_size)
    # Each download_file runs its own s3transfer pool: split N between the large files in flight.
    per_file = args.large_concurrency or max(1, args.parallel // max(1, min(args.parallel, large)))
    transfer_config = boto3.s3.transfer.TransferConfig(multipart_threshold=args.part_size,
                                                       multipart_chunksize=args.part_size,
                                                       max_concurrency=per_file, use_threads=True)
    dest = args.dest

    def path_of(key: str) -> str:
        path = os.path.join(dest, key[len(args.prefix):])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def get(key: str) -> None:
        body = client.get_object(Bucket=args.bucket, Key=key)["Body"].read()
        with open(path_of(key), "wb") as handle:
            handle.write(body)

    with ThreadPoolExecutor(args.parallel) as pool:
        futures = []
        for key, size in objects:
            if size < args.part_size:
                futures.append(pool.submit(get, key))
            else:
                futures.append(pool.submit(lambda k=key: client.download_file(args.bucket, k, path_of(k),
                                                                              Config=transfer_config)))
        for future in futures:
            future.result()
    return 0


# -- one run --------------------------------------------------------------------

@dataclass
class Run:
    server: str
    cell: str
    parallel: int
    tool: str
    round: int
    wall: float
    cpu: float
    maxrss: int
    files: int
    bytes: int
    ok: bool
    load: str
    note: str = ""
    inner: float = 0.0  # archup: its report's elapsed_s


def tree_size(root: Path) -> tuple[int, int]:
    files = total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            files += 1
            total += os.lstat(os.path.join(directory, name)).st_size
    return files, total


def one_run(tool: str, server: Server, cell: str, bucket: str, batch: str, round_no: int, work: Path) -> Run:
    dataset, parallel, _ = CELLS[cell]
    tmp = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=work))
    dest = tmp / "restored"
    cmd, env = tool_command(tool, server=server, bucket=bucket, batch=batch, dest=dest, parallel=parallel, tmp=tmp)
    load = loadavg()
    wall, cpu, maxrss, code = run_child(cmd, env, tmp / "out.log")
    files, total = tree_size(dest) if dest.exists() else (0, 0)
    expected = dataset_files(dataset)
    want_files, want_bytes = len(expected), sum(size for _, size in expected)
    note = ""
    inner = 0.0
    text = (tmp / "out.log").read_text(errors="replace")
    if code != 0:
        note = f"exit {code}: " + text[-400:].replace("\n", " ")
    elif (files, total) != (want_files, want_bytes):
        note = f"restored {files} files / {total} B, expected {want_files} / {want_bytes}"
    if tool == "archup":
        try:
            inner = float(json.loads(text.strip().splitlines()[-1]).get("elapsed_s", 0.0))
        except (ValueError, IndexError, AttributeError):
            pass
    ok = not note
    shutil.rmtree(tmp, ignore_errors=True)
    return Run(server.kind, cell, parallel, tool, round_no, wall, cpu, maxrss, files, total, ok, load, note, inner)


# -- reporting --------------------------------------------------------------------

def summarize(runs: list[Run]) -> str:
    lines = ["| server | cell | N | tool | runs (failed) | wall s | CPU s | CPU ns/B | peak RSS MiB (max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    ratios = ["| server | cell | N | rounds | archup/boto3 wall | archup/boto3 CPU | archup/aws wall | "
              "archup/aws CPU | archup peak RSS MiB (max) | RSS target MiB | load (1-min, range) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r.server, r.cell) for r in runs})
    extra = ["", "archup / boto3-n (the pool with one s3transfer thread per large file: at most N requests "
             "in flight, as archup):", "", "| server | cell | N | rounds | wall | CPU |", "|---|---|---|---|---|---|"]
    for server, cell in keys:
        dataset, parallel, _ = CELLS[cell]
        nbytes = sum(size for _, size in dataset_files(dataset))
        by_tool: dict[str, dict[int, Run]] = {}
        for tool in ("archup", "boto3", "boto3-n", "aws"):
            group = [r for r in runs if (r.server, r.cell, r.tool) == (server, cell, tool)]
            good = [r for r in group if r.ok]
            by_tool[tool] = {r.round: r for r in good}
            if not group:
                continue
            if not good:
                lines.append(f"| {server} | {cell} | {parallel} | {tool} | {len(group)} ({len(group)}) | failed | | | |")
                continue
            wall = statistics.median(r.wall for r in good)
            cpu = statistics.median(r.cpu for r in good)
            rss = [r.maxrss / MiB for r in good]
            lines.append(f"| {server} | {cell} | {parallel} | {tool} | {len(group)} ({len(group) - len(good)}) | "
                         f"{wall:.2f} | {cpu:.2f} | {cpu / nbytes * 1e9:.1f} | {statistics.median(rss):.0f} "
                         f"({max(rss):.0f}) |")

        def paired(peer: str, what: str) -> tuple[str, int]:
            pairs = [(a, by_tool[peer][n]) for n, a in by_tool["archup"].items() if n in by_tool[peer]]
            if not pairs:
                return "n/a", 0
            values = [getattr(a, what) / getattr(b, what) for a, b in pairs]
            return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})", len(pairs)

        mine = list(by_tool["archup"].values())
        if not mine:
            continue
        loads = [float(r.load.split()[0]) for r in runs if (r.server, r.cell) == (server, cell)]
        rss = [r.maxrss / MiB for r in mine]
        wall_b, rounds = paired("boto3", "wall")
        cpu_b, _ = paired("boto3", "cpu")
        wall_a, rounds_a = paired("aws", "wall")
        cpu_a, _ = paired("aws", "cpu")
        if by_tool["boto3-n"]:
            wall_n, rounds_n = paired("boto3-n", "wall")
            cpu_n, _ = paired("boto3-n", "cpu")
            extra.append(f"| {server} | {cell} | {parallel} | {rounds_n} | {wall_n} | {cpu_n} |")
        ratios.append(f"| {server} | {cell} ({CELLS[cell][2]}) | {parallel} | {min(rounds, rounds_a)} | {wall_b} | "
                      f"{cpu_b} | {wall_a} | {cpu_a} | {statistics.median(rss):.0f} ({max(rss):.0f}) | "
                      f"{120 + parallel * PART_SIZE // MiB} | {statistics.median(loads):.1f} "
                      f"({min(loads):.1f}-{max(loads):.1f}) |")
    return "\n".join(lines + ["", "archup / peer, median of same-round ratios (range in brackets):", ""] + ratios
                     + (extra if len(extra) > 5 else []))


# -- the 1,000,000-entry manifest -------------------------------------------------

def _ulid() -> str:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    value = (int(time.time() * 1000) << 80) | random.getrandbits(80)
    return "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def moto_seeded_main(argv: list[str]) -> int:
    """A moto server whose backend holds a sealed batch of COUNT empty files before it serves."""
    port, bucket_name, batch, count = int(argv[0]), argv[1], argv[2], int(argv[3])
    began = time.monotonic()
    import bisect

    from moto.s3 import models as s3models
    from moto.s3.models import s3_backends

    from archup.journal import BatchRecord, FileRecord
    from archup.manifest import encode_summary, entries_key, skipped_key, summary, summary_key, write_entries
    from archup.states import BatchState, FileState

    backend = s3_backends["123456789012"]["aws"]
    backend.create_bucket(bucket_name, REGION)
    files_prefix = f"{PREFIX}{batch}/files/"
    empty_sha = hashlib.sha256(b"").hexdigest()
    etag = '"d41d8cd98f00b204e9800998ecf8427e"'

    def path(i: int) -> str:
        return f"m{i // 1000:04d}/f{i:07d}"

    for i in range(count):
        backend.put_object(bucket_name, files_prefix + path(i), b"")
        if i % 100000 == 0:
            print(f"seeded {i} keys in {time.monotonic() - began:.0f} s", flush=True)
    now = "2026-12-06T00:00:00Z"
    record = BatchRecord(batch, BatchState.ENQUEUED, "/bench/million", bucket_name, PREFIX, None, REGION, PART_SIZE,
                         True, None, None, now, now, now, now)

    def records():  # type: ignore[no-untyped-def]
        for i in range(count):
            yield FileRecord(batch, path(i), files_prefix + path(i), 0, 1_700_000_000_000_000_000, FileState.UPLOADED,
                             None, None, empty_sha, etag, None, 1, now)

    entries = write_entries(records())
    skipped = write_entries([])
    document = summary(record, entries, finalized_at=now, skipped=skipped)
    backend.put_object(bucket_name, entries_key(record), entries.handle.read())
    backend.put_object(bucket_name, skipped_key(record), skipped.handle.read())
    backend.put_object(bucket_name, summary_key(record), encode_summary(document))
    print(f"seeded {count} keys and the manifest ({entries.size:,} B) in {time.monotonic() - began:.0f} s",
          flush=True)

    # moto's list_objects_v2 collects and sorts every key of the bucket for each page: give it a
    # sorted index for plain (no delimiter) listings, which is all archup restore asks for.
    original = s3models.S3Backend.list_objects_v2
    index: dict[str, tuple[int, list[str]]] = {}

    def list_objects_v2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys):  # type: ignore
        if delimiter:
            return original(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys)
        cached = index.get(bucket.name)
        if cached is None or cached[0] != len(bucket.keys):
            cached = (len(bucket.keys), sorted(bucket.keys.keys()))
            index[bucket.name] = cached
        names = cached[1]
        start = bisect.bisect_left(names, prefix or "")
        after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
        if after:
            start = max(start, bisect.bisect_right(names, after))
        chosen = []
        position = start
        while position < len(names) and len(chosen) < max_keys + 1:
            name = names[position]
            if prefix and not name.startswith(prefix):
                break
            key = bucket.keys.get(name)
            if key is not None and not isinstance(key, s3models.FakeDeleteMarker):
                chosen.append(key)
            position += 1
        return self._truncate_result(chosen, max_keys)

    s3models.S3Backend.list_objects_v2 = list_objects_v2  # type: ignore[method-assign]

    # moto 5.x renders a listing through its generic model serializer (dateutil parses every
    # LastModified again): ~1 ms of server CPU per key. Plain listings are rendered here directly.
    import urllib.parse
    from xml.sax.saxutils import escape

    from moto.s3 import responses as s3responses
    original_response = s3responses.S3Response.list_objects_v2

    def list_response(self):  # type: ignore[no-untyped-def]
        query = self.querystring
        if query.get("delimiter", [None])[0] or query.get("fetch-owner", [None])[0]:
            return original_response(self)
        bucket = self.backend.get_bucket(self.bucket_name)
        token = query.get("continuation-token", [None])[0]
        prefix = self._get_querystring(self.request, self.uri).get("prefix", [None])[0] or ""
        if isinstance(prefix, bytes):
            prefix = prefix.decode("utf-8")
        max_keys = int(query.get("max-keys", [1000])[0])
        start_after = query.get("start-after", [None])[0]
        encoding = query.get("encoding-type", [None])[0]
        keys, truncated, next_token = self.backend.list_objects_v2(bucket, prefix, None, token, start_after, max_keys)
        quote = (lambda text: urllib.parse.quote(text)) if encoding == "url" else (lambda text: text)
        parts = ['<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/'
                 f'2006-03-01/"><Name>{escape(bucket.name)}</Name><Prefix>{escape(quote(prefix))}</Prefix>'
                 f'<MaxKeys>{max_keys}</MaxKeys><KeyCount>{len(keys)}</KeyCount>'
                 f'<IsTruncated>{"true" if truncated else "false"}</IsTruncated>']
        if encoding:
            parts.append(f"<EncodingType>{escape(encoding)}</EncodingType>")
        if next_token:
            parts.append(f"<NextContinuationToken>{next_token}</NextContinuationToken>")
        if start_after and not token:
            parts.append(f"<StartAfter>{escape(quote(start_after))}</StartAfter>")
        for key in keys:
            parts.append(f"<Contents><Key>{escape(quote(key.name))}</Key><LastModified>{key.last_modified_ISO8601}"
                         f"</LastModified><ETag>{escape(key.etag)}</ETag><Size>{key.size}</Size>"
                         f"<StorageClass>{key.storage_class}</StorageClass></Contents>")
        parts.append("</ListBucketResult>")
        return 200, {"Content-Type": "application/xml"}, "".join(parts)

    s3responses.S3Response.list_objects_v2 = list_response  # type: ignore[method-assign]
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print("serving", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    return 0


def million_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_restore.py million")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--no-list-timing", action="store_true", help="skip timing a bare boto3 listing first")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="archup-million-", dir=args.work))
    port = bench.free_port()
    bucket, batch = "million", _ulid()
    log = open(work / "moto.log", "wb")
    env = clean_env()
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([str(POOL_PYTHON), str(Path(__file__).resolve()), "_moto_seeded", str(port), bucket,
                             batch, str(args.count)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        began = time.monotonic()
        while "serving" not in (work / "moto.log").read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError((work / "moto.log").read_text(errors="replace")[-2000:])
            time.sleep(2)
        print(f"seeded moto in {time.monotonic() - began:.0f} s; server RSS {bench.rss_of(proc.pid) / MiB:.0f} MiB; "
              f"load {loadavg()}", flush=True)
        client = admin_client(endpoint)
        if args.no_list_timing:
            client = None
        # The listing alone, timed (one client, pages of 1,000, as archup asks).
        began = time.monotonic()
        listed = 0 if client is None else sum(len(page.get("Contents", [])) for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{PREFIX}{batch}/files/"))
        print(f"listing {listed:,} keys (boto3 paginator) took {time.monotonic() - began:.1f} s; load {loadavg()}",
              flush=True)
        for run in range(args.runs):
            dest = work / f"restored-{run}"
            cmd = [str(ARCHUP), "restore", batch, str(dest), "--bucket", bucket, "--prefix", PREFIX,
                   "--endpoint-url", endpoint, "--region", REGION, "--parallel", str(args.parallel),
                   "--journal", str(work / "no-journal.db"), "--json", "--quiet"]
            load = loadavg()
            wall, cpu, maxrss, code = run_watched(cmd, clean_env(), work / f"restore-{run}.log")
            text = (work / f"restore-{run}.log").read_text(errors="replace")
            files, _ = tree_size(dest) if dest.exists() else (0, 0)
            print(f"restore run {run}: exit {code}, wall {wall:.1f} s, CPU {cpu:.1f} s, peak RSS {maxrss / MiB:.0f} MiB "
                  f"(target 150), {files:,} files in the target, load before {load}, after {loadavg()}; "
                  f"report: {text.strip().splitlines()[-1][:300] if text.strip() else '(none)'}", flush=True)
            shutil.rmtree(dest, ignore_errors=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def run_watched(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, int, int]:
    """run_child, printing the child's VmRSS / VmHWM and its open fds every 15 s (a long run's trend)."""
    import threading
    done = threading.Event()
    began = time.monotonic()

    def watch() -> None:
        while not done.wait(15):
            for pid in _descendants(os.getpid()):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    if "archup" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                        continue
                    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                    print(f"  [{time.monotonic() - began:5.0f}s] pid {pid} VmRSS {fields['VmRSS'].strip()} "
                          f"VmHWM {fields['VmHWM'].strip()} load {loadavg()}", flush=True)
                except (OSError, KeyError):
                    pass

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        return run_child(cmd, env, log)
    finally:
        done.set()


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            children = [int(c) for task in os.listdir(f"/proc/{current}/task")
                        for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        except OSError:
            children = []
        out += children
        todo += children
    return out


# -- profile ----------------------------------------------------------------------

def profile_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_restore.py profile")
    parser.add_argument("--server", default="s3rver", choices=["s3rver", "moto"])
    parser.add_argument("--cell", default="a", choices=sorted(CELLS))
    parser.add_argument("--out", type=Path, default=DATA_DIR / "profiles")
    parser.add_argument("--targets", default="archup", help="archup, boto3 (comma separated)")
    args = parser.parse_args(argv)
    dataset, parallel, _ = CELLS[args.cell]
    files = len(dataset_files(dataset))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="archup-rprofile-", dir="/var/tmp"))
    server = Server(args.server, work)
    server.start()
    try:
        bucket, batch = upload_once(server, dataset, work)
        for target in args.targets.split(","):
            for timer in ("cpu", "wall"):
                dest = work / f"dest-{target}-{timer}"
                out = args.out / f"restore-{target}-{args.server}-{args.cell}-{timer}.pstats"
                if target == "archup":
                    rest = ["restore", batch, str(dest), "--bucket", bucket, "--prefix", PREFIX, "--endpoint-url",
                            server.endpoint, "--region", REGION, "--parallel", str(parallel),
                            "--journal", str(work / "no-journal.db"), "--json", "--quiet"]
                    cmd = [str(ARCHUP_PYTHON), str(Path(__file__).resolve()), "_profiled", str(out), timer,
                           "archup", *rest]
                else:
                    rest = ["--endpoint", server.endpoint, "--bucket", bucket, "--prefix", f"{PREFIX}{batch}/files/",
                            "--dest", str(dest), "--parallel", str(parallel)]
                    cmd = [str(POOL_PYTHON), str(Path(__file__).resolve()), "_profiled", str(out), timer,
                           "boto3", *rest]
                env = clean_env()
                env["BOTO_DISABLE_CRT"] = "true"
                wall, cpu, maxrss, code = run_child(cmd, env, work / f"{target}-{timer}.log")
                print(f"## {target}, {timer} profile ({args.server}, cell {args.cell}, N={parallel}): exit {code}, "
                      f"wall {wall:.1f} s, CPU {cpu:.1f} s, RSS {maxrss / MiB:.0f} MiB, load {loadavg()}; {out}\n")
                print(bench.profile_report(str(out), files))
                print(flush=True)
                shutil.rmtree(dest, ignore_errors=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def profiled_child(argv: list[str]) -> int:
    """bench.py's all-threads cProfile harness, with restore's two targets."""
    out, timer_name, target, rest = argv[0], argv[1], argv[2], argv[3:]
    if target == "archup":
        return bench.profile_all_threads(out, timer_name, lambda: bench.run_archup_in_process(rest))
    return bench.profile_all_threads(out, timer_name, lambda: pool_main(rest))


def report_main(argv: list[str]) -> int:
    """Summaries of one or more --json-out files together (rounds of later files renumbered, so
    pairs stay within one round of one run)."""
    runs: list[Run] = []
    offset = 0
    for name in argv:
        document = json.loads(Path(name).read_text())
        batch = [Run(**{**r, "round": r["round"] + offset}) for r in document["runs"]]
        runs += batch
        offset = max([r.round for r in runs], default=-1) + 1
    print(summarize(runs))
    return 0


# -- main -------------------------------------------------------------------------

def main() -> int:
    if len(sys.argv) > 1:
        sub = {"_pool": pool_main, "_moto_seeded": moto_seeded_main, "million": million_main,
               "profile": profile_main, "_profiled": profiled_child,
               "report": report_main}.get(sys.argv[1])
        if sub is not None:
            return sub(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="s3rver,moto")
    parser.add_argument("--cells", default="a,b")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tools", default="archup,boto3,aws")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    cells = [c for c in args.cells.split(",") if c]
    tools = [t for t in args.tools.split(",") if t]
    for cell in cells:
        build_dataset(CELLS[cell][0])
    subprocess.run([str(ARCHUP_PYTHON), "-m", "compileall", "-q", str(ROOT / "archup")], check=True)
    info = bench.versions()
    info["archup tree"] = f"{ROOT} at {bench.git_head(ROOT)}"
    work = Path(tempfile.mkdtemp(prefix="archup-rbench-", dir=args.work))
    runs: list[Run] = []
    started = time.time()
    try:
        for server_kind in [s for s in args.servers.split(",") if s]:
            server = Server(server_kind, work)
            server.start()
            try:
                for cell in cells:
                    bucket, batch = upload_once(server, CELLS[cell][0], work)
                    print(f"[{time.time() - started:6.0f}s] {server_kind} cell {cell}: uploaded batch {batch} "
                          f"to {bucket}", file=sys.stderr, flush=True)
                    for round_no in range(args.rounds):
                        shift = round_no % len(tools)
                        for tool in tools[shift:] + tools[:shift]:
                            run = one_run(tool, server, cell, bucket, batch, round_no, work)
                            runs.append(run)
                            print(f"[{time.time() - started:6.0f}s] {server_kind} {cell} round {round_no} "
                                  f"{tool:7s} wall {run.wall:6.2f}s cpu {run.cpu:6.2f}s rss {run.maxrss / MiB:5.0f}MiB "
                                  f"files {run.files} load {run.load}"
                                  f"{f' inner {run.inner:.2f}s' if run.inner else ''}"
                                  f"{'' if run.ok else '  FAILED ' + run.note}", file=sys.stderr, flush=True)
                        if args.json_out:
                            args.json_out.write_text(json.dumps({"versions": info, "runs": [asdict(r) for r in runs]},
                                                                indent=1))
            finally:
                server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["load at end"] = loadavg()
    print(f"versions: {json.dumps(info)}\n")
    print(summarize(runs))
    if args.json_out:
        args.json_out.write_text(json.dumps({"versions": info, "runs": [asdict(r) for r in runs]}, indent=1))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
