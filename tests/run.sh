#!/usr/bin/env bash
# The test command. Builds .venv from nothing on first use (or when this file, setup.py or
# tests/cpu_requirements.py changed): SGLang 0.5.17 with its exact pins (torch 2.11, triton,
# transformers, ...), used on the CPU, less its GPU kernel packages (tests/cpu_requirements.py
# says which and why). Then runs pytest; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp="$venv/.kvtier-setup-hash"
extras="test,ucx,bench"
need_gb=8
want=$(echo "$extras" | cat setup.py tests/cpu_requirements.py tests/run.sh - | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$venv"
  free_gb=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1048576 ))
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "kvtier: building $venv needs about $need_gb GB free here (6 GB venv and downloads); $free_gb GB free" >&2
    exit 1
  fi
  echo "kvtier: building $venv (sglang==0.5.17 and its pins, no GPU kernels: about 3 to 5 minutes, 6 GB)" >&2
  log=$(mktemp)
  reqs=$(mktemp)
  if ! sglang=$(grep -o '"sglang==[^"]*"' setup.py | tr -d '"') || [ -z "$sglang" ]; then
    echo "kvtier: setup.py has no \"sglang==VERSION\" requirement for tests/run.sh to pin" >&2
    exit 1
  fi
  pip=("$venv/bin/pip" install --no-cache-dir --progress-bar off)
  if ! { python3 -m venv "$venv" &&
      "${pip[@]}" --no-deps "$sglang" -e . packaging &&
      "$venv/bin/python" tests/cpu_requirements.py "$extras" >"$reqs" &&
      "${pip[@]}" -r "$reqs"; } >"$log" 2>&1; then
    grep -v "is ignored" "$log" | tail -40 >&2
    echo "kvtier: pip install failed (full log: $log)" >&2
    exit 1
  fi
  rm -f "$log" "$reqs"
  echo "$want" > "$stamp"
fi
# The remote-tier tests start a real redis-server on loopback.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "kvtier: installing redis-server for the remote-tier tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null 2>&1 \
    || echo "kvtier: could not install redis-server (needs root and Debian's packages)" >&2
fi
exec "$venv/bin/python" -m pytest "$@"
