#!/usr/bin/env python3
"""Benchmark archup against its peers on a local S3 server (127.0.0.1 only).

Tools, one run of each per round (interleaved, the start rotated every round so
no tool always runs first on a cold or warm machine):
  archup   archup upload --parallel N --json (fresh journal, fresh bucket per run)
  archup-noprehash  the same with --no-prehash (no whole-file read before a multipart upload)
  archup-prehash    the same with --prehash (the opt-in whole-file read first)
  archup-crt / archup-botocore  the same with --transport crt / botocore
  archup-base  archup as another checkout has it (--base DIR, e.g. a git worktree of the commit
           before a change), run with the same interpreter: a change's same-round ratio
           (--tree DIR runs archup and its variants from a checkout too, e.g. a clean worktree of
           HEAD while the work tree is being edited)
  aws      aws s3 cp --recursive, max_concurrent_requests = N (temp AWS_CONFIG_FILE)
  rclone   rclone copy --transfers N (configured through RCLONE_CONFIG_BENCH_*)
  rclone-nohead  the same with --s3-no-head (needed on moto for multipart objects)
  boto3    a minimal boto3 thread pool (put_object / upload_file): the library limit
           (run with BOTO_DISABLE_CRT=true: archup's venv has awscrt, and botocore's own
           signer is the faster one here, as a plain `pip install boto3` has it)

For each run: wall seconds, the child's CPU seconds (user + sys) and peak RSS,
both from os.wait4. Medians over the rounds, then archup/peer ratios of the
medians and the median of the per-round ratios (pairs from the same round, which
is what to trust on a noisy machine). Markdown on stdout, JSON with --json-out.

``bench.py probe [--server s3rver] [--processes 4] [--threads 4] [--size 8MiB] [--client botocore|crt]``
measures the server's own limit: bare PUTs of --size bytes (8 MiB; 1024 for the small-file limit),
unsigned payload, no checksum, from several processes; aggregate MiB/s and PUTs/s. With
``--client crt`` each process keeps --threads PUTs in flight through the CRT's S3 client
instead of a botocore thread pool: on a 2-core machine the server shares the CPU with the
probe, and botocore's ~1 ms of client CPU per small PUT would make the probe, not the server,
the limit.

``bench.py profile [--server s3rver] [--dataset small] [--parallel 16]`` runs archup
and the raw boto3 uploader once each under cProfile with every thread profiled
(per-thread CPU time, then wall time) and prints where the time goes per file.

Run ``scripts/bench-setup.sh`` first. Datasets are seeded and cached under
bench-data/ (gitignored).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".bench-venv"
TOOLS_DIR = ROOT / "bench-tools"
DATA_DIR = ROOT / "bench-data"
ARCHUP_PYTHON = ROOT / ".venv" / "bin" / "python"
BASE_TREE: Path | None = None  # --base: the checkout archup-base runs
ARCHUP_TREE: Path | None = None  # --tree: the checkout archup and its variants run (default: this one, editable)

KiB, MiB = 1024, 1024 * 1024
ACCESS_KEY = SECRET_KEY = "S3RVER"  # s3rver's fixed credentials; moto accepts any
REGION = "us-east-1"
PART_SIZE = 8 * MiB
MOTO_RSS_LIMIT = 1536 * MiB  # restart moto once it holds more than this


# -- datasets -----------------------------------------------------------------

DATASETS = {
    # name: (description, seed)
    "small": ("2,000 files x 4 KiB in nested directories", 1),
    "tiny": ("20,000 files x 1 KiB in nested directories", 6),
    "tiny100k": ("100,000 files x 1 KiB in nested directories", 7),
    "tiny1m": ("1,000,000 files x 1 KiB in nested directories", 8),
    "mixed": ("200 files, 1 KiB to 2 MiB (log-uniform)", 2),
    "large": ("4 files x 128 MiB", 3),
    "large64": ("4 files x 64 MiB", 4),
    "huge": ("1 file x 1 GiB", 5),
}
LARGE = ("large", "large64", "huge")  # multipart datasets: peers send SHA-256 there


def dataset_files(name: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file of a dataset; deterministic."""
    rng = random.Random(DATASETS[name][1])
    if name == "small":
        return [(f"d{i // 200:02d}/s{(i // 20) % 10}/f{i:05d}.bin", 4 * KiB) for i in range(2000)]
    if name == "tiny":
        return [(f"t{i // 1000:02d}/s{(i // 100) % 10}/f{i:05d}.bin", KiB) for i in range(20000)]
    if name == "tiny1m":
        return [(f"t{i // 1000:03d}/s{(i // 100) % 10}/f{i:07d}.bin", KiB) for i in range(1_000_000)]
    if name == "tiny100k":
        return [(f"t{i // 1000:03d}/s{(i // 100) % 10}/f{i:06d}.bin", KiB) for i in range(100000)]
    if name == "mixed":
        return [(f"m{i % 8}/file-{i:04d}.dat", int(2 ** rng.uniform(10, 21))) for i in range(200)]
    if name == "large":
        return [(f"big-{i}.bin", 128 * MiB) for i in range(4)]
    if name == "large64":
        return [(f"big-{i}.bin", 64 * MiB) for i in range(4)]
    if name == "huge":
        return [("huge.bin", 1024 * MiB)]
    raise KeyError(name)


