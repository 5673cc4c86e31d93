#!/usr/bin/env bash
# The test command: builds .venv from nothing (SGLang 0.5.17 with its exact pins, CPU-only use)
# on first run or when setup.py changed, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp="$venv/.kvtier-setup-hash"
want=$(sha256sum setup.py | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "kvtier: building $venv (sglang==0.5.17 and its pins, about 3 to 6 minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$venv/bin/pip" install --quiet -e '.[test]' 2>&1 | grep -v "is ignored" || true
  "$venv/bin/python" -c "import kvtier.sglang_ext.plugin, sglang.srt.mem_cache.radix_cache" >/dev/null
  echo "$want" > "$stamp"
fi
exec "$venv/bin/python" -m pytest "$@"
