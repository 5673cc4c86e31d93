"""Prometheus metrics of the tier store: hits, misses, bytes, latency, occupancy, faults per tier.

Each store owns a ``CollectorRegistry`` (not the global one) so that several stores can live in
one process, as they do in tests and in a TP group launched by one scheduler process. ``serve``
exposes ``/metrics`` and a JSON ``/health`` over HTTP.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class TierMetrics:
    """The store's counters; ``tier`` labels are ``cpu`` and ``disk``.

    ``kvtier_op_seconds`` also times the tree hook: ``tier="gpu"`` the GPU time of each spill and
    load copy (CUDA events), ``tier="hook"`` the scheduler-thread time of evict / init_load_back.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.hits = Counter("kvtier_hits", "Chunks found, by tier", ["tier"], registry=r)
        self.misses = Counter("kvtier_misses", "Chunks looked up and found in no tier", registry=r)
        self.bytes = Counter("kvtier_bytes", "Bytes moved, by tier and direction", ["tier", "direction"], registry=r)
        self.latency = Histogram(
            "kvtier_op_seconds", "Latency of one batch operation", ["tier", "op"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.used = Gauge("kvtier_used_bytes", "Bytes held, by tier", ["tier"], registry=r)
        self.capacity = Gauge("kvtier_capacity_bytes", "Capacity, by tier", ["tier"], registry=r)
        self.evictions = Counter("kvtier_evictions", "Chunks evicted, by tier", ["tier"], registry=r)
        self.demotions = Counter("kvtier_demotions", "Chunks written from CPU to disk on eviction", registry=r)
        self.dropped = Counter("kvtier_dropped_puts", "Chunks not stored, by reason", ["reason"], registry=r)
        self.corrupt = Counter("kvtier_corrupt", "Chunks failing their checksum (served as misses)", ["tier"], registry=r)
        self.remote_errors = Counter("kvtier_remote_errors", "Remote tier calls that failed or timed out", registry=r)
        self.expired_pins = Counter("kvtier_expired_leases", "Leases released by timeout, not by their holder", registry=r)

    @contextmanager
    def timed(self, tier: str, op: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.latency.labels(tier, op).observe(time.perf_counter() - start)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric, as served on ``/metrics``."""
        return generate_latest(self.registry)

    def serve(self, port: int, health: Callable[[], dict] = lambda: {"status": "ok"}) -> ThreadingHTTPServer:
        """Serve ``/metrics`` and ``/health`` (``health()`` as JSON; 503 unless its status is ok)
        over HTTP on ``port`` from a daemon thread; ``shutdown()`` the result to stop."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, metrics.exposition())
                elif path == "/health":
                    state = health()
                    self._reply(200 if state.get("status") == "ok" else 503, "application/json",
                                json.dumps(state).encode())
                else:
                    self._reply(404, "text/plain", b"kvtier serves /metrics and /health\n")

            def _reply(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds: keep them out of the logs
                pass

        server = ThreadingHTTPServer(("", port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="kvtier-metrics", daemon=True).start()
        return server