def build_dataset(name: str, files: list[tuple[str, int]] | None = None, seed: int | None = None) -> Path:
    """Create the dataset under bench-data/ once; a marker records that it is complete. Another
    script's dataset gives its own ``files`` and ``seed``."""
    files = dataset_files(name) if files is None else files
    target = DATA_DIR / name
    spec = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    marker = DATA_DIR / f".{name}.{spec}.done"
    if marker.exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    rng = random.Random((DATASETS[name][1] if seed is None else seed) * 7919)
    for rel_path, size in files:
        path = target / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            left = size
            while left:
                chunk = min(left, 16 * MiB)
                handle.write(rng.randbytes(chunk))
                left -= chunk
    marker.touch()
    return target


def dataset_bytes(name: str) -> int:
    return sum(size for _, size in dataset_files(name))


# -- servers ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return 0


class Server:
    """A local S3 server on 127.0.0.1 in its own process group."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.restarts = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        log = open(self.workdir / f"{self.kind}-{self.port}.log", "wb")
        if self.kind == "moto":
            cmd = [str(BENCH_VENV / "bin" / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        else:
            store = self.workdir / f"s3rver-{self.port}"
            store.mkdir(parents=True, exist_ok=True)
            # Node 20: without the legacy provider, listings past 1,000 keys fail with 500 (FACTS.md).
            cmd = ["node", "--openssl-legacy-provider", str(TOOLS_DIR / "node_modules" / "s3rver" / "bin" / "s3rver.js"),
                   "--address", "127.0.0.1", "--port", str(self.port), "--directory", str(store), "--silent"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=clean_env())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start; see {log.name}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).read()
                return
            except urllib.error.HTTPError:
                return  # it answers (403 without credentials is fine)
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not answer on {self.endpoint}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self.kind == "s3rver":
            shutil.rmtree(self.workdir / f"s3rver-{self.port}", ignore_errors=True)

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1

    def rss(self) -> int:
        return rss_of(self.proc.pid) if self.proc else 0


def clean_env() -> dict[str, str]:
    """The environment every child gets: loopback credentials, no CA bundle, no ~/.aws files."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RCLONE_", "ARCHUP_")) and k not in ("HTTP_PROXY", "HTTPS_PROXY",
                                                                          "http_proxy", "https_proxy")}
    # rclone refuses to start while AWS_CA_BUNDLE is set; plain http on loopback needs none.
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION,
               AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null", NO_PROXY="127.0.0.1",
               AWS_EC2_METADATA_DISABLED="true", PYTHONDONTWRITEBYTECODE="1")
    return env


def admin_client(endpoint: str):  # type: ignore[no-untyped-def]
    import boto3
    import botocore.config
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY,
                        config=botocore.config.Config(s3={"addressing_style": "path"}, max_pool_connections=16,
                                                      retries={"mode": "standard", "max_attempts": 5}))


def count_and_empty(client, bucket: str) -> int:  # type: ignore[no-untyped-def]
    """Delete every object of a bucket (then the bucket); returns how many objects it held."""
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        count += len(keys)
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    except Exception:
        pass  # s3rver has no ListMultipartUploads
    client.delete_bucket(Bucket=bucket)
    return count


# -- the tools ----------------------------------------------------------------

# archup runs with its defaults; a variant adds flags (its ratios against every
# other tool, archup included, are reported like archup's own).
ARCHUP_VARIANTS: dict[str, list[str]] = {
    "archup": [],
    "archup-noprehash": ["--no-prehash"],
    "archup-prehash": ["--prehash"],
    "archup-crt": ["--transport", "crt"],
    "archup-botocore": ["--transport", "botocore"],
    # Files under 64 KiB packed into tar shards (8 MiB each, the default: one PutObject a shard).
    "archup-packed": ["--pack-under", "64KiB"],
}
PACKED_VARIANTS = ("archup-packed",)

@dataclass
class Run:
    server: str
    dataset: str
    parallel: int
    tool: str
    round: int
    wall: float
    cpu: float
    maxrss: int           # bytes
    objects: int          # objects found in the bucket afterwards
    ok: bool
    note: str = ""
    inner: float = 0.0    # archup: the run's own elapsed_s from its --json report (after start-up and imports)
    kernel: float = 0.0   # of cpu, the seconds spent in the kernel (ru_stime)


