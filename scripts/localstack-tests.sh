#!/usr/bin/env bash
# The tests that matter on the wire (marked `localstack`: uploads on both transports, multipart
# with full-object checksums, resume after kill -9, finalize, verify --deep) against LocalStack's
# S3, which checks checksums, Content-MD5 and sizes as S3 does; moto checks none of them.
# Starts LocalStack (scripts/localstack.sh), runs them, stops it. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
cleanup() {
    bash "$root/scripts/localstack.sh" stop "$work"
    rm -rf "$work"
}
trap cleanup EXIT
endpoint="$(bash "$root/scripts/localstack.sh" start "$work")"
echo "LocalStack S3 at $endpoint"
ARCHUP_TEST_S3=localstack ARCHUP_TEST_ENDPOINT="$endpoint" \
    bash "$root/scripts/test.sh" -m "localstack and not slow" "$@"
