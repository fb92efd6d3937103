#!/usr/bin/env bash
# The original design's test, on a fresh machine: five 1 KiB files uploaded with
# --parallel 5 into a local S3 endpoint (moto in server mode on 127.0.0.1), the
# batch finalized, the summary printed, and every object checked through a
# separate boto3 client. Exits non-zero on any mismatch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
source "$root/scripts/local-s3.sh"

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

bucket=archup-test-parallel
start_local_s3 "$bucket"

mkdir "$work/src"
for i in 1 2 3 4 5; do head -c 1024 /dev/urandom >"$work/src/file$i.bin"; done

echo "=== Uploading 5 files with --parallel 5 ==="
archup upload --parallel 5 --bucket "$bucket" --endpoint-url "$endpoint" \
    --journal "$work/journal.db" --json "$work/src" >"$work/summary.json"

echo "=== Finalize summary ==="
cat "$work/summary.json"

python - "$endpoint" "$bucket" "$work/summary.json" "$work/src" <<'PY'
import hashlib, json, pathlib, sys
import boto3

endpoint, bucket, summary_path, source = sys.argv[1:]
summary = json.loads(pathlib.Path(summary_path).read_text())
problems = []
if summary.get("status") != "enqueued":
    problems.append(f"status is {summary.get('status')!r}, expected 'enqueued'")
if summary.get("files_uploaded") != 5:
    problems.append(f"files_uploaded is {summary.get('files_uploaded')}, expected 5")
if summary.get("total_bytes") != 5120:
    problems.append(f"total_bytes is {summary.get('total_bytes')}, expected 5120")
s3 = boto3.client("s3", endpoint_url=endpoint)
for path in sorted(pathlib.Path(source).iterdir()):
    key = f"{summary['prefix']}files/{path.name}"
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        problems.append(f"{key}: {error}")
        continue
    if body != path.read_bytes():
        problems.append(f"{key}: bytes differ from {path}")
manifest = json.loads(s3.get_object(Bucket=bucket, Key=summary["manifest_key"])["Body"].read())
if manifest.get("files_uploaded") != 5:
    problems.append(f"manifest lists {manifest.get('files_uploaded')} files, expected 5")
entries = s3.get_object(Bucket=bucket, Key=manifest["entries"]["key"])["Body"].read()
if hashlib.sha256(entries).hexdigest() != manifest["entries"]["sha256"]:
    problems.append("manifest entries do not match the SHA-256 the summary seals")
if len(entries.splitlines()) != 5:
    problems.append(f"manifest has {len(entries.splitlines())} entries, expected 5")
if problems:
    print("=== FAILED ===")
    for problem in problems:
        print(f"  {problem}")
    sys.exit(1)
print("=== All 5 files uploaded, verified byte for byte, and listed in the manifest ===")
PY
