#!/usr/bin/env bash
# The package as a user installs it: build the sdist and the wheel, install the wheel
# into a clean venv (not editable, not from the source tree), and from there run
# `archup --version` and one real upload, finalize and `verify --deep` against a
# local moto server on 127.0.0.1. Fails if any runtime file is missing from the wheel.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"   # .venv: the build tool and the moto server
source "$root/scripts/local-s3.sh"

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "=== Building the sdist and the wheel ==="
python -m build --sdist --wheel --outdir "$work/dist" "$root" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls "$work/dist"

echo "=== Installing the wheel into a clean venv ==="
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$work"/dist/archup-*.whl
cd "$work"   # never the source tree: what runs must come from the wheel
archup="$work/venv/bin/archup"
"$work/venv/bin/python" - "$root" <<'PY'
import sys, pathlib, archup
where = pathlib.Path(archup.__file__).resolve()
if pathlib.Path(sys.argv[1]).resolve() in where.parents:
    sys.exit(f"archup was imported from the source tree ({where}), not the wheel")
for name in ("manifest.schema.json", "py.typed"):
    if not (where.parent / name).is_file():
        sys.exit(f"the wheel lacks archup/{name}")
print(f"archup from {where.parent}")
PY
"$archup" --version

bucket=archup-test-wheel
start_local_s3 "$bucket"

mkdir -p "$work/src/sub"
for i in 1 2 3; do head -c 2048 /dev/urandom >"$work/src/file$i.bin"; done
head -c $((6 * 1024 * 1024)) /dev/urandom >"$work/src/sub/large.bin"   # multipart at --part-size 5MiB

echo "=== Upload (no finalize), finalize, verify --deep, from the wheel ==="
common=(--journal "$work/journal.db")
"$archup" upload --no-finalize --part-size 5MiB --bucket "$bucket" --endpoint-url "$endpoint" "${common[@]}" \
    --json "$work/src" >"$work/upload.json"
batch="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["batch_id"])' "$work/upload.json")"
"$archup" finalize "$batch" --endpoint-url "$endpoint" "${common[@]}" --json >"$work/finalize.json"
"$archup" verify "$batch" --deep --endpoint-url "$endpoint" "${common[@]}" --json >"$work/verify.json"
python - "$work/finalize.json" "$work/verify.json" <<'PY'
import json, sys
final, verify = (json.load(open(path)) for path in sys.argv[1:])
problems = []
if final.get("status") != "enqueued" or final.get("files_uploaded") != 4:
    problems.append(f"finalize: {final}")
if not verify.get("ok") or verify.get("source") != "manifest" or verify.get("checked") != 4:
    problems.append(f"verify --deep: {verify}")
if problems:
    sys.exit("=== FAILED ===\n  " + "\n  ".join(problems))
print("=== The installed wheel uploaded, sealed and deep-verified 4 files ===")
PY