def tool_command(tool: str, *, src: Path, bucket: str, endpoint: str, parallel: int, dataset: str,
                 tmp: Path, sha256_peers: bool) -> tuple[list[str], dict[str, str]]:
    env = clean_env()
    if tool in ARCHUP_VARIANTS or tool == "archup-base":
        program = [str(ROOT / ".venv" / "bin" / "archup")]
        if ARCHUP_TREE is not None:
            env["PYTHONPATH"] = str(ARCHUP_TREE)  # ahead of the editable install's finder
            program = [str(ARCHUP_PYTHON), "-m", "archup"]
        if tool == "archup-base":
            if BASE_TREE is None:
                raise SystemExit("archup-base needs --base DIR")
            # The other checkout's archup package first on the path; the same installed libraries.
            env["PYTHONPATH"] = str(BASE_TREE)
            program = [str(ARCHUP_PYTHON), "-m", "archup"]
        cmd = [*program, "upload", str(src), "--bucket", bucket,
               "--endpoint-url", endpoint, "--region", REGION, "--parallel", str(parallel),
               "--journal", str(tmp / "journal.db"), "--prefix", "bench/", "--json", "--quiet",
               *ARCHUP_VARIANTS.get(tool, [])]
        return cmd, env
    if tool == "aws":
        config = tmp / "aws-config"
        config.write_text(f"[default]\nregion = {REGION}\ns3 =\n  max_concurrent_requests = {parallel}\n"
                          f"  multipart_threshold = {PART_SIZE // MiB}MB\n"
                          f"  multipart_chunksize = {PART_SIZE // MiB}MB\n")
        env["AWS_CONFIG_FILE"] = str(config)
        cmd = [str(BENCH_VENV / "bin" / "aws"), "s3", "cp", "--recursive", "--only-show-errors",
               "--endpoint-url", endpoint, str(src), f"s3://{bucket}/bench/"]
        if sha256_peers:
            cmd += ["--checksum-algorithm", "SHA256"]
        return cmd, env
    if tool in ("rclone", "rclone-nohead"):
        env.update(RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other",
                   RCLONE_CONFIG_BENCH_ENDPOINT=endpoint, RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ACCESS_KEY,
                   RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=SECRET_KEY, RCLONE_CONFIG_BENCH_REGION=REGION,
                   RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true", RCLONE_CONFIG=str(tmp / "rclone.conf"))
        files = len(dataset_files(dataset))
        # Same request concurrency as the others: rclone multiplies --transfers by
        # --s3-upload-concurrency for multipart files, so split N between them.
        per_file = max(1, parallel // min(parallel, files))
        cmd = ["rclone", "copy", str(src), f"bench:{bucket}/bench/", "--transfers", str(parallel),
               "--s3-chunk-size", f"{PART_SIZE // MiB}M", "--s3-upload-cutoff", f"{PART_SIZE // MiB}M",
               "--s3-upload-concurrency", str(per_file), "-q"]
        if tool == "rclone-nohead":
            cmd.append("--s3-no-head")
        return cmd, env
    if tool == "boto3":
        env["BOTO_DISABLE_CRT"] = "true"
        cmd = [str(ARCHUP_PYTHON), str(Path(__file__).resolve()), "_boto3", "--endpoint", endpoint,
               "--bucket", bucket, "--src", str(src), "--parallel", str(parallel)]
        if sha256_peers:
            cmd.append("--sha256")
        return cmd, env
    raise KeyError(tool)


def run_child(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, int, int]:
    """(wall s, CPU s, max RSS bytes, exit status) of one child, from os.wait4."""
    wall, cpu, _, maxrss, code = run_child_usage(cmd, env, log)
    return wall, cpu, maxrss, code


def run_child_usage(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float, int, int]:
    """(wall s, CPU s, of which kernel s, max RSS bytes, exit status) of one child, from os.wait4."""
    # Peak RSS comes from GNU time's own wait4 of the tool: Linux carries the parent's
    # high-water RSS across fork + exec into the child's ru_maxrss, so a child forked
    # straight from this (boto3-laden) harness would never report less than the harness.
    rss_file = log.with_suffix(".rss")
    timed = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *cmd] if os.path.exists("/usr/bin/time") else cmd
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(timed, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(log.parent))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    maxrss = usage.ru_maxrss * KiB
    try:
        maxrss = int(rss_file.read_text().split()[-1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_stime, maxrss, proc.returncode


def one_run(tool: str, server: Server, dataset: str, parallel: int, round_no: int, work: Path,
            sha256_peers: bool) -> Run:
    client = admin_client(server.endpoint)
    bucket = f"b-{tool.replace('-', '')}-{parallel}-{round_no}-{os.getpid() % 10000}-{int(time.time() * 1000) % 100000}"
    client.create_bucket(Bucket=bucket)
    tmp = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=work))
    src = DATA_DIR / dataset
    cmd, env = tool_command(tool, src=src, bucket=bucket, endpoint=server.endpoint, parallel=parallel,
                            dataset=dataset, tmp=tmp, sha256_peers=sha256_peers)
    wall, cpu, kernel, maxrss, code = run_child_usage(cmd, env, tmp / "out.log")
    objects = count_and_empty(client, bucket)
    expected = len(dataset_files(dataset))
    if tool in PACKED_VARIANTS and code == 0:
        # Packed: few objects; the run's own report must count every file uploaded.
        report = json.loads((tmp / "out.log").read_text(errors="replace").strip().splitlines()[-1])
        objects = expected if report.get("files_uploaded") == expected else objects
    note = ""
    if code != 0:
        note = f"exit {code}: " + (tmp / "out.log").read_text(errors="replace")[-400:].replace("\n", " ")
    elif objects < expected:
        note = f"only {objects} of {expected} objects"
    ok = code == 0 and objects >= expected
    inner = 0.0
    if tool in ARCHUP_VARIANTS or tool == "archup-base":
        try:
            report = json.loads((tmp / "out.log").read_text(errors="replace").strip().splitlines()[-1])
            inner = float(report.get("elapsed_s", 0.0))
        except (OSError, ValueError, IndexError, AttributeError):
            pass
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)
    return Run(server.kind, dataset, parallel, tool, round_no, wall, cpu, maxrss, objects, ok, note, inner, kernel)


