#!/usr/bin/env bash
# The test command. Builds .venv from nothing on first use (or when setup.py changed): SGLang
# 0.5.17 with its exact pins (torch 2.11, triton), used on the CPU. Then runs pytest; extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp="$venv/.kvtier-setup-hash"
extras="test,ucx,bench"
want=$(echo "$extras" | cat setup.py - | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "kvtier: building $venv (sglang==0.5.17 and its pins: about 3 to 6 minutes, 9 GB)" >&2
  log=$(mktemp)
  python3 -m venv "$venv"
  if ! "$venv/bin/pip" install --progress-bar off -e ".[$extras]" >"$log" 2>&1; then
    grep -v "is ignored" "$log" | tail -40 >&2
    echo "kvtier: pip install failed (full log: $log)" >&2
    exit 1
  fi
  rm -f "$log"
  echo "$want" > "$stamp"
fi
# The remote-tier tests start a real redis-server on loopback.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "kvtier: installing redis-server for the remote-tier tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null 2>&1 \
    || echo "kvtier: could not install redis-server (needs root and Debian's packages)" >&2
fi
exec "$venv/bin/python" -m pytest "$@"
