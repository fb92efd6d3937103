#!/usr/bin/env python3
"""Packed shards at scale: one ``archup upload --pack-under`` of a dataset against a fresh
local moto server (127.0.0.1), measuring what the issue's "a million files" target names.

    scripts/bench_pack.py [--dataset tiny1m] [--parallel 16] [--pack-under 64KiB]

Prints (Markdown, and JSON with --json-out):
- wall seconds, the child's CPU seconds and peak RSS (os.wait4), files per second end to end
  (scan, pack, send and finalize: archup's own elapsed_s too);
- every request the server answered during the run, counted from its request log (one
  line per request), by method, against the bound "shards x parts + 10";
- the shards and files the manifest lists.

The dataset is bench.py's (seeded, cached under bench-data/). Run scripts/bench-setup.sh first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

REQUEST_LINE = re.compile(rb'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]" (\d{3})')


def requests_in(log: Path, start: int) -> Counter[str]:
    """The requests the server logged after byte ``start`` of its log, by method."""
    with open(log, "rb") as handle:
        handle.seek(start)
        return Counter(match.group(1).decode() for match in REQUEST_LINE.finditer(handle.read()))


STAMP = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def phases_of(log: Path, started: float) -> dict[str, float]:
    """Seconds from the process start to the first shard stored (the scan, then one shard's
    packing), to the last (the send), and to the run's end (finalize), from archup's -v log."""
    import datetime

    def at(line: bytes) -> float:
        match = STAMP.match(line)
        assert match is not None
        return datetime.datetime.strptime(match.group(1).decode(), "%Y-%m-%d %H:%M:%S,%f").timestamp()

    shards = [line for line in log.read_bytes().splitlines() if b"uploaded shard" in line]
    done = [line for line in log.read_bytes().splitlines() if b"done:" in line]
    if not shards or not done:
        return {}
    return {"first_shard": round(at(shards[0]) - started, 2), "last_shard": round(at(shards[-1]) - started, 2),
            "done": round(at(done[-1]) - started, 2)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_pack.py")
    parser.add_argument("--dataset", default="tiny1m")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--pack-under", default="64KiB")
    parser.add_argument("--extra", default="", help="more archup upload flags")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    src = bench.build_dataset(args.dataset)
    files = len(bench.dataset_files(args.dataset))
    work = Path(tempfile.mkdtemp(prefix="archup-bench-pack-"))
    os.chmod(work, 0o700)
    server = bench.Server("moto", work)
    server.start()
    try:
        client = bench.admin_client(server.endpoint)
        bucket = "bench-pack"
        client.create_bucket(Bucket=bucket)
        log = next(work.glob("moto-*.log"))
        before = log.stat().st_size
        log_file = work / "journal" / "archup.log"
        cmd = [str(bench.ARCHUP_PYTHON), "-m", "archup", "-v", "--log-file", str(log_file), "upload", str(src),
               "--bucket", bucket,
               "--endpoint-url", server.endpoint, "--region", bench.REGION, "--parallel", str(args.parallel),
               "--journal", str(work / "journal" / "journal.db"), "--json", "--quiet",
               "--pack-under", args.pack_under, *args.extra.split()]
        (work / "journal").mkdir(mode=0o700)
        started = time.time()
        wall, cpu, maxrss, code = bench.run_child(cmd, bench.clean_env(), work / "out.log")
        phases = phases_of(log_file, started)
        time.sleep(1.0)  # let the server flush its request log (it writes after answering)
        counted = requests_in(log, before)
        out = (work / "out.log").read_text(errors="replace").strip().splitlines()
        report = json.loads(out[-1]) if code == 0 else {}
        summary = json.loads(client.get_object(Bucket=bucket, Key=report["manifest_key"])["Body"].read()) \
            if code == 0 else {}
        shards = summary.get("shards", {}).get("count", 0)
        parts_per_shard = 1  # the default shard (8 MiB) is one PutObject
        result = {
            "dataset": args.dataset, "files": files, "parallel": args.parallel, "pack_under": args.pack_under,
            "exit": code, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(maxrss / 2**20, 1),
            "files_per_s": round(files / wall) if wall else 0, "archup_elapsed_s": report.get("elapsed_s"),
            "files_uploaded": summary.get("files_uploaded"), "files_packed": summary.get("files_packed"),
            "shards": shards, "requests": dict(counted), "requests_total": sum(counted.values()),
            "bound_shards_x_parts_plus_10": shards * parts_per_shard + 10,
            "load_average": os.getloadavg(), "phases_s": phases,
        }
        if code != 0:
            result["error"] = "\n".join(out[-5:])
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"| dataset | N | exit | wall s | files/s | CPU s | peak RSS MiB | shards | requests (bound) | load | "
          f"first shard / last shard / done at (s) |\n"
          f"|---|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {result['dataset']} | {result['parallel']} | {result['exit']} | {result['wall_s']} | "
          f"{result['files_per_s']:,} | {result['cpu_s']} | {result['peak_rss_mib']} | {result['shards']} | "
          f"{result['requests_total']} ({result['bound_shards_x_parts_plus_10']}): {result['requests']} | "
          f"{' '.join(f'{x:.2f}' for x in result['load_average'])} | "
          f"{' / '.join(str(v) for v in result['phases_s'].values())} |")
    if "error" in result:
        print(result["error"])
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
