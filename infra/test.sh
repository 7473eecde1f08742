#!/usr/bin/env bash
# Run the whole test suite: unit, service and end-to-end tests on real Valkey, SQLite,
# PostgreSQL and bubblewrap sandboxes. Starts a local PostgreSQL when it is installed but
# stopped (and, as root in CI, installs it); without one, the PostgreSQL half of the tests
# is skipped with the reason (in CI it fails instead).
set -euo pipefail
cd "$(dirname "$0")/.."

pg_up() {
  command -v pg_lsclusters >/dev/null || return 1
  local line
  line=$(pg_lsclusters --no-header 2>/dev/null | head -n1) || return 1
  [ -n "$line" ] || return 1
  set -- $line
  if [ "$4" != online ] && [ "$(id -u)" = 0 ]; then
    pg_ctlcluster "$1" "$2" start
  fi
  if [ "$(id -u)" = 0 ]; then
    su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
  fi
  export BULKHEAD_TEST_POSTGRES_URL="${BULKHEAD_TEST_POSTGRES_URL:-postgresql://postgres:postgres@127.0.0.1:$3/postgres}"
}

if [ -z "${BULKHEAD_TEST_POSTGRES_URL:-}" ]; then
  if ! pg_up && [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ]; then
    echo "test: installing PostgreSQL for CI" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    pg_up
  fi
fi

.venv/bin/ruff check bulkhead gateway workers billing vmhost tests bench
.venv/bin/mypy bulkhead gateway workers billing vmhost
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
