"""Prometheus metrics of the tier store: hits, misses, bytes, latency, occupancy, faults per tier.

Each store owns a ``CollectorRegistry`` (not the global one) so that several stores can live in
one process, as they do in tests and in a TP group launched by one scheduler process. ``serve``
exposes ``/metrics`` and a JSON ``/health`` over HTTP. ``PDMetrics`` counts the PD transfer
backend's KV movement; ``pd_metrics_on`` puts them on the page a prefill's store already serves.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_TRANSFER_BUCKETS = (1e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class TierMetrics:
    """The store's counters; ``tier`` labels are ``cpu`` and ``disk``.

    ``kvtier_op_seconds`` also times the tree hook: ``tier="gpu"`` the GPU time of each spill and
    load copy (CUDA events), ``tier="hook"`` the scheduler-thread time of match_prefix / evict /
    init_load_back / spill_ahead / arrival / spill_deferred (launching held spill-ahead copies; from
    inside a match or walk it also counts in theirs).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.hits = Counter("kvtier_hits", "Chunks found, by tier", ["tier"], registry=r)
        self.misses = Counter("kvtier_misses", "Chunks a load asked for that no tier delivered (the radix hook asks "
                              "only for chunks its match reported: these were evicted, corrupt or late in between, "
                              "and are recomputed)", registry=r)
        self.bytes = Counter("kvtier_bytes", "Bytes moved, by tier and direction", ["tier", "direction"], registry=r)
        self.latency = Histogram(
            "kvtier_op_seconds", "Latency of one batch operation", ["tier", "op"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.used = Gauge("kvtier_used_bytes", "Bytes held, by tier", ["tier"], registry=r)
        self.capacity = Gauge("kvtier_capacity_bytes", "Capacity, by tier", ["tier"], registry=r)
        self.evictions = Counter("kvtier_evictions", "Chunks evicted, by tier", ["tier"], registry=r)
        self.demotions = Counter("kvtier_demotions", "Chunks written from CPU to disk on eviction", registry=r)
        self.spills = Counter("kvtier_spilled_chunks", "Chunks copied out of the GPU pool by the radix hook, by what "
                              "started the copy: eviction (write_back; the rows wait for it, on the request's path), "
                              "ahead (write_back's spill ahead, in the background) or insert (write_through)",
                              ["when"], registry=r)
        self.tail_tokens = Counter("kvtier_tail_tokens", "Tokens the radix hook loaded back in tails (a sequence's "
                                   "partial last chunk, see tail_chunks; the tail's chunk is also in kvtier_hits)",
                                   registry=r)
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
        return serve_registry(port, self.registry, health)


class PDMetrics:
    """Counters of kvtier's PD transfer backend; ``role`` labels are ``prefill`` and ``decode``.

    Each side counts the KV it copies: the prefill what it gathers and writes to the decode, the
    decode what it scatters into its pool. ``kvtier_pd_transfer_seconds`` is per request that moved
    KV: at the prefill from its first write to the decode's acknowledgement of the last slot, at the
    decode from the first slot received to the metadata that completes the request.
    ``kvtier_pd_busy_seconds`` is the wall time of the threads moving KV, ``kvtier_pd_copy_seconds``
    the part of it the copies themselves took: bytes over each gives the path's GB/s with and
    without the protocol around the copy.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.bytes = Counter("kvtier_pd_bytes", "KV bytes moved between prefill and decode, by the side copying them",
                             ["role"], registry=r)
        self.pages = Counter("kvtier_pd_pages", "KV pages moved between prefill and decode", ["role"], registry=r)
        self.requests = Counter("kvtier_pd_requests", "Requests whose KV transfer ended, by outcome (success, failed)",
                                ["role", "outcome"], registry=r)
        self.busy = Counter("kvtier_pd_busy_seconds", "Time the PD threads spent moving KV (prefill: gather, write, "
                            "notify, waiting for a free slot; decode: scatter)", ["role"], registry=r)
        self.copy = Counter("kvtier_pd_copy_seconds", "Of that, the copies themselves, by data path: GPU time between "
                            "CUDA events around them (wall time of the torch copy for a CPU pool); prefill: the store "
                            "into the decode's pool (direct) or the gather into staging (staged), decode: the scatter "
                            "out of staging", ["role", "path"], registry=r)
        self.transfer = Histogram("kvtier_pd_transfer_seconds", "Per request: first KV write to the last slot "
                                  "acknowledged (prefill), first slot to completion (decode)", ["role"],
                                  buckets=_TRANSFER_BUCKETS, registry=r)
        self.peers = Counter("kvtier_pd_peers", "Decode ranks registered with a prefill rank, by data path (direct: "
                             "stored into the decode's pool over CUDA IPC; staged: through staging slots)",
                             ["role", "path"], registry=r)
        self.path_bytes = Counter("kvtier_pd_path_bytes", "KV bytes moved, by data path (kvtier_pd_bytes_total is "
                                  "their sum)", ["role", "path"], registry=r)


_served_lock = threading.Lock()
_served: dict[int, tuple[ThreadingHTTPServer, CollectorRegistry]] = {}
_pd_on_port: dict[int, PDMetrics] = {}


def pd_metrics_on(port: int) -> PDMetrics:
    """This process's PD metrics, served on ``port``: in the registry this process already serves
    there (a prefill's tier store: one ``/metrics`` page for both), else in a registry of their own,
    served now. Several managers of one process asking for one port share the same counters."""
    with _served_lock:
        served = _served.get(port)
        if served is not None and served[0].socket.fileno() == -1:  # that server was closed
            served = None
        pd = _pd_on_port.get(port)
        if served is not None and pd is not None and pd.registry is served[1]:
            return pd
        if served is not None:
            pd = PDMetrics(served[1])
        else:
            pd = PDMetrics()
            _serve_locked(port, pd.registry, lambda: {"status": "ok"})
        _pd_on_port[port] = pd
        return pd


def serve_registry(port: int, registry: CollectorRegistry,
                   health: Callable[[], dict] = lambda: {"status": "ok"}) -> ThreadingHTTPServer:
    """Serve ``registry`` on ``/metrics`` and ``health()`` on ``/health`` over HTTP on ``port``
    from a daemon thread (see ``TierMetrics.serve``)."""
    with _served_lock:
        return _serve_locked(port, registry, health)


def _serve_locked(port: int, registry: CollectorRegistry, health: Callable[[], dict]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
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
    _served[port] = (server, registry)
    return server
