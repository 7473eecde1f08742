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
# the qemu microVM driver and its image build (`bulkhead image build`); CI runs its tests
if [ "$(id -u)" = 0 ]; then
  command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
  command -v debootstrap >/dev/null || need_apt+=(debootstrap)
  command -v mkfs.ext4 >/dev/null || need_apt+=(e2fsprogs)
  command -v lz4 >/dev/null || need_apt+=(lz4)
  dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)
fi

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
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
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

# Template images (content-addressed: a no-op when up to date). The bwrap environments
# (the code-interpreter's numpy/pandas/matplotlib virtualenv) are required; the microVM
# images (kernel, initramfs, debootstrap rootfs: about two minutes the first time) need root
# and are required in CI, elsewhere a failure only leaves isolation=microvm unavailable.
.venv/bin/bulkhead image build --all --for bwrap
if [ "$(id -u)" = 0 ]; then
  if ! .venv/bin/bulkhead image build --all --for qemu; then
    [ "${CI:-}" = true ] && exit 1
    echo "setup: microVM images were not built (see above); bwrap sandboxes still work" >&2
  fi
else
  echo "setup: not root: microVM images are not built (isolation=microvm unavailable)" >&2
fi
