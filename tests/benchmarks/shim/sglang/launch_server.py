"""``python -m sglang.launch_server`` for the end-to-end benchmark test: the stand-in server instead of SGLang.

Put ``tests/benchmarks/shim`` first on ``PYTHONPATH`` and the benchmark scripts start this in
place of SGLang; it takes SGLang's ``--port`` and ``--enable-request-time-stats-logging``, ignores
the other arguments, and serves kvtier's metrics registry on ``KVTIER_METRICS_PORT`` when that is
set, as a kvtier server would.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from standin_server import make_app  # noqa: E402

from kvtier.sglang_ext.metrics import TierMetrics  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--enable-request-time-stats-logging", action="store_true")
args, _ = ap.parse_known_args()
metrics = None
if os.environ.get("KVTIER_METRICS_PORT"):
    metrics = TierMetrics()
    metrics.serve(int(os.environ["KVTIER_METRICS_PORT"]))
web.run_app(make_app("ok", 0.02, 0.001, metrics, log_stages=args.enable_request_time_stats_logging), host="127.0.0.1", port=args.port, print=None, shutdown_timeout=0.5)
