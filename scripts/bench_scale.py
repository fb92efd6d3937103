#!/usr/bin/env python3
"""Scale benchmark: scan a directory of many tiny files into the journal, then `archup status`.

Makes COUNT empty files (1,000 directories of COUNT/1,000) in a temp directory
on local disk, then, each in a child process so its peak RSS is its own:
  walk    archup.scan.scan() alone (the directory walk, no journal): the floor
  scan    Uploader(...).scan(): the walk plus the grouped journal inserts
          (the store is never called by scan, so it is None)
The scan is also run on a tenth of the files: peak RSS that stays flat from
COUNT/10 to COUNT is what "bounded memory" means. Then `archup status BATCH`
is timed as a subprocess. Targets: >= 50,000 files/s scan, status < 1 s.
Last, the big batch is sealed as if every file were uploaded (its files enter the
archived index) and `gc --forget-after` is done to it (forget_batch, then compact):
the journal's size before and after forgetting, and how long each step takes.
The files are removed at the end, unless --tree keeps them for the next run.
Each scan is run --runs times on a fresh journal; the table shows medians.

    .venv/bin/python scripts/bench_scale.py [--count 1000000] [--dir /var/tmp] [--runs 3]
    .venv/bin/python scripts/bench_scale.py --tree /var/tmp/archup-scale-tree --runs 3   # reuse the files
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
KiB, MiB = 1024, 1024 * 1024
BATCH_ID = "01JSCA1E000000000000000000"  # a valid ULID (Crockford base32 has no L)


def make_files(root: Path, count: int, per_dir: int = 1000) -> float:
    start = time.perf_counter()
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL
    for index in range(count):
        if index % per_dir == 0:
            directory = root / f"d{index // per_dir:05d}"
            directory.mkdir()
            prefix = str(directory) + "/f"
        os.close(os.open(f"{prefix}{index:07d}", flags, 0o644))
    return time.perf_counter() - start


def child(mode: str, source: str, journal_path: str) -> None:
    """Runs in a child process; prints one JSON line."""
    from archup.journal import SQLiteJournal
    from archup.scan import scan
    from archup.store import S3Store
    from archup.uploader import Uploader, UploadOptions

    if mode == "forget":
        forget(journal_path)
        return
    if mode == "walk":
        start = time.perf_counter()
        count = sum(1 for _ in scan(source))
        print(json.dumps({"files": count, "seconds": time.perf_counter() - start}))
        return
    journal = SQLiteJournal(journal_path)
    journal.init_batch(BATCH_ID, source_root=source, bucket="bench", prefix="bench/", part_size=8 * MiB)
    uploader = Uploader(journal, cast(S3Store, None), BATCH_ID, UploadOptions())
    start = time.perf_counter()
    uploader.scan()
    elapsed = time.perf_counter() - start
    files = journal.get_state(BATCH_ID).files_total
    journal.close()
    print(json.dumps({"files": files, "seconds": elapsed}))


def _journal_size(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*"))


def forget(journal_path: str) -> None:
    """The scanned batch, every file marked uploaded, then finalized and forgotten; prints one JSON line."""
    import sqlite3

    from archup.journal import SQLiteJournal
    from archup.states import BatchState

    with sqlite3.connect(journal_path) as conn:  # as if the upload had happened
        conn.execute("UPDATE files SET state = 'uploaded', sha256 = ?, etag = 'e'", ("ab" * 32,))
    journal = SQLiteJournal(journal_path)
    journal.compact()
    result: dict[str, Any] = {"files": journal.get_state(BATCH_ID).files_total}
    result["bytes_scanned"] = _journal_size(journal_path)
    journal.set_batch_state(BATCH_ID, BatchState.FINALIZING)
    start = time.perf_counter()
    journal.seal_batch(BATCH_ID, manifest_key="bench/manifest.json", finalized_at="t")
    result["seal_seconds"] = time.perf_counter() - start
    journal.compact()  # a checkpoint: the database file holds everything
    result["bytes_sealed"] = _journal_size(journal_path)
    start = time.perf_counter()
    journal.forget_batch(BATCH_ID)
    result["forget_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    journal.compact()
    result["compact_seconds"] = time.perf_counter() - start
    result["bytes_forgotten"] = _journal_size(journal_path)
    journal.close()
    result["seconds"] = result["seal_seconds"] + result["forget_seconds"] + result["compact_seconds"]
    print(json.dumps(result))


def run_child(mode: str, source: Path, journal_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", mode, str(source), str(journal_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{mode} child exited {proc.returncode}")
    result = json.loads(output.strip().splitlines()[-1])
    result.update(cpu=usage.ru_utime + usage.ru_stime, maxrss_mib=usage.ru_maxrss * KiB / MiB,
                  files_per_s=result["files"] / result["seconds"])
    return result


def time_status(journal_path: Path, runs: int = 5) -> list[float]:
    archup = ROOT / ".venv" / "bin" / "archup"
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(archup), "status", BATCH_ID, "--journal", str(journal_path), "--json"],
                       check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None, help="parent of the temp directory (local disk; default: $TMPDIR)")
    parser.add_argument("--runs", type=int, default=1, help="scans of each tree (fresh journal each); medians")
    parser.add_argument("--tree", type=Path, default=None,
                        help="keep the files in this directory (made once if missing) and reuse them next time")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="archup-bench-scale-", dir=args.dir))
    tree = args.tree or work
    report: dict[str, Any] = {"count": args.count, "runs": args.runs, "load_start": os.getloadavg()}
    try:
        tenth = max(1000, args.count // 10)
        small_src, big_src = tree / f"tenth-{tenth}", tree / f"all-{args.count}"
        for source, count in ((small_src, tenth), (big_src, args.count)):
            if not source.exists():
                print(f"making {count:,} empty files under {source} ...", file=sys.stderr, flush=True)
                partial = source.with_name(source.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
                report["make_seconds"] = make_files(partial, count)
                partial.rename(source)
                print(f"  {report['make_seconds']:.0f} s", file=sys.stderr, flush=True)
        runs: dict[str, list[dict[str, Any]]] = {"walk": [], "scan_tenth": [], "scan": []}
        for run in range(args.runs):
            for journal in work.glob("*.db*"):
                journal.unlink()
            runs["walk"].append(run_child("walk", big_src, work / "unused.db"))
            runs["scan_tenth"].append(run_child("scan", small_src, work / "tenth.db"))
            runs["scan"].append(run_child("scan", big_src, work / "journal.db"))
            print(f"  run {run + 1}: scan {runs['scan'][-1]['files_per_s']:,.0f} files/s", file=sys.stderr, flush=True)
        report["runs_detail"] = runs
        for mode, results in runs.items():
            report[mode] = {field: statistics.median(r[field] for r in results) for field in results[0]}
        report["journal_mib"] = sum(p.stat().st_size for p in work.glob("journal.db*")) / MiB
        report["status_seconds"] = time_status(work / "journal.db")
        report["forget"] = run_child("forget", big_src, work / "journal.db")
        report["load_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    scan, walk, tenth_scan = report["scan"], report["walk"], report["scan_tenth"]
    status = statistics.median(report["status_seconds"])
    print(f"{args.runs} run(s), medians; load {report['load_start'][0]:.2f} -> {report['load_end'][0]:.2f}")
    print(f"| measure | value | target | verdict |\n|---|---|---|---|\n"
          f"| walk only (archup.scan.scan) | {walk['files_per_s']:,.0f} files/s, {walk['maxrss_mib']:.0f} MiB | - | - |\n"
          f"| scan into journal, {scan['files']:,} files | {scan['files_per_s']:,.0f} files/s "
          f"({scan['seconds']:.1f} s, CPU {scan['cpu']:.1f} s) | >= 50,000 files/s | "
          f"{'MET' if scan['files_per_s'] >= 50_000 else 'MISSED'} |\n"
          f"| peak RSS, {tenth_scan['files']:,} -> {scan['files']:,} files | {tenth_scan['maxrss_mib']:.0f} -> "
          f"{scan['maxrss_mib']:.0f} MiB | bounded | "
          f"{'MET' if scan['maxrss_mib'] <= tenth_scan['maxrss_mib'] * 1.25 + 10 else 'MISSED'} |\n"
          f"| journal size | {report['journal_mib']:.0f} MiB | - | - |\n"
          f"| archup status (median of {len(report['status_seconds'])}) | {status:.2f} s | < 1 s | "
          f"{'MET' if status < 1 else 'MISSED'} |")
    forgot = report["forget"]
    print(f"| journal, {forgot['files']:,} files scanned / sealed (archived index) / forgotten | "
          f"{forgot['bytes_scanned'] / MiB:.0f} / {forgot['bytes_sealed'] / MiB:.0f} / "
          f"{forgot['bytes_forgotten'] / MiB:.0f} MiB | - | - |\n"
          f"| seal (index update) / forget / compact | {forgot['seal_seconds']:.1f} / "
          f"{forgot['forget_seconds']:.1f} / {forgot['compact_seconds']:.1f} s (peak RSS "
          f"{forgot['maxrss_mib']:.0f} MiB) | - | - |")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