# -- the raw boto3 uploader (run as a child: `bench.py _boto3 ...`) -------------

def boto3_upload(args: argparse.Namespace) -> int:
    """The library limit: one client, a thread pool of N, put_object under the multipart
    threshold and upload_file (s3transfer) above it, nothing else."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    import boto3.s3.transfer
    import botocore.config

    client = boto3.client("s3", endpoint_url=args.endpoint, region_name=REGION,
                          config=botocore.config.Config(max_pool_connections=max(10, args.parallel + 4),
                                                        retries={"mode": "standard", "max_attempts": 5}))
    transfer_config = boto3.s3.transfer.TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                                       max_concurrency=args.parallel, use_threads=True)
    extra = {"ChecksumAlgorithm": "SHA256"} if args.sha256 else {}
    root = args.src

    def files():  # type: ignore[no-untyped-def]
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                yield path, "bench/" + os.path.relpath(path, root)

    def put(path: str, key: str) -> None:
        with open(path, "rb") as handle:
            client.put_object(Bucket=args.bucket, Key=key, Body=handle.read(), **extra)

    with ThreadPoolExecutor(args.parallel) as pool:
        futures = []
        for path, key in files():
            if os.path.getsize(path) < PART_SIZE:
                futures.append(pool.submit(put, path, key))
            else:
                # s3transfer runs its own pool of max_concurrency threads for the parts.
                futures.append(pool.submit(client.upload_file, path, args.bucket, key, ExtraArgs=extra,
                                           Config=transfer_config))
        for future in futures:
            future.result()
    return 0


# -- profiling (`bench.py profile`) --------------------------------------------

def profile_all_threads(out: str, timer_name: str, run: Callable[[], object]) -> int:
    """Run ``run()`` in this process under cProfile with every thread profiled (`python -m
    cProfile` alone sees only the main thread, which mostly waits on the pool), and dump the
    merged stats to ``out``. The timer is per-thread CPU time, or wall time ("wall")."""
    import cProfile
    import threading

    timer = time.thread_time if timer_name == "cpu" else time.perf_counter
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_thread_profile(*_: object) -> None:
        # The first profile event of a new thread: replace this hook with a real profiler.
        profile = cProfile.Profile(timer)
        with lock:
            profiles.append(profile)
        profile.enable()

    main_profile = cProfile.Profile(timer)
    threading.setprofile(start_thread_profile)
    main_profile.enable()
    try:
        run()
    except SystemExit:
        pass
    finally:
        main_profile.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
    import pstats
    stats = pstats.Stats(main_profile)
    for profile in profiles:
        stats.add(profile)
    stats.dump_stats(out)
    return 0


def run_archup_in_process(argv: list[str]) -> None:
    from archup.cli import main as archup_main
    sys.argv = ["archup", *argv]
    archup_main()


def profiled_child(args: list[str]) -> int:
    """Run archup (or the raw boto3 uploader) in this process under cProfile, every thread
    profiled (:func:`profile_all_threads`)."""
    out, timer_name, target, rest = args[0], args[1], args[2], args[3:]
    if target == "archup":
        return profile_all_threads(out, timer_name, lambda: run_archup_in_process(rest))
    return profile_all_threads(out, timer_name, lambda: boto3_upload(_boto3_parser().parse_args(["_boto3", *rest])))


def _area(filename: str, name: str) -> str:
    """Which layer a profiled function belongs to."""
    if filename == "~":
        if "sqlite3" in name:
            return "sqlite3 (C)"
        if "_hashlib" in name or "sha256" in name or "md5" in name or "crc32" in name:
            return "hashing (C)"
        if "socket" in name or "ssl" in name:
            return "socket I/O (C)"
        if "acquire" in name or "wait" in name or "sleep" in name:
            return "lock/wait (C)"
        return "other builtins (C)"
    for area in ("archup", "botocore", "boto3", "s3transfer", "urllib3", "typer", "click", "rich", "dateutil"):
        if f"/{area}/" in filename:
            return area
    for area in ("http/client", "email/", "concurrent/futures", "threading.py", "sqlite3", "xml/",
                 "hashlib", "json/", "mimetypes", "logging/", "ssl.py", "socket.py"):
        if area in filename:
            return "stdlib " + area.strip("/").replace(".py", "")
    return "stdlib/other"


def profile_report(path: str, files: int, top: int = 25) -> str:
    import pstats
    stats = pstats.Stats(path)
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, _), (_, _, tt, _, _) in raw.items())
    areas: dict[str, float] = {}
    for (filename, _, name), (_, _, tt, _, _) in raw.items():
        areas[_area(filename, name)] = areas.get(_area(filename, name), 0.0) + tt
    lines = [f"total profiled time {total:.2f} s = {total / files * 1000:.2f} ms per file", "",
             "| layer (own time) | s | ms/file | share |", "|---|---|---|---|"]
    for area, seconds in sorted(areas.items(), key=lambda kv: -kv[1]):
        if seconds / total >= 0.005:
            lines.append(f"| {area} | {seconds:.2f} | {seconds / files * 1000:.3f} | {seconds / total:.0%} |")
    lines += ["", f"top {top} functions by own time:", "",
              "| function | calls | own s | cumulative s | ms/file (own) |", "|---|---|---|---|---|"]
    ranked = sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]
    for (filename, line, name), (_, calls, tt, ct, _) in ranked:
        short = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        lines.append(f"| {short}:{line} {name} | {calls} | {tt:.2f} | {ct:.2f} | {tt / files * 1000:.3f} |")
    lines += ["", f"top {top} archup functions by cumulative time:", "",
              "| function | calls | cumulative s | ms/file |", "|---|---|---|---|"]
    ours = sorted(((k, v) for k, v in raw.items() if "/archup/" in k[0]), key=lambda kv: -kv[1][3])[:top]
    for (filename, line, name), (_, calls, tt, ct, _) in ours:
        short = filename.split("/work/main/")[-1]
        lines.append(f"| {short}:{line} {name} | {calls} | {ct:.2f} | {ct / files * 1000:.3f} |")
    return "\n".join(lines)


def profile_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py profile")
    parser.add_argument("--server", default="s3rver", choices=["s3rver", "moto"])
    parser.add_argument("--dataset", default="small")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DATA_DIR / "profiles")
    parser.add_argument("--tree", type=Path, help="the checkout archup runs from (default: this one)")
    parser.add_argument("--archup-args", default="", help="more archup upload flags, e.g. '--pack-under 64KiB'")
    parser.add_argument("--only-archup", action="store_true", help="profile archup alone (not the boto3 yardstick)")
    args = parser.parse_args(argv)
    src = build_dataset(args.dataset)
    files = len(dataset_files(args.dataset))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="archup-profile-"))
    server = Server(args.server, work)
    server.start()
    try:
        client = admin_client(server.endpoint)
        for target in ("archup",) if args.only_archup else ("archup", "boto3"):
            for timer in ("cpu", "wall"):
                bucket = f"prof-{target}-{timer}"
                client.create_bucket(Bucket=bucket)
                out = args.out / f"{target}-{args.server}-{args.dataset}-{args.parallel}-{timer}.pstats"
                if target == "archup":
                    rest = ["upload", str(src), "--bucket", bucket, "--endpoint-url", server.endpoint, "--region",
                            REGION, "--parallel", str(args.parallel), "--journal", str(work / f"{bucket}.db"),
                            "--json", "--quiet", *args.archup_args.split()]
                    python = ARCHUP_PYTHON
                else:
                    rest = ["--endpoint", server.endpoint, "--bucket", bucket, "--src", str(src),
                            "--parallel", str(args.parallel), *(["--sha256"] if args.dataset in LARGE else [])]
                    python = ARCHUP_PYTHON  # same botocore as archup
                cmd = [str(python), str(Path(__file__).resolve()), "_profiled", str(out), timer, target, *rest]
                env = clean_env()
                if target == "boto3":
                    env["BOTO_DISABLE_CRT"] = "true"  # as in the benchmark runs
                elif args.tree:
                    env["PYTHONPATH"] = str(args.tree.resolve())
                wall, cpu, maxrss, code = run_child(cmd, env, work / f"{bucket}.log")
                objects = count_and_empty(client, bucket)
                print(f"## {target}, {timer} profile ({args.server}, {args.dataset}, N={args.parallel}): "
                      f"exit {code}, wall {wall:.1f} s, CPU {cpu:.1f} s, {objects} objects; {out}\n")
                print(profile_report(str(out), files))
                print()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


# -- reporting ----------------------------------------------------------------

@dataclass
class Summary:
    server: str
    dataset: str
    parallel: int
    tool: str
    runs: int
    failed: int
    wall: float
    cpu: float
    cpu_per_file_ms: float
    maxrss_mib: float
    rate: str
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    kernel_share: float = float("nan")  # median over the runs of kernel CPU / CPU


def summarize(runs: list[Run]) -> list[Summary]:
    out: list[Summary] = []
    groups: dict[tuple[str, str, int, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.server, run.dataset, run.parallel, run.tool), []).append(run)
    for (server, dataset, parallel, tool), group in groups.items():
        good = [r for r in group if r.ok]
        if not good:
            out.append(Summary(server, dataset, parallel, tool, len(group), len(group), float("nan"),
                               float("nan"), float("nan"), float("nan"), "failed"))
            continue
        wall = statistics.median(r.wall for r in good)
        cpu = statistics.median(r.cpu for r in good)
        files = len(dataset_files(dataset))
        rate = (f"{files / wall:,.0f} files/s" if dataset not in LARGE
                else f"{dataset_bytes(dataset) / MiB / wall:,.0f} MiB/s")
        out.append(Summary(server, dataset, parallel, tool, len(group), len(group) - len(good), wall, cpu,
                           cpu / files * 1000, statistics.median(r.maxrss for r in good) / MiB, rate,
                           kernel_share=statistics.median(r.kernel / r.cpu if r.cpu else 0.0 for r in good)))
    # archup / peer: ratio of medians and median of same-round ratios.
    by_key = {(s.server, s.dataset, s.parallel, s.tool): s for s in out}
    for summary in out:
        if summary.tool not in ARCHUP_VARIANTS:
            continue
        mine = {r.round: r for r in groups[(summary.server, summary.dataset, summary.parallel, summary.tool)]
                if r.ok}
        for (server, dataset, parallel, tool), group in groups.items():
            if (server, dataset, parallel) != (summary.server, summary.dataset, summary.parallel) \
                    or tool == summary.tool:
                continue
            peer = by_key[(server, dataset, parallel, tool)]
            pairs = [(mine[r.round], r) for r in group if r.ok and r.round in mine]
            if not pairs:
                continue
            summary.ratios[tool] = {
                "wall": summary.wall / peer.wall,
                "cpu": summary.cpu / peer.cpu,
                "rss": summary.maxrss_mib / peer.maxrss_mib,
                "wall_paired": statistics.median(a.wall / b.wall for a, b in pairs),
                "cpu_paired": statistics.median(a.cpu / b.cpu for a, b in pairs),
            }
    return out


def markdown(summaries: list[Summary]) -> str:
    lines = ["| server | dataset | N | tool | runs (failed) | wall s | rate | CPU s | CPU ms/file | kernel share of CPU "
             "| peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"archup": 0, "archup-noprehash": 0.5, "archup-prehash": 0.6, "boto3": 1, "aws": 2, "rclone": 3, "rclone-nohead": 4}
    summaries = sorted(summaries, key=lambda s: (s.server, s.dataset, s.parallel, order.get(s.tool, 9)))
    for s in summaries:
        lines.append(f"| {s.server} | {s.dataset} | {s.parallel} | {s.tool} | {s.runs} ({s.failed}) | "
                     f"{s.wall:.2f} | {s.rate} | {s.cpu:.2f} | {s.cpu_per_file_ms:.2f} | {s.kernel_share:.0%} | "
                     f"{s.maxrss_mib:.0f} |")
    lines += ["", "archup / peer (ratio of medians; in brackets the median of same-round ratios):", "",
              "| server | dataset | N | tool | vs | wall | CPU | peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        for tool, r in sorted(s.ratios.items(), key=lambda kv: order.get(kv[0], 9)):
            lines.append(f"| {s.server} | {s.dataset} | {s.parallel} | {s.tool} | {tool} | {r['wall']:.2f} ({r['wall_paired']:.2f}) | "
                         f"{r['cpu']:.2f} ({r['cpu_paired']:.2f}) | {r['rss']:.2f} |")
    return "\n".join(lines)


def git_head(tree: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "archup"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head + (" (archup/ edited)" if dirty else "")
    except Exception as error:
        return f"unknown ({error})"


def versions() -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=30).stdout.strip()
        except Exception as error:  # a missing tool is reported, not fatal
            return f"unavailable ({error})"
    return {
        "python": platform.python_version(),
        "archup venv": out([str(ARCHUP_PYTHON), "-c", "import boto3, botocore, s3transfer; print("
                            "'boto3', boto3.__version__, 'botocore', botocore.__version__, 's3transfer', "
                            "s3transfer.__version__)"]),
        "aws": out([str(BENCH_VENV / "bin" / "aws"), "--version"]),
        "moto": out([str(BENCH_VENV / "bin" / "python"), "-c", "import moto; print(moto.__version__)"]),
        "rclone": out(["rclone", "version"]).splitlines()[0] if shutil.which("rclone") else "missing",
        "s3rver": out(["node", "-p", f"require('{TOOLS_DIR}/node_modules/s3rver/package.json').version"]),
        "node": out(["node", "-v"]),
        "sqlite": out([str(ARCHUP_PYTHON), "-c", "import sqlite3; print(sqlite3.sqlite_version)"]),
        "cpus": str(os.cpu_count()),
        "load at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# -- main ---------------------------------------------------------------------

def _boto3_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("_boto3")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--src", required=True)
    parser.add_argument("--parallel", type=int, required=True)
    parser.add_argument("--sha256", action="store_true")
    return parser


def _probe_key(tag: str, index: int) -> str:
    """Nested like the small-file datasets (100 keys a directory): s3rver keeps a key as a file,
    and a flat directory of tens of thousands of them slows its writes and listings."""
    return f"probe/{tag}/{index // 1000:03d}/{(index // 100) % 10}/f{index:06d}"


def _probe_child(endpoint: str, bucket: str, threads: int, seconds: float, tag: str, size: int,
                 kind: str = "botocore") -> None:
    """One probe process: ``threads`` threads sending bare PUTs of ``size`` bytes for ``seconds``;
    prints bytes sent and PUTs sent."""
    if kind == "crt":
        _probe_child_crt(endpoint, bucket, threads, seconds, tag, size)
        return
    os.environ["BOTO_DISABLE_CRT"] = "true"
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    import botocore.config

    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, config=botocore.config.Config(
        max_pool_connections=threads + 2, s3={"payload_signing_enabled": False},
        request_checksum_calculation="when_required"))
    body = os.urandom(size)
    began = time.monotonic()
    deadline = began + seconds

    def loop(thread: int) -> int:
        count = 0
        while time.monotonic() < deadline:
            client.put_object(Bucket=bucket, Key=_probe_key(f"{tag}-{thread}", count), Body=body)
            count += 1
        return count

    with ThreadPoolExecutor(threads) as pool:
        puts = sum(pool.map(loop, range(threads)))
    print(puts * size, puts, time.monotonic() - began)


def _probe_child_crt(endpoint: str, bucket: str, in_flight: int, seconds: float, tag: str, size: int) -> None:
    """The probe through the CRT's S3 client: ``in_flight`` bare PUTs outstanding (SigV4, unsigned
    payload, no checksum, plain http), new ones started from the completion callbacks."""
    import io
    import threading

    from awscrt.auth import AwsCredentialsProvider
    from awscrt.http import HttpHeaders, HttpRequest
    from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
    from awscrt.s3 import S3Client, S3RequestTlsMode, S3RequestType, create_default_s3_signing_config

    host = endpoint.split("://", 1)[1]
    group = EventLoopGroup()
    bootstrap = ClientBootstrap(group, DefaultHostResolver(group))
    credentials = AwsCredentialsProvider.new_static(ACCESS_KEY, SECRET_KEY)
    client = S3Client(bootstrap=bootstrap, region=REGION, tls_mode=S3RequestTlsMode.DISABLED,
                      signing_config=create_default_s3_signing_config(region=REGION, credential_provider=credentials),
                      max_active_connections_override=in_flight)
    body = os.urandom(size)
    began = time.monotonic()
    deadline = began + seconds
    lock = threading.Lock()
    state = {"started": 0, "done": 0, "ok": 0, "errors": 0}
    finished = threading.Event()
    requests = []  # keep the request objects alive until they finish

    def start() -> None:
        with lock:
            index = state["started"]
            state["started"] += 1
        headers = HttpHeaders([("Host", host), ("Content-Length", str(size)),
                               ("Content-Type", "application/octet-stream")])
        request = HttpRequest("PUT", f"/{bucket}/{_probe_key(tag, index)}", headers, io.BytesIO(body))
        requests.append(client.make_request(type=S3RequestType.DEFAULT, operation_name="PutObject",
                                            request=request, on_done=on_done))

    def on_done(error: BaseException | None = None, **_: object) -> None:
        with lock:
            state["done"] += 1
            state["ok" if error is None else "errors"] += 1
            more = time.monotonic() < deadline
            if state["done"] == state["started"] and not more:
                finished.set()
        if more:
            start()

    for _ in range(in_flight):
        start()
    finished.wait(seconds + 120)
    if state["errors"]:
        print(f"{state['errors']} PUTs failed", file=sys.stderr)
    print(state["ok"] * size, state["ok"], time.monotonic() - began)


def probe_main(argv: list[str]) -> int:
    """The server's own MB/s for 8 MiB PUTs, from several client processes at once."""
    parser = argparse.ArgumentParser(prog="bench.py probe")
    parser.add_argument("--server", default="s3rver")
    parser.add_argument("--processes", default="1,2,4", help="process counts to try, comma separated")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=PART_SIZE, help="bytes per PUT (8 MiB)")
    parser.add_argument("--client", default="botocore", choices=["botocore", "crt"],
                        help="botocore: a put_object thread pool per process; crt: the CRT's S3 client, "
                             "--threads requests in flight per process")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="archup-probe-"))
    server = Server(args.server, work)
    try:
        server.start()
        client = admin_client(server.endpoint)
        for count in [int(n) for n in args.processes.split(",") if n]:
            bucket = f"probe-{count}-{int(time.time()) % 100000}"
            client.create_bucket(Bucket=bucket)
            start = time.perf_counter()
            children = [subprocess.Popen([str(ARCHUP_PYTHON), str(Path(__file__).resolve()), "_probe", server.endpoint,
                                          bucket, str(args.threads), str(args.seconds), f"p{n}", str(args.size),
                                          args.client],
                                         stdout=subprocess.PIPE, env=clean_env()) for n in range(count)]
            answers = [child.communicate()[0].decode().split() or ["0", "0", "0"] for child in children]
            sent, puts = sum(int(a[0]) for a in answers), sum(int(a[1]) for a in answers)
            wall = time.perf_counter() - start
            # The sending window: the children's own (interpreter start and imports left out;
            # they start within a fraction of a second of each other).
            window = max(float(a[2]) for a in answers) or wall
            count_and_empty(client, bucket)
            print(f"{args.server}: {args.client}, {count} process(es) x {args.threads} threads, {args.size} B PUTs: "
                  f"{sent / MiB / window:,.1f} MiB/s, {puts / window:,.0f} PUTs/s "
                  f"({puts:,} PUTs in {window:.1f} s of sending, {wall:.1f} s with start-up)", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":
        _probe_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6], int(sys.argv[7]),
                     sys.argv[8] if len(sys.argv) > 8 else "botocore")
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        return probe_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_boto3":
        return boto3_upload(_boto3_parser().parse_args())
    if len(sys.argv) > 1 and sys.argv[1] == "_profiled":
        return profiled_child(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "profile":
        return profile_main(sys.argv[2:])

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="moto,s3rver", help="moto, s3rver or both (comma separated)")
    parser.add_argument("--datasets", default="small,mixed,large")
    parser.add_argument("--parallel", default="5,16", help="values of N, comma separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tools", default="archup,boto3,aws,rclone",
                        help="archup, archup-noprehash, boto3, aws, rclone, rclone-nohead; on moto 'rclone' runs as rclone-nohead "
                             "(its post-upload HEAD fails there for multipart objects)")
    parser.add_argument("--sha256-peers", default="large", choices=["large", "all", "none"],
                        help="datasets on which aws and boto3 send SHA-256 checksums (archup always does)")
    parser.add_argument("--json-out", type=Path, help="write every run and the summaries here")
    parser.add_argument("--base", type=Path, help="the checkout that tool archup-base runs (e.g. "
                        "'git worktree add /tmp/base HEAD~5')")
    parser.add_argument("--tree", type=Path, help="the checkout that archup and its variants run (default: "
                        "this work tree through the venv's editable install)")
    args = parser.parse_args()
    global BASE_TREE, ARCHUP_TREE
    BASE_TREE = args.base.resolve() if args.base else None
    ARCHUP_TREE = args.tree.resolve() if args.tree else None

    servers = [s for s in args.servers.split(",") if s]
    datasets = [d for d in args.datasets.split(",") if d]
    parallels = [int(n) for n in args.parallel.split(",") if n]
    tools = [t for t in args.tools.split(",") if t]
    for name in datasets:
        print(f"dataset {name}: {DATASETS[name][0]} ...", file=sys.stderr, flush=True)
        build_dataset(name)
    # archup's venv has it as an editable install: compile its modules once, as pip does for a
    # wheel, so no run pays for compiling them (children run with PYTHONDONTWRITEBYTECODE=1).
    # The same for the other checkouts (their children also run without writing bytecode).
    for tree in {ROOT, *(t for t in (BASE_TREE, ARCHUP_TREE) if t is not None)}:
        subprocess.run([str(ARCHUP_PYTHON), "-m", "compileall", "-q", str(tree / "archup")], check=True)
    info = versions()
    info["archup tree"] = f"{ARCHUP_TREE or ROOT} at {git_head(ARCHUP_TREE or ROOT)}"
    if BASE_TREE is not None:
        info["archup-base tree"] = f"{BASE_TREE} at {git_head(BASE_TREE)}"
    work = Path(tempfile.mkdtemp(prefix="archup-bench-"))
    runs: list[Run] = []
    started = time.time()
    try:
        for server_kind in servers:
            server = Server(server_kind, work)
            server_tools = [("rclone-nohead" if t == "rclone" and server_kind == "moto" else t) for t in tools]
            server_tools = list(dict.fromkeys(server_tools))
            try:
                for dataset in datasets:
                    server.start()  # a fresh server per dataset
                    sha = args.sha256_peers == "all" or (args.sha256_peers == "large" and dataset in LARGE)
                    for round_no in range(args.rounds):
                        for parallel in parallels:
                            shift = (round_no + parallels.index(parallel)) % len(server_tools)
                            for tool in server_tools[shift:] + server_tools[:shift]:
                                if server.kind == "moto" and server.rss() > MOTO_RSS_LIMIT:
                                    server.restart()
                                run = one_run(tool, server, dataset, parallel, round_no, work, sha)
                                runs.append(run)
                                print(f"[{time.time() - started:6.0f}s] {server_kind} {dataset} N={parallel} "
                                      f"round {round_no} {tool:13s} wall {run.wall:6.2f}s cpu {run.cpu:6.2f}s "
                                      f"rss {run.maxrss / MiB:5.0f}MiB objects {run.objects}"
                                      f"{f' inner {run.inner:.2f}s' if run.inner else ''}"
                                      f"{'' if run.ok else '  FAILED ' + run.note}", file=sys.stderr, flush=True)
                    server.stop()
            finally:
                server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summaries = summarize(runs)
    info["load at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"versions: {json.dumps(info)}\n")
    print(markdown(summaries))
    if args.json_out:
        args.json_out.write_text(json.dumps({"versions": info, "args": vars(args) | {"json_out": str(args.json_out)},
                                             "runs": [asdict(r) for r in runs],
                                             "summaries": [asdict(s) for s in summaries]}, indent=1, default=str))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
