#!/usr/bin/env bash
# Sourced by scripts/test-parallel.sh and scripts/test-wheel.sh (after bootstrap.sh, with
# $work set): a moto S3 server on a free 127.0.0.1 port, test credentials only, and one
# bucket. Sets $endpoint and $server_pid (the caller's cleanup kills it).
# Usage: start_local_s3 BUCKET
start_local_s3() {
    export AWS_ACCESS_KEY_ID=archup-test AWS_SECRET_ACCESS_KEY=archup-test AWS_DEFAULT_REGION=us-east-1
    export AWS_CONFIG_FILE="$work/no-aws-config" AWS_SHARED_CREDENTIALS_FILE="$work/no-aws-credentials"
    unset AWS_PROFILE AWS_ENDPOINT_URL AWS_ENDPOINT_URL_S3 ARCHUP_BUCKET ARCHUP_ENDPOINT_URL ARCHUP_PREFIX || true
    local port
    port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    endpoint="http://127.0.0.1:$port"
    moto_server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
    server_pid=$!
    python - "$endpoint" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=1)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("moto server did not start within 30 s")
        time.sleep(0.1)
PY
    python -c "import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])" \
        "$endpoint" "$1"
}
