#!/usr/bin/env bash
# Make sure PostgreSQL's server programs are on this machine, for the tests of the PostgreSQL
# journal: each pytest worker starts a throwaway server of its own (tests/pgserver.py), so
# only the binaries are needed, never a running cluster. Idempotent, and silent when they are
# already there. Otherwise installs Debian's `postgresql` (needs root and apt-get), without
# leaving the distribution's own cluster running or set to start at boot.
# Run by scripts/test.sh and .ci/run. ARCHUP_TEST_POSTGRES=skip (the tests skip then) skips it.
set -euo pipefail

# Where tests/pgserver.py looks too: PATH, pg_config --bindir, then Debian's versioned
# directories (not on PATH: Debian links only the client programs into /usr/bin).
archup_find_initdb() {
    local candidate
    if candidate="$(command -v initdb 2>/dev/null)"; then
        printf '%s\n' "$candidate"; return 0
    fi
    if command -v pg_config >/dev/null 2>&1 && candidate="$(pg_config --bindir 2>/dev/null)/initdb" \
            && [ -x "$candidate" ]; then
        printf '%s\n' "$candidate"; return 0
    fi
    for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$candidate/initdb" ]; then
            printf '%s\n' "$candidate/initdb"; return 0
        fi
    done
    return 1
}

archup_ensure_postgres() {
    if [ "${ARCHUP_TEST_POSTGRES:-}" = skip ]; then
        return 0
    fi
    if archup_find_initdb >/dev/null; then
        archup_ensure_postgres_user
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "ensure-postgres: PostgreSQL's initdb is not on this machine and there is no apt-get;" \
             "install the PostgreSQL server (initdb, pg_ctl) or set ARCHUP_TEST_POSTGRES=skip" >&2
        return 1
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    echo "ensure-postgres: installing Debian's postgresql (initdb not found)" >&2
    # A policy-rc.d that answers 101 keeps the package's scripts from starting its cluster;
    # only put one in place when there is none, and remove only ours.
    local policy=/usr/sbin/policy-rc.d placed_policy=""
    if [ ! -e "$policy" ]; then
        $sudo sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        placed_policy=1
    fi
    local status=0
    {
        $sudo apt-get update -qq \
            && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends -o Dpkg::Options::=--force-confold postgresql
    } >/dev/null || status=$?
    if [ -n "$placed_policy" ]; then
        $sudo rm -f "$policy"
    fi
    if [ "$status" -ne 0 ]; then
        echo "ensure-postgres: apt-get install postgresql failed (exit $status)" >&2
        return "$status"
    fi
    # Belt and braces: stop any cluster the package started anyway, and make every packaged
    # cluster manual-start so a reboot or `service postgresql start` leaves it down.
    if command -v pg_lsclusters >/dev/null 2>&1; then
        local version name
        while read -r version name _; do
            $sudo pg_ctlcluster "$version" "$name" stop >/dev/null 2>&1 || true
            if [ -f "/etc/postgresql/$version/$name/start.conf" ]; then
                echo manual | $sudo tee "/etc/postgresql/$version/$name/start.conf" >/dev/null
            fi
        done < <(pg_lsclusters --no-header 2>/dev/null || true)
    fi
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now postgresql >/dev/null 2>&1 || true
    fi
    if ! archup_find_initdb >/dev/null; then
        echo "ensure-postgres: installed postgresql but still found no initdb" >&2
        return 1
    fi
    archup_ensure_postgres_user
}

# initdb and postgres refuse to run as root: as root, the tests run them as `postgres`
# (Debian's package creates that user; a server built or unpacked by hand may not have).
archup_ensure_postgres_user() {
    if [ "$(id -u)" -eq 0 ] && ! id -u postgres >/dev/null 2>&1; then
        echo "ensure-postgres: creating the system user 'postgres' (initdb refuses to run as root)" >&2
        useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres
    fi
}

archup_ensure_postgres
