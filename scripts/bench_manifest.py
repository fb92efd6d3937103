#!/usr/bin/env python3
"""Peak memory of writing a manifest for a huge batch (issue: a manifest that scales).

Fills a journal with N uploaded files (default 1,000,000) in one bulk transaction,
then runs finalize's manifest step (stream the entries out of the journal into a
temporary file, hashing as it goes) in a fresh child process, and reports that
child's peak RSS and wall time. Run by hand:

    .venv/bin/python scripts/bench_manifest.py [--files 1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from archup.journal import Journal, SQLiteJournal
from archup.manifest import write_entries
from archup.states import FileState
journal = SQLiteJournal(sys.argv[1])
start = time.perf_counter()
entries = write_entries(journal.iter_files(sys.argv[2], [FileState.UPLOADED]))
elapsed = time.perf_counter() - start
entries.handle.close()
print(json.dumps({"entries": entries.count, "bytes": entries.size, "seconds": round(elapsed, 2),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000)
    args = parser.parse_args()
    from archup.clock import isoformat, utcnow
    from archup.journal import SQLiteJournal

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "journal.db"
        journal = SQLiteJournal(path, synchronous="OFF")
        batch = "01K8RNKN488RQCG3YGG72QBZS5"
        journal.init_batch(batch, source_root="/data", bucket="bench", prefix="staging/", part_size=8 << 20)
        now = isoformat(utcnow())
        start = time.perf_counter()
        with journal.atomic() as conn:
            conn.executemany(
                "INSERT INTO files (batch_id, rel_path, key, size, mtime_ns, state, sha256, etag, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                ((batch, f"dir{i // 1000:04}/file{i:07}.bin", f"staging/{batch}/files/dir{i // 1000:04}/file{i:07}.bin",
                  4096, 1_700_000_000_000_000_000 + i, "uploaded", f"{i:064x}", f'"{i:032x}"', now)
                 for i in range(args.files)))
        fill = time.perf_counter() - start
        journal.close()
        result = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(path), batch], check=True,
                                           capture_output=True, text=True).stdout)
        result["files"] = args.files
        result["journal_fill_seconds"] = round(fill, 1)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
