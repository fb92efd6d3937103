#!/usr/bin/env bash
# Create .venv (if missing or stale) and install archup with its test extra.
# Sourced by scripts/test-parallel.sh, scripts/test.sh and .ci/run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ARCHUP_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.archup-installed"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[test]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
