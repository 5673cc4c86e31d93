"""Prometheus metrics of the tier store: hits, misses, bytes, latency, occupancy, faults per tier.

Each store owns a ``CollectorRegistry`` (not the global one) so that several stores can live in
one process, as they do in tests and in a TP group launched by one scheduler process.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

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

    def serve(self, port: int) -> None:
        """Expose ``/metrics`` over HTTP on ``port`` (a daemon thread)."""
        start_http_server(port, registry=self.registry)
