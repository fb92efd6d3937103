#!/usr/bin/env bash
# The test suite, from nothing: set up .venv, then run pytest. Extra arguments go to pytest.
# Tests run in one worker process per core (pytest-xdist; each with its own moto server):
# the in-process moto server and archup share one interpreter lock otherwise.
# ARCHUP_TEST_WORKERS=0 runs them in this process, one after another.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
# The PostgreSQL journal's tests start servers of their own; they need the server programs.
bash "$root/scripts/ensure-postgres.sh"
cd "$root"
exec python -m pytest -n "${ARCHUP_TEST_WORKERS:-auto}" "$@"
