#!/usr/bin/env bash
# Install what the benchmarks (scripts/bench*.py) need, idempotently, outside the
# project's own .venv so the peers' versions never leak into the test environment:
#   .bench-venv/   awscli, moto[server], boto3 (PyPI) and archup itself (editable)
#   bench-tools/   s3rver (npm, local folder)
#   rclone         Debian package (apt-get), system-wide
# Nothing here is added to git except this script; .gitignore: /.bench-venv/ /bench-tools/ /bench-data/
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
if [ ! -x .bench-venv/bin/python ]; then
    "$python" -m venv .bench-venv
fi
if ! .bench-venv/bin/python -c "import awscli, moto.server, boto3, archup" 2>/dev/null; then
    .bench-venv/bin/pip install --quiet --upgrade pip
    .bench-venv/bin/pip install --quiet awscli "moto[server]" boto3
    .bench-venv/bin/pip install --quiet -e .
fi

if ! command -v rclone >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq rclone >/dev/null
fi

if [ ! -x bench-tools/node_modules/.bin/s3rver ]; then
    mkdir -p bench-tools
    npm install --prefix bench-tools --no-audit --no-fund --loglevel=error s3rver@3 >/dev/null
fi

echo "bench tools:"
.bench-venv/bin/aws --version 2>&1
.bench-venv/bin/python -c "import boto3, botocore, s3transfer, moto; print('boto3', boto3.__version__, 'botocore', botocore.__version__, 's3transfer', s3transfer.__version__, 'moto', moto.__version__)"
rclone version 2>/dev/null | head -1
echo "s3rver $(node -p "require('$root/bench-tools/node_modules/s3rver/package.json').version") on node $(node -v)"
