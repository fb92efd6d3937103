#!/usr/bin/env bash
# LocalStack's S3 (its own provider, not moto) on 127.0.0.1, without Docker: the local server
# that checks what S3 checks (per-request checksums, Content-MD5, the full-object CRC64NVME and
# the object size at completion). moto, the default test server, checks none of them.
#
#   scripts/localstack.sh install     create .localstack-venv (once; about a minute)
#   scripts/localstack.sh start DIR   install if needed, start on a free port, wait until S3 is
#                                     running; prints the endpoint (http://127.0.0.1:PORT) and
#                                     keeps DIR/pid, DIR/endpoint and DIR/localstack.log
#   scripts/localstack.sh stop DIR    stop the server started with DIR (by its PID), remove its files
#
# localstack-core 4.13.1 is the newest release that runs on Python 3.11; the pins beside it
# are what that release needs to start without Docker. Credentials: any (tests use test/test).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ARCHUP_LOCALSTACK_VENV:-$root/.localstack-venv}"
python="${PYTHON:-python3}"
requirements=("localstack-core[runtime]==4.13.1" "cbor2<6" "pyopenssl==25.1.0" "cryptography>=45,<46"
              service_identity)
stamp="$venv/.localstack-installed"

install() {
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${requirements[*]}" ]; then
        return
    fi
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}" >&2
    echo "${requirements[*]}" >"$stamp"
}

start() {
    local dir="$1" port endpoint pid
    install
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    endpoint="http://127.0.0.1:$port"
    # GATEWAY_SERVER=hypercorn binds 127.0.0.1 only (the default gateway binds 0.0.0.0);
    # SKIP_SSL_CERT_DOWNLOAD keeps it off the network; OVERRIDE_IN_DOCKER=0 keeps its files in DIR.
    env SERVICES=s3 EAGER_SERVICE_LOADING=1 GATEWAY_LISTEN="127.0.0.1:$port" LOCALSTACK_HOST="127.0.0.1:$port" \
        GATEWAY_SERVER=hypercorn OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$dir/fs" DNS_ADDRESS=0 DISABLE_EVENTS=1 \
        SKIP_SSL_CERT_DOWNLOAD=1 TMPDIR="$dir/tmp" \
        "$venv/bin/python" -m localstack.runtime.main >"$dir/localstack.log" 2>&1 &
    pid=$!
    mkdir -p "$dir/tmp"
    echo "$pid" >"$dir/pid"
    if ! "$python" - "$endpoint" "$pid" <<'PY'
import json, os, sys, time, urllib.request
endpoint, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("LocalStack exited while starting")
    try:
        with urllib.request.urlopen(endpoint + "/_localstack/health", timeout=2) as answer:
            if json.load(answer).get("services", {}).get("s3") == "running":
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)  # a bounded poll: the server says when it is ready, nothing to wait on
sys.exit("LocalStack's S3 was not running within 120 s")
PY
    then
        tail -n 30 "$dir/localstack.log" >&2
        stop "$dir"
        return 1
    fi
    echo "$endpoint" >"$dir/endpoint"
    echo "$endpoint"
}

stop() {
    local dir="$1" pid
    [ -f "$dir/pid" ] || return 0
    pid="$(cat "$dir/pid")"
    # It keeps object bodies under /tmp/localstack-s3-storage/BUCKET whatever FILESYSTEM_ROOT says,
    # a directory every LocalStack on the machine shares: remove only this server's buckets.
    if [ -f "$dir/endpoint" ]; then
        AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test "$venv/bin/python" - "$(cat "$dir/endpoint")" <<'PY' || true
import shutil, sys
import boto3
client = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
for bucket in client.list_buckets().get("Buckets", []):
    shutil.rmtree(f"/tmp/localstack-s3-storage/{bucket['Name']}", ignore_errors=True)
PY
    fi
    if kill "$pid" 2>/dev/null; then
        # SIGTERM: it shuts down in a few seconds; SIGKILL after 30.
        for _ in $(seq 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -rf "$dir/pid" "$dir/endpoint" "$dir/fs" "$dir/tmp"
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
