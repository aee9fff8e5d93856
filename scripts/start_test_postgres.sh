#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the store tests and print its SQLAlchemy URL on stdout.
#
#   export ANOMALY_TEST_PG_URL="$(scripts/start_test_postgres.sh)"
#   pytest tests/test_store_postgres.py
#   scripts/start_test_postgres.sh stop      # or: stop DIR
#   scripts/start_test_postgres.sh restart   # or: restart DIR (the fault tests restart it mid-batch)
#
# Data lives in a fresh temp folder (or $PGTEST_DIR); the server listens on 127.0.0.1 only, on a
# free port (or $PGTEST_PORT), with trust authentication. PostgreSQL refuses to run as root, so as
# root the server runs as the 'postgres' system user (created by the Debian package).
set -euo pipefail

state_file="${TMPDIR:-/tmp}/anomaly-test-postgres.dir"

find_bindir() {
    if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$dir" && -x "$dir/initdb" ]]; then echo "$dir"; return; fi
    if command -v pg_config >/dev/null 2>&1 && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        pg_config --bindir; return
    fi
    echo "start_test_postgres.sh: no PostgreSQL server binaries found (install the 'postgresql' package or set PG_BIN)" >&2
    exit 1
}

as_server_user() {
    if [[ "$(id -u)" == "0" ]]; then
        if ! id postgres >/dev/null 2>&1; then
            echo "start_test_postgres.sh: running as root but there is no 'postgres' user to run the server as" >&2
            exit 1
        fi
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

bindir="$(find_bindir)"

if [[ "${1:-}" == "stop" ]]; then
    dir="${2:-$(cat "$state_file" 2>/dev/null || true)}"
    if [[ -z "$dir" || ! -d "$dir/data" ]]; then
        echo "start_test_postgres.sh: no test server folder to stop (give it: stop DIR)" >&2
        exit 1
    fi
    as_server_user "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2
    rm -rf "$dir"
    if [[ "$(cat "$state_file" 2>/dev/null || true)" == "$dir" ]]; then rm -f "$state_file"; fi
    exit 0
fi

if [[ "${1:-}" == "restart" ]]; then
    dir="${2:-${PGTEST_DIR:-$(cat "$state_file" 2>/dev/null || true)}}"
    if [[ -z "$dir" || ! -d "$dir/data" ]]; then
        echo "start_test_postgres.sh: no test server folder to restart (give it: restart DIR)" >&2
        exit 1
    fi
    as_server_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w -t 60 restart >&2
    exit 0
fi

dir="${PGTEST_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/anomaly-pg.XXXXXX")}"
mkdir -p "$dir"
chmod 755 "$dir"
if [[ "$(id -u)" == "0" ]]; then chown postgres: "$dir"; fi

port="${PGTEST_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')}"
db="${PGTEST_DB:-anomaly_test}"

as_server_user "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || {
    cat "$dir/initdb.log" >&2
    exit 1
}
as_server_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off" start >&2 || {
    cat "$dir/server.log" >&2
    exit 1
}
as_server_user "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"
echo "$dir" >"$state_file"
echo "test PostgreSQL running in $dir on port $port; stop it with: $0 stop $dir" >&2
echo "postgresql+psycopg://postgres@127.0.0.1:$port/$db"
