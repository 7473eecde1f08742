#!/usr/bin/env bash
# Set up what Bulkhead needs on a Debian/Ubuntu machine: system packages (as root, via
# apt-get), a virtualenv in .venv and the Python packages. Safe to run again: a no-op when
# everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v bwrap >/dev/null || need_apt+=(bubblewrap)
command -v slirp4netns >/dev/null || need_apt+=(slirp4netns)
command -v setpriv >/dev/null || need_apt+=(util-linux)

pick_python() {
  for cand in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  return 1
}
PY=$(pick_python) || need_apt+=(python3 python3-venv)
if [ -n "${PY:-}" ] && ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then need_apt+=(python3-venv); fi

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${need_apt[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install these Debian/Ubuntu packages first: ${need_apt[*]}" >&2
    echo "       (e.g. sudo apt-get install ${need_apt[*]})" >&2
    command -v bwrap >/dev/null || exit 1
  fi
fi
PY=$(pick_python) || { echo "setup: Python 3.11+ is required" >&2; exit 1; }

stamp=.venv/.bulkhead-installed
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log=.venv/pip-install.log
  if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[dev]'; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install failed (log above, also in $log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
